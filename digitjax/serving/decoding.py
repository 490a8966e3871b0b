"""Decoding and preprocessing uploads on worker processes, within budgets of pixels.

Decoding costs time by the pixel: an all-zero PNG of 1 x 49,999,000 pixels is 97 kB and keeps a
worker busy for seconds. So the pixels a request's images will decode to are read from their
headers first, and a request is refused when its images hold too many in all (413), or when its
client (its address) already has too many waiting (429). Large images go to a worker of their
own, at a low CPU priority, so they take neither a worker nor the CPU from ordinary ones.

Jobs reach a process pool only as its workers free up; until then they wait here, on the event
loop, where a request that times out or whose client leaves simply stops waiting: its images
are never decoded. The clients waiting take turns, a job each, at every freed place.
"""

import asyncio
import collections
import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from PIL import Image

from digitjax.inference.parallel import Outcome, preprocess_one, start_pool
from digitjax.inference.preprocess import FORMATS
from digitjax.serving.uploads import Limits, Rejected, Upload, png_pixels, too_many_pixels

LARGE_PIXELS = 4_000_000  # a large image: seconds of decoding rather than milliseconds
HEADER_BYTES = 64 << 10  # where most images tell their size (a JPEG's EXIF comes first)
T = TypeVar("T")


def header_pixels(data: bytes, max_pixels: int) -> int | None:
    """The pixels an image will decode to, from its header in `data` (None: PIL finds none
    there). One over `max_pixels`, which the decoder refuses before decoding, costs 0. Runs in
    a worker: some formats' headers take PIL milliseconds to walk."""
    try:
        with (
            warnings.catch_warnings(action="ignore"),
            Image.open(io.BytesIO(data), formats=FORMATS) as image,
        ):
            pixels = image.size[0] * image.size[1]
    except Exception:  # every failure means "no header in these bytes"
        return None
    return 0 if pixels > max_pixels else pixels


class Lane:
    """A process pool and the places before it: `queued` jobs per worker may be submitted, the
    others wait on the event loop, and a freed place goes to the clients in turn, one job
    each (so a client with 75 images waiting does not hold up one with a single image). A
    place is given back when the worker is done with the job, not when the request stops
    waiting for it: a job that already runs keeps its worker busy."""

    def __init__(self, workers: int, queued: int, niceness: int = 0):
        self.workers, self.niceness = workers, niceness
        self.pool = start_pool(workers, niceness)
        self.free = queued * workers
        # The jobs waiting for a place, by client, in the order their turns come.
        self.waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}

    async def run(self, function: Callable[..., T], *args: Any, client: str = "") -> T:
        await self.place(client)  # cancelled while waiting: nothing was submitted
        pool = self.pool
        try:
            job = pool.submit(function, *args)
        except BrokenProcessPool:
            self.give_back()
            self.replace(pool)
            raise
        try:
            return await asyncio.wrap_future(job)
        except BrokenProcessPool:
            self.replace(pool)
            raise
        finally:
            if job.done():  # answered, or cancelled before it started
                self.give_back()
            else:  # the request stopped waiting, but a worker runs the job: its place is taken
                loop = asyncio.get_running_loop()
                job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.give_back))

    async def place(self, client: str) -> None:
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(client, collections.deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given a place as it stopped waiting
                self.give_back()
            elif turn in self.waiting.get(client, ()):
                self.waiting[client].remove(turn)
                if not self.waiting[client]:
                    del self.waiting[client]
            raise

    def give_back(self) -> None:
        """A freed place: to the first job of the client whose turn it is (that client then
        waits at the back of the line), else kept for the next job."""
        while self.waiting:
            client = next(iter(self.waiting))
            turns = self.waiting.pop(client)
            turn = turns.popleft()
            if turns:
                self.waiting[client] = turns
            if not turn.done():  # else cancelled, its request gone: the next one's turn
                turn.set_result(None)
                return
        self.free += 1

    def replace(self, pool: ProcessPoolExecutor) -> None:
        """A hostile file crashed a decoder (or the OS killed a worker): the pool is lost for
        every request, so the first one to notice replaces it."""
        if pool is self.pool:
            pool.shutdown(wait=False, cancel_futures=True)
            self.pool = start_pool(self.workers, self.niceness)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Decoder:
    """The worker pools and the pixels each client has waiting."""

    def __init__(self, workers: int, limits: Limits):
        self.limits = limits
        # Ordinary jobs take milliseconds: a second one per worker keeps it busy while the event
        # loop is. No more: the pool's own queue is first come, first served, whoever's turn
        # it is (eight a worker let a client's 4-megapixel images hold up another's one image
        # for 0.27 s at p99, two for 0.11 s; ordinary load was no slower, benchmarks/README.md).
        self.ordinary = Lane(workers, queued=2)
        self.large = Lane(1, queued=1, niceness=10)
        self.client_pixels: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        self.ordinary.close()
        self.large.close()

    async def preprocess(self, uploads: list[Upload], client: str) -> list[Outcome]:
        """Every upload as the model sees it, in order; Rejected when over a budget."""
        pixels = await asyncio.gather(*(self.pixels(upload.data, client) for upload in uploads))
        total = sum(pixels)
        if total > self.limits.max_request_pixels:
            raise too_many_pixels(self.limits, total)
        with self.reserve(client, total):
            return await asyncio.gather(
                *(
                    self.preprocess_one(u.data, p, client)
                    for u, p in zip(uploads, pixels, strict=True)
                )
            )

    @contextlib.contextmanager
    def reserve(self, client: str, pixels: int) -> Iterator[None]:
        """Counts `pixels` against `client` until its request is answered (or abandoned)."""
        if self.client_pixels[client] + pixels > self.limits.max_client_pixels:
            raise Rejected(
                429,
                "client_pixels",
                f"Your requests in progress already hold over {self.limits.max_client_pixels:,} "
                "pixels; send more when they are answered.",
                retry=True,
            )
        self.client_pixels[client] += pixels
        try:
            yield
        finally:
            self.client_pixels[client] -= pixels
            if not self.client_pixels[client]:
                del self.client_pixels[client]

    async def pixels(self, data: bytes, client: str) -> int:
        pixels = png_pixels(data, self.limits.max_pixels)
        if pixels is not None:
            return pixels
        # Most formats tell their size in their first bytes, and only those are sent to the
        # worker (0.5 ms against 2.7 ms for a 2.6 MB JPEG); a TIFF's directory may come last,
        # a JPEG's size after a colour profile of hundreds of KiB: then the whole file.
        parts = (data[:HEADER_BYTES], data) if len(data) > HEADER_BYTES else (data,)
        try:
            for part in parts:
                found = await self.ordinary.run(
                    header_pixels, part, self.limits.max_pixels, client=client
                )
                if found is not None:
                    return found
        except BrokenProcessPool:
            return self.limits.max_pixels
        return 0  # not an image: the decoder refuses it, decoding nothing

    async def preprocess_one(self, data: bytes, pixels: int, client: str) -> Outcome:
        lane = self.large if pixels > LARGE_PIXELS else self.ordinary
        try:
            return await lane.run(preprocess_one, data, self.limits.max_pixels, client=client)
        except BrokenProcessPool:
            return None, "unreadable image: the decoder crashed"

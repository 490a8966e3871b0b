"""Decoding and preprocessing uploads on worker processes, within budgets of pixels.

Decoding costs time by the pixel: an all-zero PNG of 1 x 49,999,000 pixels is 97 kB and keeps a
worker busy for seconds. So the pixels a request's images will decode to are read from their
headers first, and a request is refused when its images hold too many in all (413), or when its
client (its address) already has too many waiting (429). Large images may occupy all workers
but one, so small ones always find a worker.

Jobs reach the process pool only as workers free up; until then they wait here, on the event
loop, where a request that times out or whose client leaves simply stops waiting: its images
are never decoded.
"""

import asyncio
import collections
import contextlib
import io
import struct
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from PIL import Image

from digitjax.inference.parallel import Outcome, preprocess_one, start_pool
from digitjax.serving.uploads import Limits, Rejected, Upload

LARGE_PIXELS = 4_000_000  # a large image: seconds of decoding rather than milliseconds
HEADER_BYTES = 64 << 10  # where any image's size is told: JPEG's EXIF comes first, 64 KiB at most
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T = TypeVar("T")


def png_pixels(data: bytes) -> int | None:
    """A PNG's pixels from its IHDR chunk, which the format puts first; None for other files."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width * height


def header_pixels(head: bytes, whole: bool, max_pixels: int) -> int:
    """The pixels an image will decode to, from the first bytes of its file (`whole`: all of
    it). Files the decoder refuses before decoding (not an image, or over `max_pixels`) cost 0;
    a header PIL cannot find in `head` costs `max_pixels`, the most any image may. Runs in a
    worker: some formats' headers take PIL milliseconds to walk."""
    try:
        with warnings.catch_warnings(action="ignore"), Image.open(io.BytesIO(head)) as image:
            pixels = image.size[0] * image.size[1]
    except Exception:  # noqa: BLE001 - every failure means "size unknown from this head"
        return 0 if whole else max_pixels
    return 0 if pixels > max_pixels else pixels


class Decoder:
    """The worker pool, the queue before it, and the pixels each client has waiting."""

    def __init__(self, workers: int, limits: Limits):
        self.workers, self.limits = workers, limits
        self.pool: ProcessPoolExecutor = start_pool(workers)
        # One job queued per worker besides the one it runs: the pool never waits for the event
        # loop, and what waits beyond that can still be dropped.
        self.slots = asyncio.Semaphore(2 * workers)
        self.large_slots = asyncio.Semaphore(max(1, workers - 1))
        self.client_pixels: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def preprocess(self, uploads: list[Upload], client: str) -> list[Outcome]:
        """Every upload as the model sees it, in order; Rejected when over a budget."""
        pixels = await asyncio.gather(*(self.pixels(upload.data) for upload in uploads))
        total = sum(pixels)
        if total > self.limits.max_request_pixels:
            raise Rejected(
                413,
                "too_many_pixels",
                f"The images of one request may hold {self.limits.max_request_pixels:,} pixels "
                f"in all; these hold {total:,}.",
            )
        with self.reserve(client, total):
            return await asyncio.gather(
                *(self.preprocess_one(u.data, p) for u, p in zip(uploads, pixels, strict=True))
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

    async def pixels(self, data: bytes) -> int:
        pixels = png_pixels(data)
        if pixels is not None:
            return 0 if pixels > self.limits.max_pixels else pixels
        head = data[:HEADER_BYTES]
        whole = len(head) == len(data)
        try:
            return await self.run(header_pixels, head, whole, self.limits.max_pixels)
        except BrokenProcessPool:
            return self.limits.max_pixels

    async def preprocess_one(self, data: bytes, pixels: int) -> Outcome:
        large = self.large_slots if pixels > LARGE_PIXELS else contextlib.nullcontext()
        async with large:
            try:
                return await self.run(preprocess_one, data, self.limits.max_pixels)
            except BrokenProcessPool:
                return None, "unreadable image: the decoder crashed"
            except Exception as e:  # PIL raises many types on hostile files: all mean unreadable
                return None, f"unreadable image: {type(e).__name__}: {e}"[:300]

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        async with self.slots:
            pool = self.pool
            try:
                return await asyncio.wrap_future(pool.submit(function, *args))
            except BrokenProcessPool:
                # A hostile file crashed a decoder (or the OS killed a worker): the pool is lost
                # for every request, so the first one to notice replaces it.
                if pool is self.pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = start_pool(self.workers)
                raise

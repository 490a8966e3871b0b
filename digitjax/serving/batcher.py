"""Dynamic batching: requests queue their preprocessed images on an asyncio queue, and one
inference thread runs whatever has gathered as one compiled forward pass.

While the thread computes a batch, new requests wait in the queue, so the next batch grows with
the load by itself; `max_wait_s` can hold a batch open a little longer to gather more.
"""

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from digitjax.serving.uploads import Rejected

Item = tuple[np.ndarray, asyncio.Future]


class QueueFull(Exception):
    """More images are in flight than the server accepts; the client should retry later."""


class Batcher:
    """Runs `forward` ((N, 28, 28) images -> (N, 11) a classifier's outputs) on batches of at most
    `max_batch` images, on one thread. `on_batch(images, seconds)` is told of every batch."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_wait_s: float,
        max_in_flight: int,
        max_client_in_flight: int,
        on_batch: Callable[[int, float], None],
        on_depth: Callable[[int], None],
    ):
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max_wait_s
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self.max_client_in_flight = max_client_in_flight
        self.client_in_flight: collections.Counter[str] = collections.Counter()
        self.on_batch, self.on_depth = on_batch, on_depth
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, wait: bool = True) -> None:
        """Stops batching; `wait=False` leaves the thread's current work (a compilation of
        minutes, when the server is stopped while starting) to end with the process."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.thread.shutdown(wait=wait, cancel_futures=True)

    def run_in_thread(self, function: Callable[[], None]) -> asyncio.Future[None]:
        """Runs `function` on the inference thread (compiling belongs there too)."""
        return asyncio.get_running_loop().run_in_executor(self.thread, function)

    @contextlib.contextmanager
    def admit(self, images: int, client: str) -> Iterator[None]:
        """Holds `images` places from a request's arrival to its answer; raises QueueFull
        rather than letting the backlog grow without end, and Rejected (429) when `client`
        already holds its share, so that the places left go to the other clients."""
        if self.in_flight + images > self.max_in_flight:
            raise QueueFull
        self.check_share(client, images)
        self.in_flight += images
        self.client_in_flight[client] += images
        self.on_depth(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= images
            self.client_in_flight[client] -= images
            if not self.client_in_flight[client]:
                del self.client_in_flight[client]
            self.on_depth(self.in_flight)

    def check_share(self, client: str, images: int = 1) -> None:
        """Rejected (429) if `images` more would take `client` past its share. Also called
        before a request's body is read (with 1: any request holds one): refused requests then
        cost no parsing, where 2,000 bodies of 64 parts in 6 s slowed the other clients."""
        if self.client_in_flight[client] + images > self.max_client_in_flight:
            raise Rejected(
                429,
                "client_in_flight",
                f"Your requests in progress already hold {self.client_in_flight[client]} of "
                f"the {self.max_client_in_flight} images one client may have in flight; "
                "send more when they are answered.",
                retry=True,
            )

    async def outputs(self, images: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: Item | None = None
        while True:
            batch = [carried or await self.queue.get()]
            carried = await self._gather(batch, loop.time() + self.max_wait_s)
            # Requests that timed out while queued are dropped here, not computed.
            batch = [(images, future) for images, future in batch if not future.done()]
            if not batch:
                continue
            images = np.concatenate([images for images, _ in batch])
            started = loop.time()
            try:
                outputs = await loop.run_in_executor(self.thread, self.forward, images)
            except Exception as e:  # a bug, not bad input: every waiting request learns of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.on_batch(len(images), loop.time() - started)
            offset = 0
            for request_images, future in batch:
                if not future.done():
                    future.set_result(outputs[offset : offset + len(request_images)])
                offset += len(request_images)

    async def _gather(self, batch: list[Item], deadline: float) -> Item | None:
        """Adds queued items to `batch` up to `max_batch` images, waiting until `deadline` for
        more; returns an item that did not fit, for the next batch."""
        count = len(batch[0][0])
        while count < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(remaining):
                        item = await self.queue.get()
                except TimeoutError:
                    return None
            if count + len(item[0]) > self.max_batch:
                return item
            batch.append(item)
            count += len(item[0])
        return None

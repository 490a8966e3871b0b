"""The state of `digitjax serve`: the loaded model, the preprocessing workers
(`decoding.Decoder`), the `Batcher`, metrics (`process.serve` runs it all on uvicorn).

A request's images are decoded and preprocessed by the worker processes (never on the event
loop), then wait in the `Batcher`'s queue for one compiled forward pass shared with every other
request in flight. All batch sizes are compiled before `/readyz` says ready.
"""

import asyncio
import base64
import contextlib
import dataclasses
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from digitjax.inference.classifier import (
    MAX_BATCH,
    Classifier,
    answer,
    batch_sizes,
    default_min_confidence,
    failed,
)
from digitjax.inference.parallel import available_cores
from digitjax.inference.preprocess import NO_DIGIT_FOUND, png_bytes
from digitjax.serving.batcher import Batcher
from digitjax.serving.decoding import Decoder
from digitjax.serving.schemas import InfoResponse, ModelInfoOut, PredictionOut, PredictResponse
from digitjax.serving.uploads import Limits, Rejected, Upload
from digitjax.weights import ONE_PIXEL_SHIFTS

T = TypeVar("T")

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = tuple(2**i for i in range(11))


@dataclasses.dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 256
    max_wait_ms: float = 0.0
    workers: int = dataclasses.field(default_factory=available_cores)
    limits: Limits = Limits()


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "digitjax_requests",
            "Prediction requests, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.latency = Histogram(
            "digitjax_request_seconds",
            "Prediction request latency, arrival to answer.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter("digitjax_images", "Images received.", registry=registry)
        self.batch_size = Histogram(
            "digitjax_batch_size",
            "Images per forward pass.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "digitjax_inference_seconds",
            "Time of one forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "digitjax_queue_depth", "Images admitted and not yet answered.", registry=registry
        )
        self.rejections = Counter(
            "digitjax_rejections",
            "Requests and connections refused, by reason.",
            ["reason"],
            registry=registry,
        )

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)

    def on_refusal(self, reason: str) -> None:
        """A request or a connection refused (`Rejected.reason`, `guard.Refusal.reason`)."""
        self.rejections.labels(reason).inc()


class Server:
    """The loaded model and what serves it. `lifespan` starts the workers and the batcher and
    compiles in the background; `ready` turns true when everything is compiled."""

    def __init__(self, classifier: Classifier, options: Options, report: Callable[[str], None]):
        self.classifier, self.options, self.report = classifier, options, report
        self.limits = options.limits
        self.metrics = ServerMetrics()
        # A request's files form one queue item, so its size must be compiled as well; and the
        # images of a batch scored near the detector's threshold run again, shifted four ways
        # (weights.steady_scores).
        largest = max(options.max_batch, self.limits.max_files)
        largest = min(MAX_BATCH, largest * len(ONE_PIXEL_SHIFTS))
        self.batch_sizes = batch_sizes(largest)
        self.ready = False
        # What stopped the warm-up (the model failing on its first images), and how to stop
        # serving then: set by whoever runs the server (`process.serve`).
        self.failure: Exception | None = None
        self.stop_serving: Callable[[], None] = lambda: None
        self.stopping_now = asyncio.Event()  # set by `stop_now`
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop, once serving
        self.model_info = ModelInfoOut.of(classifier.info)
        self.default_min_confidence = default_min_confidence(classifier.info)
        self.decoder: Decoder
        self.batcher: Batcher

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        self.decoder = Decoder(self.options.workers, self.limits)
        metrics = self.metrics
        self.batcher = Batcher(
            self.classifier.outputs,
            self.options.max_batch,
            self.options.max_wait_ms / 1000,
            self.limits.max_in_flight,
            self.limits.max_client_in_flight,
            metrics.on_batch,
            metrics.queue_depth.set,
        )
        self.batcher.start()
        warm_up = asyncio.create_task(self.warm_up())
        try:
            yield
        finally:
            # Stopped while compiling: the compilation (minutes on a busy machine) is left to
            # end with the process instead of being waited for.
            warm_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm_up
            await self.batcher.stop(wait=self.ready)
            self.decoder.close()

    def stop_now(self) -> None:
        """Ends every request in flight with 503 (a second Ctrl-C or SIGTERM while the server
        drains them). Safe to call from a signal handler."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.stopping_now.set)

    async def unless_stopped(self, work: Awaitable[T]) -> T:
        """`work`'s result, or Rejected (503), its work cancelled, if `stop_now` comes first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping_now.wait())
        try:
            await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the caller is cancelled (its client left)
            stop.cancel()
            stopped = not task.done()
            if stopped:
                task.cancel()
        if stopped:
            raise Rejected(503, "stopping", "The server is stopping.", retry=True)
        return task.result()

    async def warm_up(self) -> None:
        """Compiles every batch size and starts every worker, then declares readiness."""
        started = time.perf_counter()

        def compile_all() -> None:
            for size in self.batch_sizes:
                self.classifier.outputs(np.zeros((size, 28, 28), np.float32))

        sample = Upload(None, png_bytes(np.pad(np.ones((8, 8), np.float32), 10)))
        try:
            await asyncio.gather(
                self.batcher.run_in_thread(compile_all),
                self.decoder.preprocess([sample] * 2 * self.options.workers, "warm-up"),
            )
        except Exception as e:  # the model cannot serve: a server that never gets ready is worse
            self.failure = e
            self.stop_serving()
            return
        # The cyclic collector would otherwise keep rescanning the ~10^5 objects that JAX and
        # Flax left behind, for every request's few new ones.
        gc.freeze()
        self.ready = True
        self.report(
            f"Ready: compiled batch sizes {self.batch_sizes[0]}-{self.batch_sizes[-1]} in "
            f"{time.perf_counter() - started:.1f} s; {self.options.workers} preprocessing "
            f"worker{'s' if self.options.workers != 1 else ''}"
        )

    async def predict(
        self, uploads: list[Upload], client: str, with_images: bool, min_confidence: float | None
    ) -> PredictResponse:
        """The answers for `uploads`; raises Rejected, QueueFull or TimeoutError."""
        self.metrics.images.inc(len(uploads))
        with self.batcher.admit(len(uploads), client):
            async with asyncio.timeout(self.limits.timeout_s):
                outcomes = await self.decoder.preprocess(uploads, client)
                found = [image for image, _ in outcomes if image is not None]
                outputs = iter(await self.batcher.outputs(np.stack(found)) if found else [])
        if min_confidence is None:
            min_confidence = self.default_min_confidence
        predictions = []
        for upload, (image, error) in zip(uploads, outcomes, strict=True):
            extra = {}
            if with_images:  # null for an image that has no 28x28 input: every answer has it
                extra["image"] = None if image is None else _data_url(png_bytes(image))
            if image is None:
                prediction = failed(upload.filename, error or NO_DIGIT_FOUND)
            else:
                prediction = answer(upload.filename, next(outputs), min_confidence)
            predictions.append(PredictionOut.of(prediction, **extra))
        return PredictResponse(predictions=predictions, model=self.model_info)

    def info(self) -> InfoResponse:
        import jax

        return InfoResponse(
            model=self.model_info,
            min_confidence=self.default_min_confidence,
            device=str(jax.devices()[0]),
            backend=jax.default_backend(),
            batch_sizes=self.batch_sizes,
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            workers=self.options.workers,
            limits={
                **dataclasses.asdict(self.limits),
                "max_client_in_flight": self.limits.max_client_in_flight,
            },
            ready=self.ready,
        )


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()

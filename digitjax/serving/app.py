"""`digitjax serve`: the draw-a-digit page and the batched prediction API (FastAPI on uvicorn).

A request's images are decoded and preprocessed by the worker processes of `parallel` (never on
the event loop), then wait in the `Batcher`'s queue for one compiled forward pass shared with
every other request in flight. All batch sizes are compiled before `/readyz` says ready.
"""

import asyncio
import base64
import contextlib
import dataclasses
import gc
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from digitjax.config import UserError
from digitjax.inference.classifier import (
    MAX_BATCH,
    Classifier,
    answer,
    batch_sizes,
    default_min_confidence,
    failed,
)
from digitjax.inference.parallel import Outcome, available_cores, preprocess_one, start_pool
from digitjax.inference.predict import load_classifier
from digitjax.inference.preprocess import png_bytes
from digitjax.serving.batcher import Batcher, QueueFull
from digitjax.serving.uploads import Limits, Rejected, Upload, read_uploads

STATIC_DIR = Path(__file__).parent / "static"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = tuple(2**i for i in range(11))
RETRY_AFTER = {"Retry-After": "1"}


@dataclasses.dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 256
    max_wait_ms: float = 0.0
    workers: int = dataclasses.field(default_factory=available_cores)
    limits: Limits = Limits()


class Metrics:
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
            "digitjax_rejections", "Requests refused, by reason.", ["reason"], registry=registry
        )

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.inference.observe(seconds)


class Server:
    """The loaded model and what serves it: worker pool, batcher, metrics."""

    def __init__(self, classifier: Classifier, options: Options, report: Callable[[str], None]):
        self.classifier, self.options, self.report = classifier, options, report
        self.limits = options.limits
        self.metrics = Metrics()
        # A request's files form one queue item, so its size must be compiled as well.
        largest = min(MAX_BATCH, max(options.max_batch, self.limits.max_files))
        self.batch_sizes = batch_sizes(largest)
        self.ready = False
        self.pool = None
        self.batcher: Batcher | None = None
        self.model_info = classifier.info.to_dict()
        self.default_min_confidence = default_min_confidence(classifier.info)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> Any:
        self.pool = start_pool(self.options.workers)
        self.batcher = Batcher(
            self.classifier.probabilities,
            self.options.max_batch,
            self.options.max_wait_ms / 1000,
            self.limits.max_in_flight,
            self.metrics.on_batch,
            self.metrics.queue_depth.set,
        )
        self.batcher.start()
        warm_up = asyncio.create_task(self.warm_up())
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await warm_up
            await self.batcher.stop()
            self.pool.shutdown(wait=True, cancel_futures=True)

    async def warm_up(self) -> None:
        """Compiles every batch size and starts every worker, then declares readiness."""
        started = time.perf_counter()

        def compile_all() -> None:
            for size in self.batch_sizes:
                self.classifier.probabilities(np.zeros((size, 28, 28), np.float32))

        sample = png_bytes(np.pad(np.ones((8, 8), np.float32), 10))
        await asyncio.gather(
            self.batcher.run_in_thread(compile_all),
            *(self.preprocess(sample) for _ in range(2 * self.options.workers)),
        )
        # The cyclic collector would otherwise keep rescanning the ~10^5 objects that JAX and
        # Flax left behind, for every request's few new ones.
        gc.freeze()
        self.ready = True
        self.report(
            f"Ready: compiled batch sizes {self.batch_sizes[0]}-{self.batch_sizes[-1]} in "
            f"{time.perf_counter() - started:.1f} s; {self.options.workers} preprocessing workers"
        )

    async def preprocess(self, data: bytes) -> Outcome:
        pool = self.pool
        try:
            return await asyncio.wrap_future(
                pool.submit(preprocess_one, data, self.limits.max_pixels)
            )
        except BrokenProcessPool:
            # A hostile file crashed a decoder (or the OS killed a worker): the pool is lost for
            # every request, so the first one to notice replaces it.
            if pool is self.pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self.pool = start_pool(self.options.workers)
            return None, "unreadable image: the decoder crashed"
        except Exception as e:  # PIL raises many types on hostile files; all mean "unreadable"
            return None, f"unreadable image: {type(e).__name__}: {e}"[:300]

    async def predict(
        self, uploads: list[Upload], with_images: bool, min_confidence: float | None
    ) -> dict:
        with self.batcher.admit(len(uploads)):
            async with asyncio.timeout(self.limits.timeout_s):
                outcomes = await asyncio.gather(*(self.preprocess(u.data) for u in uploads))
                found = [image for image, _ in outcomes if image is not None]
                probabilities = iter(
                    await self.batcher.probabilities(np.stack(found)) if found else []
                )
        if min_confidence is None:
            min_confidence = self.default_min_confidence
        predictions = []
        for upload, (image, error) in zip(uploads, outcomes):
            if image is None:
                predictions.append(failed(upload.filename, error or "no digit found").to_dict())
                continue
            prediction = answer(upload.filename, next(probabilities), min_confidence).to_dict()
            if with_images:
                prediction["image"] = (
                    "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
                )
            predictions.append(prediction)
        return {"predictions": predictions, "model": self.model_info}

    def info(self) -> dict:
        import jax

        return {
            "model": self.model_info,
            "min_confidence": self.default_min_confidence,
            "device": str(jax.devices()[0]),
            "backend": jax.default_backend(),
            "batch_sizes": self.batch_sizes,
            "max_batch": self.options.max_batch,
            "max_wait_ms": self.options.max_wait_ms,
            "workers": self.options.workers,
            "limits": dataclasses.asdict(self.limits),
            "ready": self.ready,
        }


PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
                "required": ["file"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(
        title="digitjax",
        summary="Handwritten-digit recognition: a page to draw on and a batched API.",
        lifespan=server.lifespan,
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    metrics = server.metrics

    def refuse(status: int, reason: str, detail: str, retry: bool = False) -> HTTPException:
        metrics.rejections.labels(reason).inc()
        return HTTPException(status, detail, headers=RETRY_AFTER if retry else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        return JSONResponse({"detail": f"Invalid {where}: {error.get('msg', 'bad value')}."}, 422)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.post("/api/predict", openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(
        request: Request,
        image: bool = False,
        min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    ) -> JSONResponse:
        """Digits in one or more images: multipart `file` parts, or one raw image body.
        `image=true` adds each 28x28 input the model saw, as a PNG data URL."""
        started, status = time.perf_counter(), 500
        try:
            if not server.ready:
                raise refuse(503, "not_ready", "The model is still compiling.", retry=True)
            try:
                async with asyncio.timeout(server.limits.timeout_s):
                    uploads = await read_uploads(request, server.limits)
            except Rejected as e:
                raise refuse(e.status, e.reason, e.detail) from None
            except TimeoutError:
                raise refuse(
                    408,
                    "slow_upload",
                    f"The request body took longer than {server.limits.timeout_s:g} s to arrive.",
                ) from None
            metrics.images.inc(len(uploads))
            try:
                result = await server.predict(uploads, image, min_confidence)
            except QueueFull:
                raise refuse(503, "queue_full", "The server is busy.", retry=True) from None
            except TimeoutError:
                raise refuse(
                    503,
                    "timeout",
                    f"The request took longer than {server.limits.timeout_s:g} s.",
                    retry=True,
                ) from None
            status = 200
            return JSONResponse(result)
        except HTTPException as e:
            status = e.status_code
            raise
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

    @app.get("/api/info")
    async def info() -> dict:
        """The model, its config, the device, compiled batch sizes and limits."""
        return server.info()

    @app.get("/livez")
    async def livez() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """503 until every batch size is compiled and the workers are up."""
        if server.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"detail": "The model is still compiling."}, 503, RETRY_AFTER)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(model: Path | None, options: Options, report: Callable[[str], None]) -> None:
    """Serves until Ctrl-C or SIGTERM, which let the requests in flight finish."""
    listener = _listen(options.host, options.port)
    host, port = listener.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    classifier = load_classifier(model)
    report(f"Serving {classifier.source} at {url} (Ctrl-C to stop); compiling...")
    server = Server(classifier, options, report)
    config = uvicorn.Config(
        create_app(server), log_level="warning", access_log=False, timeout_keep_alive=30
    )
    with _graceful_signals():
        uvicorn.Server(config).run(sockets=[listener])
    report("Stopped.")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow, so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)  # early clients wait in the backlog, not refused
    except OSError as e:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return listener


@contextlib.contextmanager
def _graceful_signals() -> Iterator[None]:
    """uvicorn drains on SIGINT/SIGTERM, then re-raises the signal with the handler it found:
    a no-op one makes the drained server's exit a normal, successful one."""
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)

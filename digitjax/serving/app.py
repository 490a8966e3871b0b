"""The HTTP surface of `digitjax serve`: the page, the prediction API, probes and metrics.

Routes reach the `Server` through dependencies (`ReadyServer` refuses while the model compiles,
`Uploads` reads the request's images within the limits); refusals are exceptions (`Rejected`,
the batcher's `QueueFull`, a `TimeoutError`) turned into one-sentence JSON answers by the
exception handlers; `PredictMetrics` counts and times every prediction request, `HeadAsGet`
answers HEAD on the GET routes, and `Safeguards` adds the headers every answer carries.
"""

import asyncio
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from digitjax.serving.batcher import QueueFull
from digitjax.serving.schemas import (
    ErrorOut,
    InfoResponse,
    PredictResponse,
    Status,
    error_responses,
)
from digitjax.serving.server import Server, ServerMetrics
from digitjax.serving.uploads import Rejected, Upload, read_uploads

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER = {"Retry-After": "1"}
# Refused while the body may be arriving still: closing the connection spares receiving the rest.
CLOSE_AFTER = {400, 408, 413, 415, 429}
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
    app = FastAPIOffline(  # FastAPI with Swagger UI and ReDoc served from the package, no CDN
        title="digitjax",
        summary="Handwritten-digit recognition: a page to draw on and a batched API.",
        lifespan=server.lifespan,
        favicon_url="/static/favicon.svg",
        exception_handlers={
            Rejected: refused,
            QueueFull: busy,
            TimeoutError: too_slow,
            RequestValidationError: invalid,
        },
    )
    app.state.server = server
    app.include_router(api)  # routes are matched in order: the busiest first
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(PredictMetrics, metrics=server.metrics)
    app.add_middleware(HeadAsGet)
    app.add_middleware(Safeguards)
    return app


# Dependencies: `async def`, since FastAPI runs a plain `def` on a thread pool (a thread hop
# per dependency per request, ~0.3 ms of CPU here), and flat: FastAPI solves a dependency's own
# dependencies again wherever it is used, cached or not.


def _server(request: Request) -> Server:
    return request.app.state.server


async def any_server(request: Request) -> Server:
    return _server(request)


async def ready_server(request: Request) -> Server:
    server = _server(request)
    if not server.ready:
        raise Rejected(503, "not_ready", "The model is still compiling.", retry=True)
    return server


AnyServer = Annotated[Server, Depends(any_server)]  # ready or still compiling
ReadyServer = Annotated[Server, Depends(ready_server)]


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


async def request_uploads(request: Request, server: ReadyServer) -> list[Upload]:
    server.batcher.check_share(client_of(request))
    return await server.unless_stopped(read_uploads(request, server.limits))


Uploads = Annotated[list[Upload], Depends(request_uploads)]
MinConfidence = Annotated[
    float | None,
    Query(
        ge=0,
        le=1,
        allow_inf_nan=False,  # else NaN is told it "should be less than or equal to 1"
        description="Answers below it are not sure (default: the model's).",
    ),
]


# Routes

pages = APIRouter()
api = APIRouter(prefix="/api")


@pages.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@pages.get("/livez")
async def livez() -> Status:
    return Status(status="alive")


@pages.get("/readyz", responses=error_responses(503))
async def readyz(server: ReadyServer) -> Status:
    """503 until every batch size is compiled and the workers are up."""
    return Status(status="ready")


@pages.get("/metrics", include_in_schema=False)
async def prometheus(server: AnyServer) -> Response:
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@api.post(
    "/predict",
    response_model_exclude_unset=True,  # `image` only when asked for
    responses=error_responses(400, 408, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": PREDICT_BODY},
)
async def predict(
    request: Request,
    server: ReadyServer,
    uploads: Uploads,
    image: bool = False,
    min_confidence: MinConfidence = None,
) -> PredictResponse:
    """Digits in one or more images: multipart `file` parts, or one raw image body.
    `image=true` adds each 28x28 input the model saw, as a PNG data URL."""
    client = client_of(request)
    work = asyncio.ensure_future(
        server.unless_stopped(server.predict(uploads, client, image, min_confidence))
    )
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():  # nobody will read the answer: stop working on it
        work.cancel()
        raise Rejected(400, "disconnected", "The client closed the connection.")
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@api.get("/info")
async def info(server: AnyServer) -> InfoResponse:
    """The model, its config, the device, compiled batch sizes and limits."""
    return server.info()


# Refusals: one sentence of JSON, counted by reason


async def refused(request: Request, exc: Rejected) -> JSONResponse:
    _server(request).metrics.on_refusal(exc.reason)
    headers = dict(RETRY_AFTER) if exc.retry else {}
    if exc.status in CLOSE_AFTER:
        headers["Connection"] = "close"
    return JSONResponse(ErrorOut(detail=exc.detail).model_dump(), exc.status, headers)


async def busy(request: Request, exc: QueueFull) -> JSONResponse:
    return await refused(request, Rejected(503, "queue_full", "The server is busy.", retry=True))


async def too_slow(request: Request, exc: TimeoutError) -> JSONResponse:
    timeout = _server(request).limits.timeout_s
    detail = f"The request took longer than {timeout:g} s."
    return await refused(request, Rejected(503, "timeout", detail, retry=True))


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    detail = f"Invalid {where}: {error.get('msg', 'bad value')}."
    return JSONResponse(ErrorOut(detail=detail).model_dump(), 422)


class PredictMetrics:
    """Counts prediction requests by status and times them, arrival to answer: a plain ASGI
    middleware, cheaper than Starlette's BaseHTTPMiddleware."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/predict":
            return await self.app(scope, receive, send)
        started = time.perf_counter()

        answered = False

        def count(status: int) -> None:
            nonlocal answered
            answered = True
            self.metrics.requests.labels(str(status)).inc()
            self.metrics.latency.observe(time.perf_counter() - started)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            # A defect: Starlette's outermost middleware answers it 500, outside this one.
            if not answered:
                count(500)
            raise


class HeadAsGet:
    """HEAD answered as GET (uvicorn sends the head without the body), as Starlette's own
    routes and the static files do; FastAPI's GET routes answer HEAD 405, which fails a
    health check made with HEAD."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class Safeguards:
    """Headers on every answer: browsers take no content type from the bytes (an upload's
    name echoed in JSON is never run as a page), the page is shown in no other site's frame
    (where strokes could be stolen or faked), and caches ask again before reusing anything:
    the page and its script revalidate by ETag, so an upgraded server is never half-cached,
    and predictions are not kept at all."""

    SAFE = {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "frame-ancestors 'none'",
        "Referrer-Policy": "same-origin",
    }

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cache = "no-store" if scope["path"].startswith("/api/") else "no-cache"

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in {**self.SAFE, "Cache-Control": cache}.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, guarded)

"""The process of `digitjax serve`: the listening socket, the model, uvicorn with the
connection guard, and the signals that stop it."""

import contextlib
import resource
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from digitjax.config import Interrupted, UserError
from digitjax.inference.predict import load_classifier
from digitjax.serving.app import create_app
from digitjax.serving.guard import guarded_protocol
from digitjax.serving.server import Options, Server
from digitjax.serving.uploads import Limits

SPARE_FILES = 256  # file descriptors kept for the workers' pipes, the model's files, logs


def serve(
    model: Path | None,
    options: Options,
    report: Callable[[str], None],
    setup: Callable[[], None] = lambda: None,
) -> None:
    """Serves until Ctrl-C or SIGTERM, which let the requests in flight finish; during
    start-up (`setup`, loading, compiling) they stop it at once, with the signal's exit status
    (130, 143)."""
    with _StopSignals() as stops:
        setup()
        listener = _listen(options.host, options.port)
        host, port = listener.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        classifier = load_classifier(model)
        stops.check()
        report(f"Serving {classifier.source} at {url} (Ctrl-C to stop); compiling...")
        server = Server(classifier, options, report)
        limits = options.limits
        config = uvicorn.Config(
            create_app(server),
            http=guarded_protocol(_connection_cap(limits), limits.head_timeout_s),
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
        )
        stops.uvicorn = uvicorn.Server(config)
        stops.check()
        # uvicorn drains on SIGINT/SIGTERM, then raises the signal again for the handler it
        # found: ours, which records it.
        stops.uvicorn.run(sockets=[listener])
        if not server.ready:
            stops.check()
    report("Stopped.")


def _connection_cap(limits: Limits) -> int:
    """`limits.max_connections`, raising the open-files limit to allow them if it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - SPARE_FILES))


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


class _StopSignals:
    """SIGINT and SIGTERM while starting are recorded, never raised as exceptions: a
    KeyboardInterrupt landing in JAX's garbage-collection callback would be printed and ignored,
    and loading would go on. `check` stops at the next step; once uvicorn exists, a signal asks
    it to exit (while it runs, its own handlers do)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.uvicorn: uvicorn.Server | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def record(self, sig: int, frame: object) -> None:
        self.received.append(sig)
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def check(self) -> None:
        """Raises Interrupted (exit status 128 + the signal) if a signal came."""
        if self.received:
            name = signal.Signals(self.received[0]).name
            raise Interrupted(f"Stopped by {name} before it was ready.", 128 + self.received[0])

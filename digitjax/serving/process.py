"""The process of `digitjax serve`: the listening socket, the model, uvicorn with the
connection guard, and the signals that stop it."""

import contextlib
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from digitjax import interrupts
from digitjax.config import Interrupted, UserError, reason
from digitjax.inference.predict import load_classifier
from digitjax.serving.app import create_app
from digitjax.serving.guard import MAX_HEAD, MAX_LINGERING, guarded_protocol
from digitjax.serving.server import Options, Server
from digitjax.serving.uploads import Limits

SPARE_FILES = 256  # file descriptors kept for the workers' pipes, the model's files, logs
# How long the event loop may hold the GIL while the inference thread waits for it. Python's
# 5 ms let a flood of cheap requests (pipelined `GET /livez`) keep a prediction waiting 5 ms
# at each of its many hand-overs: p50 156-210 ms against 65-83 ms at 1 ms on a slow host;
# ordinary load is the same within noise (benchmarks/README.md, *The GIL's switch interval*).
GIL_SWITCH_INTERVAL_S = 0.001


def serve(model: Path | None, options: Options, report: Callable[[str], None]) -> None:
    """Serves until Ctrl-C or SIGTERM, which let the requests in flight finish; while starting
    (loading, compiling) they stop it at once, with the signal's exit status (130, 143)."""
    # While starting, a signal is only noted (`interrupts.deferred`), and acted on between the
    # steps below: raised as an exception, it could land in JAX's garbage-collection callback
    # and be dropped. uvicorn takes the signals over while it runs, and when it has drained, it
    # raises them again for the handler it found: this one, which notes them.
    with interrupts.deferred() as signalled:
        listener = _listen(options.host, options.port)
        host, port = listener.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        classifier = load_classifier(model)
        _stop_if(signalled())
        report(f"Serving {classifier.source} at {url} (Ctrl-C to stop); compiling...")
        server = Server(classifier, options, report)
        limits = options.limits
        config = uvicorn.Config(
            create_app(server),
            http=guarded_protocol(
                _connection_cap(limits), limits.head_timeout_s, server.metrics.on_refusal
            ),
            h11_max_incomplete_event_size=MAX_HEAD,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
        )
        _stop_if(signalled())
        runner = _Uvicorn(config, signalled, server.stop_now)
        server.stop_serving = runner.exit_soon
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        runner.run(sockets=[listener])
        if not server.ready:
            _stop_if(signalled())
        if server.failure is not None:
            raise _as_user_error(server.failure)
    report("Stopped.")


def _as_user_error(failure: Exception) -> UserError:
    if isinstance(failure, UserError):
        return failure
    return UserError(f"the model failed on its first images: {reason(failure)}")


class _Uvicorn(uvicorn.Server):
    """uvicorn, which also exits at once when a signal was noted just before it took the
    signals over (between the last check and its own handlers), and which a second signal
    stops by answering the requests in flight with 503 (`stop_now`). uvicorn's own forced exit
    cancelled them mid-way: their clients got 500, the log tracebacks, and the signal that
    uvicorn raised again on its way out landed inside the event loop."""

    def __init__(
        self,
        config: uvicorn.Config,
        signalled: Callable[[], int | None],
        stop_now: Callable[[], None],
    ):
        super().__init__(config)
        self.signalled, self.stop_now = signalled, stop_now

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # draining already
            self.stop_now()
        else:
            super().handle_exit(sig, frame)

    def exit_soon(self) -> None:
        """Ends serving as a signal would (uvicorn checks it every 0.1 s)."""
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if self.signalled() is not None:
                self.should_exit = True
            yield


def _stop_if(signum: int | None) -> None:
    if signum is not None:
        name = signal.Signals(signum).name
        raise Interrupted(f"Stopped by {name} before it was ready.", 128 + signum)


def _connection_cap(limits: Limits) -> int:
    """`limits.max_connections`, raising the open-files limit to allow them (and the refused
    connections that linger, and SPARE_FILES) if it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - SPARE_FILES - MAX_LINGERING))


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

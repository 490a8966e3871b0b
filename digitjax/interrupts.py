"""Ctrl-C and SIGTERM end every command alike: exit status 130 or 143, one line, and nothing
partial left on disk, whatever moment the signal lands.

A Python signal handler runs in the main thread between two bytecodes, and the exception it
raises lands wherever that thread happens to be. Where Python itself called the code (JAX's
`_xla_gc_callback`, run by the garbage collector; a `__del__` method), the exception is printed
as "Exception ignored in ..." and dropped, and the command would go on and finish with exit 0.
So the handler also records the signal, and the record is checked where it matters: before an
output file gets its name (`outputs.write_file`) and when the command ends (the CLI).

SIGTERM raises the same exception as Ctrl-C: its default action kills the process at once,
skipping the `finally` blocks that remove partial files.

One place is not safe to raise in: a module being imported. An extension module's start-up
runs Python code (nanobind builds enums with Python's `enum`), and an exception raised there
aborts the process ("terminate called...", exit status -6 or -11: reproduced inside `import
onnx`). A signal that lands while an import runs ends the command at once instead, as one does
during `digitjax`'s own start-up (`digitjax.launch`): an import never holds a half-written file.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the stop signals caught while a command runs, in order


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the main thread was when it arrived (a KeyboardInterrupt,
    so that `except Exception` in libraries lets it through)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def received() -> int | None:
    """The first stop signal received since the command started, if any."""
    return _received[0] if _received else None


def check() -> None:
    """Raises `Stopped` if a stop signal arrived, even one whose exception was swallowed on
    the way: called before anything is committed to disk."""
    if _received:
        raise Stopped(_received[0])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For a whole command: a stop signal is recorded and raises `Stopped`."""

    def stop(signum: int, frame: FrameType | None) -> None:
        _received.append(signum)
        _raise_stopped(signum, frame)

    _received.clear()
    try:
        with _handling(stop):
            yield
    finally:
        _received.clear()


@contextlib.contextmanager
def deferred() -> Iterator[Callable[[], int | None]]:
    """For code that stops at a point of its own choosing (training, at the end of a chunk,
    where its state is whole and can be saved): a first signal is only noted, for the function
    yielded to report, and the code acts on it; a second one raises `Stopped` at once."""
    noted: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        noted.append(signum)
        if len(noted) > 1:
            # Recorded as `stop_on_signals` records: should the exception be swallowed on its
            # way (inside Orbax's threads, a garbage-collector callback), the command still
            # ends as the first signal asked, in one line.
            _received.append(noted[0])
            _raise_stopped(noted[0], frame)

    with _handling(note):
        yield lambda: noted[0] if noted else None


@contextlib.contextmanager
def at_once() -> Iterator[Callable[[], int | None]]:
    """Inside `deferred`, for work with no point of its own to stop at: a stop signal raises
    `Stopped` where the code is, and is noted for the function yielded to report (whether
    or not its exception was swallowed on the way), for the caller to say what it stopped."""
    noted: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        noted.append(signum)
        _raise_stopped(signum, frame)

    with _handling(stop):
        yield lambda: noted[0] if noted else None


@contextlib.contextmanager
def recorded_only() -> Iterator[None]:
    """For a command's last words (its `interrupted` line): a stop signal is recorded, not
    raised, so that a storm of them cannot cut the line short with a traceback."""
    with _handling(lambda signum, frame: _received.append(signum)):
        yield


def exit_at_once(signum: int) -> None:
    """Ends the process now, with the one line and exit status of a stop, and no unwinding:
    for moments where raising is unsafe and nothing is half-done."""
    with contextlib.suppress(Exception):  # a print the signal interrupted cannot flush again
        sys.stdout.flush()
    # On a terminal, the cursor that a progress bar hid is shown again, on a line of its own.
    os.write(2, b"\x1b[?25h\ninterrupted\n" if os.isatty(2) else b"interrupted\n")
    os._exit(128 + signum)


def inside_an_import(frame: FrameType | None) -> bool:
    """Whether `frame`, or a frame that called it, is Python's import machinery at work."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    """Raises `Stopped` where the main thread is, or exits at once inside an import."""
    if inside_an_import(frame):
        exit_at_once(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def _handling(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` for the stop signals, then the previous handlers again. Handlers can only be
    set from the main thread; elsewhere (a server's worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)


def _quiet_swallowed_interrupts() -> None:
    """A `Stopped` that Python had to drop (raised inside a garbage-collector callback) is not
    worth its "Exception ignored" traceback: the signal is recorded, and acted on later."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)

    sys.unraisablehook = hook


_quiet_swallowed_interrupts()

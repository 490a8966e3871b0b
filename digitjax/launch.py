"""The `digitjax` console script. A stop signal that arrives while the command's modules are
still being imported (typer, rich: a few tenths of a second) ends it at once with one line and
exit status 130 or 143, not a KeyboardInterrupt traceback: nothing has been done yet that could
be left half-done. Once a command runs, `digitjax.interrupts` takes over."""

import os
import signal
from typing import Any


def _stop_while_starting(signum: int, frame: Any) -> None:
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_while_starting)
    from digitjax.cli import main as run_command

    run_command()

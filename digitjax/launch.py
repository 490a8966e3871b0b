"""The `digitjax` console script. A stop signal that arrives while the command's modules are
still being imported (typer, rich: a few tenths of a second) ends it at once with one line and
exit status 130 or 143, not a KeyboardInterrupt traceback: nothing has been done yet that could
be left half-done. Once a command runs, `digitjax.interrupts` takes over."""

import faulthandler
import os
import signal
import sys
from typing import Any

from digitjax import interrupts


def _stop_while_starting(signum: int, frame: Any) -> None:
    interrupts.exit_at_once(signum)


def main() -> None:
    for signum in interrupts.STOP_SIGNALS:
        signal.signal(signum, _stop_while_starting)
    # Started with its output closed (`digitjax predict x.png >&-`), Python has no sys.stdout:
    # what would be shown goes nowhere, as Python's own print() does then.
    sys.stdout = sys.stdout or open(os.devnull, "w")
    sys.stderr = sys.stderr or open(os.devnull, "w")
    # A crash in native code (XLA, an extension module) prints where each thread was, rather
    # than ending the command without a word.
    faulthandler.enable()
    from digitjax.cli import main as run_command

    run_command()

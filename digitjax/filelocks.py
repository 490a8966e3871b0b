"""An exclusive lock on a file that names its holder, on every platform: `flock` on Unix,
`LockFileEx` on Windows (both through the filelock package). The operating system releases
either when its process ends, however it ends (kill -9 included), so a killed process never
leaves a stale lock behind."""

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import lock_descriptor

# Windows locks byte 0 of the file and refuses reads of it while locked: the holder's name
# is written after it, where a process that waits or gives up can read it.
HOLDER_OFFSET = 1
# A holder writes its name just after taking the lock: a process refused in between waits for
# the name this long (then says "unknown") rather than name nobody.
HOLDER_WAIT_SECONDS = 1.0


class Held(Exception):
    """The lock is held by another process: `holder` names it ("PID on HOST")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[None]:
    """Holds the lock on `path` (created if missing) until the block ends; without `wait`, a
    lock held elsewhere raises `Held` at once. OSError if the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_descriptor(fd, blocking=wait):
            raise Held(_read_holder(fd))
        _write_holder(fd, f"{os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            # The name goes with the lock, so that the next process refused it never reads a
            # former holder's (only one killed leaves its name, until the next holder's).
            with contextlib.suppress(OSError):
                _write_holder(fd, "")
    finally:
        os.close(fd)  # releases the lock


def _write_holder(fd: int, holder: str) -> None:
    data = holder.encode()
    os.lseek(fd, HOLDER_OFFSET, os.SEEK_SET)
    os.write(fd, data)
    os.ftruncate(fd, HOLDER_OFFSET + len(data))


def _read_holder(fd: int) -> str:
    deadline = time.monotonic() + HOLDER_WAIT_SECONDS
    while True:
        try:
            os.lseek(fd, HOLDER_OFFSET, os.SEEK_SET)
            holder = os.read(fd, 200).decode(errors="replace").strip()
        except OSError:
            holder = ""
        if holder or time.monotonic() >= deadline:
            return holder or "unknown"
        time.sleep(0.01)

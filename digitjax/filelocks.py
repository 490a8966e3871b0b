"""An exclusive lock on a file that names its holder, on every platform: `flock` on Unix,
`LockFileEx` on Windows (both through the filelock package). The operating system releases
either when its process ends, however it ends (kill -9 included), so a killed process never
leaves a stale lock behind."""

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from filelock import lock_descriptor

# Windows locks byte 0 of the file and refuses reads of it while locked: the holder's name
# is written after it, where a process that waits or gives up can read it.
HOLDER_OFFSET = 1


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
        holder = f"{os.getpid()} on {socket.gethostname()}\n".encode()
        os.lseek(fd, HOLDER_OFFSET, os.SEEK_SET)
        os.write(fd, holder)
        os.ftruncate(fd, HOLDER_OFFSET + len(holder))
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, HOLDER_OFFSET, os.SEEK_SET)
        holder = os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        holder = ""
    return holder or "unknown"

"""Files the user asked for (--csv, --plot, --out...): checked before the work, so a wrong path
costs nothing, and written whole or not at all after it."""

import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from digitjax import interrupts
from digitjax.config import UserError


def check_writable(flag: str, path: Path | None, folder: bool = False) -> None:
    """Raises UserError unless `path` (a file, or a folder when `folder`) can be written now.
    Creating a file is the only test that holds for every case (read-only mounts, /proc, root
    ignoring permission bits), so one is created and removed in the nearest existing folder."""
    if path is None:
        return
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, give a file name")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(
            f"{flag} {path}: cannot create files in {existing} ({e.strerror})"
        ) from None


def check_output(
    flag: str, path: Path | None, overwrite: bool, inputs: Sequence[Path] = ()
) -> None:
    """`check_writable`, and `check_replaceable`: for a file flag checked before the work."""
    check_writable(flag, path)
    if path is not None:
        check_replaceable(flag, path, overwrite, inputs)


def check_replaceable(flag: str, path: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """Raises UserError where writing `path` would replace a file the user did not ask to
    replace: an existing one without `overwrite`, one of the `inputs` ever. Streams and devices
    (/dev/stdout, /dev/null) are written to, not replaced: always allowed."""
    if not path.is_file():
        return
    if any(_same_file(path, source) for source in inputs):
        raise UserError(f"{flag} {path}: is one of the input images")
    if not overwrite:
        raise UserError(f"{flag} {path}: exists: pass --overwrite to replace it")


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """Raises UserError where two flags name one file: the second write would replace the
    first. Streams and devices may take several."""
    files: list[tuple[str, Path]] = []
    for flag, path in outputs.items():
        if path is None or (path.exists() and not path.is_file()):
            continue
        for earlier_flag, earlier in files:
            if _same_file(path, earlier):
                raise UserError(f"{flag} {path}: also given to {earlier_flag}")
        files.append((flag, path))


def _same_file(path: Path, other: Path) -> bool:
    """Whether two paths name one file, through links, `..` and hard links alike."""
    try:
        return os.path.samefile(path, other)
    except OSError:  # one is not there (yet) or unreadable: only the names can tell
        return path.resolve() == other.resolve()


@contextmanager
def writing(flag: str, path: Path) -> Iterator[None]:
    """A write that fails after the work (disk full...) ends in one line naming the flag."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write: {e.strerror or e}") from None


def write_file(path: Path, data: bytes) -> None:
    """Writes through a temporary file renamed over `path`, creating missing folders: a failed
    or interrupted write leaves any earlier file intact and no partial one. Streams and devices
    (/dev/stdout) are written directly."""
    write_files({path: data})


def write_files(contents: dict[Path, bytes]) -> None:
    """`write_file` for several files, all or none: each is written to a temporary file first,
    and only once all are written (a full disk fails before) are they renamed into place."""
    staged: dict[Path, Path] = {}  # temporary file -> target
    try:
        for path, data in contents.items():
            if path.exists() and not path.is_file():
                path.write_bytes(data)
                continue
            target = Path(os.path.realpath(path))  # a link stays a link to the new file
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
            staged[partial] = target
            # Created like any new file (0o666 less the umask), unlike tempfile's 0o600.
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                f.write(data)
        interrupts.check()  # a Ctrl-C swallowed earlier still means: no new file
        for partial, target in staged.items():
            os.replace(partial, target)
    finally:
        for partial in staged:
            partial.unlink(missing_ok=True)

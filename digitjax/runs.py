"""Run folders and the checkpoints in them, found without importing JAX or Orbax (so that
`predict` finds its default model cheaply): `checkpoint` reads and writes them."""

from pathlib import Path

LATEST, BEST = "latest", "best"
ITEMS = ("state", "config", "summary")  # the Orbax items of every checkpoint
DEFAULT_ROOT = Path("checkpoints")


def usable_steps(folder: Path) -> list[Path]:
    """The complete checkpoints in a `latest`/`best` folder, oldest first. Orbax's temporary
    folders (a write cut short) and leftovers of a deletion cut short do not count."""
    if not folder.is_dir():
        return []
    steps = [
        p
        for p in folder.iterdir()
        if p.name.isdigit()
        and (p / "_CHECKPOINT_METADATA").is_file()
        and all((p / item).is_dir() for item in ITEMS)
    ]
    return sorted(steps, key=lambda p: int(p.name))


def has_checkpoint(run_dir: Path) -> bool:
    return any(usable_steps(run_dir / kind) for kind in (LATEST, BEST))


def newest_run(root: Path = DEFAULT_ROOT) -> Path | None:
    """The most recently written run in `root` that holds a complete checkpoint."""
    runs = [p for p in root.glob("*") if p.is_dir() and has_checkpoint(p)]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None

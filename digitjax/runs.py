"""Run folders and the checkpoints in them, found without importing JAX or Orbax (so that
`predict` finds its default model cheaply): `checkpoint` reads and writes them."""

from pathlib import Path

from digitjax.config import UserError

LATEST, BEST = "latest", "best"
ITEMS = ("state", "config", "summary")  # the Orbax items of every checkpoint
DEFAULT_ROOT = Path("checkpoints")
# A `digitjax train --seeds` run: this record, and one ordinary run per seed in a folder
# named SEED_PREFIX + the seed (digitjax/seeds.py).
SEEDS_FILE, SEED_PREFIX = "seeds.json", "seed-"


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


def has_checkpoint(run_dir: Path, kinds: tuple[str, ...] = (LATEST, BEST)) -> bool:
    """Whether the folder holds a run with a checkpoint of one of `kinds` (a `--seeds` run: any
    of its runs)."""
    if any(usable_steps(run_dir / kind) for kind in kinds):
        return True
    return any(has_checkpoint(folder, kinds) for folder in seed_run_dirs(run_dir))


def seed_run_dirs(run_dir: Path) -> list[Path]:
    """The runs of a `--seeds` run, by seed; none where the folder has no SEEDS_FILE (written
    before the runs' folders, removed after them)."""
    if not (run_dir / SEEDS_FILE).is_file():
        return []
    folders = [p for p in run_dir.glob(f"{SEED_PREFIX}*") if p.name[len(SEED_PREFIX) :].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(SEED_PREFIX) :]))


def newest_run(root: Path = DEFAULT_ROOT, kinds: tuple[str, ...] = (LATEST, BEST)) -> Path | None:
    """The most recently written run in `root` that holds a complete checkpoint of one of
    `kinds`."""
    runs = [p for p in root.glob("*") if p.is_dir() and has_checkpoint(p, kinds)]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def step_dir_of(path: Path, kind: str = BEST) -> Path:
    """The checkpoint that `path` names: a run folder's newest `kind` one, a `latest`/`best`
    folder's newest, or one step's folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a checkpoint folder")
    if (path / "_CHECKPOINT_METADATA").exists():
        return path
    if (path / SEEDS_FILE).exists():
        seed_runs = ", ".join(p.name for p in seed_run_dirs(path))
        raise UserError(f"{path} holds one run per seed ({seed_runs}): pass one of them")
    folder = path / kind if (path / kind).is_dir() else path
    steps = step_dirs(folder)
    if not steps and folder == path / BEST:
        steps = step_dirs(path / LATEST)  # the first best/ write was cut short: latest is it
    if not steps:
        raise UserError(f"no digitjax checkpoint in {path}")
    return steps[-1]


def step_dirs(folder: Path) -> list[Path]:
    """Step folders, complete or not (a damaged newest one must be reported, not skipped);
    Orbax's temporary folders do not count."""
    steps = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(steps, key=lambda p: int(p.name))

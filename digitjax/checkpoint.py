"""Orbax checkpoints of a run: `latest/` (for resuming) and `best/` (by test accuracy).

Each checkpoint holds three items: `state` (plain nested dicts of arrays: params, optimizer
state, step, running epoch totals and, with `ema_decay`, the averaged `ema_params` that are
evaluated and served), `config` (JSON) and `summary` (JSON: epoch, test metrics and
the per-epoch history). Orbax writes to a temporary folder and renames it, so a checkpoint on disk
is always complete. Plain orbax restores one with `ocp.CheckpointManager(path).restore(step)`.
"""

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from digitjax.config import Config, UserError

# Orbax logs routine notes (missing optional metadata, sharding fallbacks) as warnings.
logging.set_verbosity(logging.ERROR)

LATEST, BEST = "latest", "best"
METRICS_FILE, CURVES_FILE = "metrics.jsonl", "curves.png"
RUN_ITEMS = (LATEST, BEST, METRICS_FILE, CURVES_FILE)
DEFAULT_ROOT = Path("checkpoints")


class RunCheckpointer:
    """Writes the latest and best checkpoints of one training run."""

    def __init__(self, run_dir: Path):
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self.managers = {
            kind: ocp.CheckpointManager((run_dir / kind).absolute(), options=options)
            for kind in (LATEST, BEST)
        }

    def save(self, kind: str, state: dict[str, Any], config: Config, summary: dict) -> None:
        manager = self.managers[kind]
        step = int(state["step"].addressable_data(0))
        if manager.latest_step() == step:
            return
        # Orbax names its multi-host barriers by step alone: two managers must not save the
        # same step at once.
        for other in self.managers.values():
            other.wait_until_finished()
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config.to_dict()),
                summary=ocp.args.JsonSave(summary),
            ),
        )

    def close(self) -> None:
        for manager in self.managers.values():
            manager.wait_until_finished()
            manager.close()


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / item).exists() for item in RUN_ITEMS)


def clear_run(run_dir: Path) -> None:
    """Removes a previous run's items, and nothing else the folder may hold."""
    for item in RUN_ITEMS:
        path = run_dir / item
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def newest_run(root: Path = DEFAULT_ROOT) -> Path | None:
    runs = [p for p in root.glob("*") if (p / BEST).is_dir() or (p / LATEST).is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _step_dir(path: Path, kind: str) -> Path:
    """Accepts a run dir, a `latest`/`best` dir, or one step's dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    if (path / "_CHECKPOINT_METADATA").exists():
        return path
    if (path / kind).is_dir():
        path = path / kind
    elif kind == BEST and (path / LATEST).is_dir():
        path = path / LATEST
    steps = [p for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    if not steps:
        raise UserError(f"no digitjax checkpoint in {path}")
    return max(steps, key=lambda p: int(p.name))


def _restore_items(step_dir: Path, state_target: Any = None) -> dict[str, Any]:
    """All three items. Without a target the state lands on this process's first device,
    whatever devices wrote it (Orbax refuses to guess across topologies)."""
    if not (step_dir / "config").exists() or not (step_dir / "summary").exists():
        raise UserError(f"{step_dir} is not a digitjax checkpoint (no config or summary item)")
    manager = ocp.CheckpointManager(step_dir.parent.absolute())
    try:
        if state_target is None:
            with ocp.StandardCheckpointer() as checkpointer:
                saved = checkpointer.metadata((step_dir / "state").absolute()).item_metadata
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            state_target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree
            )
        restored = manager.restore(
            int(step_dir.name),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state_target),
                config=ocp.args.JsonRestore(),
                summary=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:  # orbax raises many types for damaged files; all mean the same here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corrupt checkpoint {step_dir}: {reason[:200]}") from None
    finally:
        manager.close()
    return dict(restored)


def _match_tree(restored: Any, expected: Any, what: str, where: Path) -> Any:
    """`restored` arranged as `expected`, after checking every path and shape ourselves:
    orbax can restore a partial tree silently, and it saves integer keys as strings."""

    def by_path(tree: Any) -> dict[str, Any]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {
            "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in leaves
        }

    got, want = by_path(restored), by_path(expected)
    got_shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
    want_shapes = {k: tuple(v.shape) for k, v in want.items()}
    if got_shapes != want_shapes:
        differing = sorted(set(got_shapes.items()) ^ set(want_shapes.items()))[:3]
        raise UserError(
            f"checkpoint {where} does not match its config's {what}: "
            f"differs at {', '.join(f'{k} {s}' for k, s in differing)}"
        )
    return jax.tree.unflatten(jax.tree.structure(expected), [got[k] for k in want])


def read_config(path: Path, kind: str = BEST) -> tuple[Config, dict]:
    step_dir = _step_dir(path, kind)
    items = _restore_items(step_dir)
    return Config.from_dict(items["config"]), items["summary"]


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    config: Config
    graphdef: Any
    params: dict[str, Any]
    summary: dict
    step_dir: Path


def restore_model(path: Path, kind: str = BEST, average: bool = True) -> TrainedModel:
    """A model for evaluation or prediction, its params checked against its saved config:
    the moving average of the weights if the run kept one and `average`, else the weights."""
    from digitjax.model import abstract_model

    step_dir = _step_dir(path, kind)
    items = _restore_items(step_dir)
    try:
        config = Config.from_dict(items["config"])
    except (TypeError, UserError) as e:
        raise UserError(f"{step_dir} is not a digitjax checkpoint: {e}") from None
    graphdef, expected = abstract_model(config, items["summary"].get("num_classes", 10))
    kept = "ema_params" if config.ema_decay and average else "params"
    params = items["state"].get(kept) if isinstance(items["state"], dict) else None
    if params is None:
        raise UserError(f"{step_dir} is not a digitjax checkpoint (no params)")
    params = _match_tree(params, expected, "model", step_dir)
    return TrainedModel(config, graphdef, params, items["summary"], step_dir)


def restore_state(path: Path, abstract_state: Any, kind: str = LATEST) -> tuple[Any, dict]:
    """The full training state for resuming, placed as `abstract_state`'s shardings say."""
    step_dir = _step_dir(path, kind)
    saved = _restore_items(step_dir)["state"]
    _match_tree(saved["params"], abstract_state["params"], "model", step_dir)
    optimizer_shapes = [
        sorted(np.shape(leaf) for leaf in jax.tree.leaves(state["opt_state"]))
        for state in (saved, abstract_state)
    ]
    if optimizer_shapes[0] != optimizer_shapes[1]:
        raise UserError(
            f"cannot resume {step_dir}: its optimizer state is laid out as an older digitjax "
            "wrote it; start a new run (evaluate and predict still read this checkpoint)"
        )
    items = _restore_items(step_dir, abstract_state)
    return items["state"], items["summary"]

"""Run folders and their Orbax checkpoints: `latest/` (for resuming) and `best/` (by test
accuracy), with the policy that keeps a user's runs safe.

Each checkpoint holds three items: `state` (plain nested dicts of arrays: params, optimizer
state, step, running epoch totals and, with `ema_decay`, the averaged `ema_params` that are
evaluated and served), `config` (JSON) and `summary` (JSON: test metrics, the per-epoch
history, per-chunk training curve, where it ran, the temperature that calibrates the saved
weights' probabilities, and a SHA-256 of every state array). Orbax
writes to a temporary folder and renames it, so a checkpoint on disk is always complete; the
checksums catch what renaming cannot (flipped bits). Plain orbax restores one with
`ocp.CheckpointManager(path).restore(step)`.
"""

import contextlib
import dataclasses
import inspect
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from json import JSONDecodeError
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from digitjax import filelocks
from digitjax.config import Config, UserError, reason, root_cause
from digitjax.runs import (
    BEST,
    DEFAULT_ROOT,
    ITEMS,
    LATEST,
    SEEDS_FILE,
    has_checkpoint,
    newest_run,
    seed_run_dirs,
    step_dir_of,
    step_dirs,
    usable_steps,
)
from digitjax.weights import (
    DETECTOR_FILE,
    NonDigitDetector,
    check_shapes,
    check_summary,
    checksum,
    chosen_weights,
    config_of,
    verify_checksums,
)

# Orbax logs routine notes as warnings, and the errors that we report in one line ourselves.
logging.set_verbosity(logging.FATAL)

METRICS_FILE, CURVES_FILE, LOCK_FILE = "metrics.jsonl", "curves.png", ".digitjax.lock"
RUN_ITEMS = (LATEST, BEST, METRICS_FILE, CURVES_FILE, SEEDS_FILE)
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's names for them (tracking.py)


# --- Run folders -------------------------------------------------------------------------


def choose_run_dir(out_dir: Path | None, resume: bool, dataset: str) -> Path:
    """--out if given; else the newest run to resume, or a new timestamped folder."""
    if out_dir is not None:
        return out_dir
    if jax.process_count() > 1:
        raise UserError("a multi-process job needs --out: every process must name the same run")
    if resume:
        newest = newest_run()
        if newest is None:
            raise UserError(f"nothing to resume in {DEFAULT_ROOT}/; pass --out DIR")
        return newest
    return DEFAULT_ROOT / f"{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuses what would lose work. A folder whose run never wrote a checkpoint (killed or
    diverged in its first epoch) holds nothing to lose, so it may simply be started again."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if resume and not usable_steps(run_dir / LATEST):
        if usable_steps(run_dir / BEST):
            raise UserError(f"cannot resume {run_dir}: its latest/ checkpoint is missing")
        if unreadable := _not_restartable(run_dir):
            raise UserError(f"cannot resume {run_dir}: it holds {unreadable}")
        raise nothing_to_resume(run_dir)
    if not resume and not overwrite and has_checkpoint(run_dir):
        raise UserError(
            f"{run_dir} already holds a run: pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if not resume and not overwrite and (unreadable := _not_restartable(run_dir)):
        raise UserError(
            f"{run_dir} holds {unreadable}: pass --overwrite to replace it, or choose another --out"
        )


def nothing_to_resume(run_dir: Path) -> UserError:
    # Ctrl-C and SIGTERM save one at once: without one, the run never began or did not end well.
    return UserError(
        f"nothing to resume: no checkpoint in {run_dir} (a run killed or diverged before its "
        "first one leaves none); run the same command without --resume to start it"
    )


def _not_restartable(run_dir: Path) -> str | None:
    """What keeps a folder without a checkpoint from being started again in place (its run's
    items removed), described; None where latest/ and best/ hold no more than a run that ended
    in its first epoch leaves there: Orbax's temporary folders. Anything else in them is a
    damaged run's (a step folder missing a file, which evaluate may still read) or the user's
    own, not to be removed unasked. So are curves and a metrics file with records: such a run
    writes its metrics file empty (a diverged first epoch too), and no curves."""
    for folder in [run_dir, *seed_run_dirs(run_dir)]:
        for kind in (LATEST, BEST):
            checkpoints = folder / kind
            if checkpoints.is_symlink() or (checkpoints.exists() and not checkpoints.is_dir()):
                return f"{checkpoints.relative_to(run_dir)}, a link or a file, not a folder"
            if not checkpoints.is_dir():
                continue
            for path in sorted(checkpoints.iterdir()):
                if ocp.utils.TMP_DIR_SUFFIX not in path.name:
                    name = path.relative_to(run_dir)
                    if path.name.isdigit():
                        return f"{name}, a checkpoint that is incomplete or damaged"
                    return f"{name}, which no digitjax run wrote"
        for path in (folder / METRICS_FILE, folder / CURVES_FILE):
            empty_metrics = path.name == METRICS_FILE and path.is_file() and not path.stat().st_size
            if (path.is_symlink() or path.exists()) and not empty_metrics:
                return f"{path.relative_to(run_dir)}, which a run with no checkpoint never leaves"
    return None


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Makes the folder ready to write: a new run starts from a clean slate (only the run's
    own items are removed; `check_run_dir` has made sure that is wanted)."""
    if not resume:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The run's own files are replaced by writing a new file and renaming it over the old
    # one, through a link: a link at one of their names would have a file elsewhere replaced.
    for name in (METRICS_FILE, CURVES_FILE, SEEDS_FILE, DETECTOR_FILE):
        if (run_dir / name).is_symlink():
            (run_dir / name).unlink()


def clear_run(run_dir: Path) -> None:
    """Removes a previous run's items (with a `--seeds` run's runs), and nothing else the
    folder may hold: a link among them is removed, not what it links to."""
    items = seed_run_dirs(run_dir) + [run_dir / item for item in RUN_ITEMS]
    for path in items + sorted(run_dir.glob(EVENT_FILES)):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as e:
            raise UserError(f"cannot remove {path} to replace the run: {e.strerror or e}") from None


def discard_steps_after(run_dir: Path, step: int) -> None:
    """Removes the run's checkpoints (latest/ and best/) of later steps than `step`. Each is
    renamed first, as a temporary folder of Orbax's (which the next RunCheckpointer removes),
    so that a kill midway leaves no step folder that Orbax or digitjax would count."""
    for kind in (LATEST, BEST):
        folder = run_dir / kind
        later = [p for p in step_dirs(folder) if int(p.name) > step] if folder.is_dir() else []
        for path in later:
            discarded = path.with_name(f"{path.name}{ocp.utils.TMP_DIR_SUFFIX}-discarded")
            path.rename(discarded)
            shutil.rmtree(discarded)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds the run folder for this process (`filelocks`: released by the operating system
    when the process dies, however it dies, so a stale lock never blocks a later run)."""
    if "[" in str(run_dir.absolute()) or "]" in str(run_dir.absolute()):
        # Orbax merges each checkpoint's files by a pattern made of the path: under such a
        # path it finds none, and writes checkpoints that no one can read.
        raise UserError(
            f"--out {run_dir}: digitjax cannot write checkpoints under a path holding [ or ] "
            "(Orbax reads them as a pattern); choose another folder"
        )
    if run_dir.is_symlink() and not run_dir.exists():
        raise UserError(f"--out {run_dir} is a link to nothing, not a folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    created = not run_dir.exists()
    lock = contextlib.ExitStack()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.enter_context(filelocks.locked(run_dir / LOCK_FILE, wait=False))
    except filelocks.Held as e:
        raise UserError(
            f"{run_dir} is in use by another digitjax run (process {e.holder}); "
            "wait for it to end or stop it"
        ) from None
    except OSError as e:
        what = "create run folder" if created else "write in run folder"
        raise UserError(f"cannot {what} {run_dir}: {e.strerror}") from None
    try:
        yield
    finally:
        lock.close()
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(run_dir, ignore_errors=True)  # the run never started: leave no trace


# --- Writing -----------------------------------------------------------------------------


def state_checksums(state: Mapping[str, Any]) -> dict[str, str]:
    """A SHA-256 per top-level state item over every array's path, dtype, shape and bytes."""
    return {key: checksum(host_leaves(value)) for key, value in state.items()}


def host_leaves(tree: Any) -> dict[str, np.ndarray]:
    """A tree's leaves on the host, by '/'-joined path (of a sharded array, this process's
    first copy)."""
    return {
        path: np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        for path, leaf in leaves_by_path(tree).items()
    }


class RunCheckpointer:
    """Writes the latest and best checkpoints of one training run. Writes are synchronous,
    so a failure (a full disk) surfaces at the save that caused it, and the previous
    checkpoint of each kind stays until the new one is complete. `keep`: how many of each
    kind stay (a `--seeds` run keeps the one before too: digitjax/seeds.py)."""

    def __init__(self, run_dir: Path, keep: int = 1):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # the leftovers of a write cut short
            enable_async_checkpointing=False,
        )
        self.managers = {
            kind: ocp.CheckpointManager((run_dir / kind).absolute(), options=options)
            for kind in (LATEST, BEST)
        }
        self.failed = False  # a save failed: its last pieces may still land

    def save(
        self, kind: str, state: Mapping[str, Any], config: Config, summary: Mapping[str, Any]
    ) -> None:
        manager = self.managers[kind]
        step = int(state["step"].addressable_data(0))
        if manager.latest_step() == step:
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            summary=ocp.args.JsonSave({**summary, "checksums": state_checksums(state)}),
        )
        try:
            manager.save(step, args=args)
        except Exception as e:  # orbax wraps OS errors in its own types
            self.failed = True
            self._remove_partial_writes()
            previous = manager.latest_step()
            kept = f"step {previous} is kept" if previous is not None else "none was written"
            raise UserError(
                f"cannot write checkpoint {manager.directory / str(step)}: {reason(e)}; {kept}"
            ) from None

    def best_step(self) -> int | None:
        return self.managers[BEST].latest_step()

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
        # Again: a failed write's last pieces land late, from TensorStore's own threads (a
        # full disk once left an empty temporary folder behind a single sweep), so after a
        # failure the sweeps go on until one finds nothing after a pause.
        sweeps = LATE_WRITE_SWEEPS if self.failed else 1
        for _ in range(sweeps):
            if not self._remove_partial_writes() and self.failed:
                time.sleep(LATE_WRITE_PAUSE_S)
                if not self._remove_partial_writes():
                    break

    def _remove_partial_writes(self) -> bool:
        """Every save here is synchronous, so a temporary folder is a write that failed.
        Says whether there was one."""
        found = False
        for manager in self.managers.values():
            for tmp in Path(manager.directory).glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"):
                shutil.rmtree(tmp, ignore_errors=True)
                found = True
        return found


LATE_WRITE_SWEEPS, LATE_WRITE_PAUSE_S = 20, 0.05


def _quiet_late_callbacks() -> None:
    """When a read or write fails (a damaged file, a full disk), Orbax abandons its other reads
    or writes of that checkpoint. Some finish on TensorStore's threads and call back into
    Orbax's event loop, already closed; others are coroutines that raise when collected. Python
    reports each as unraisable, long after the one-line error has said it all (a server or a
    notebook that goes on would print TensorStore's spec of every array), so they are dropped
    here and nothing else is."""
    previous = sys.unraisablehook
    orbax_source = Path(ocp.__file__).parent

    def hook(unraisable: Any) -> None:
        value, source = unraisable.exc_value, unraisable.object
        loop_closed = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        abandoned = (
            inspect.iscoroutine(source) and orbax_source in Path(source.cr_code.co_filename).parents
        )
        if not (loop_closed or abandoned):
            previous(unraisable)

    sys.unraisablehook = hook


_quiet_late_callbacks()


# --- Reading -----------------------------------------------------------------------------


def _read_items(
    step_dir: Path,
    state_target: Any = None,
    with_state: bool = True,
    state_keys: tuple[str, ...] | None = None,
) -> dict:
    """The checkpoint's items, each checked: config and summary, and unless told otherwise the
    state: all of it, or only its `state_keys` that the checkpoint has (inference needs the
    weights, not the optimizer state: reading less makes a cold `predict` faster). Without a
    target the state lands on this process's first device, whatever devices wrote it (Orbax
    refuses to guess across topologies)."""
    if not all((step_dir / item).is_dir() for item in ITEMS):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (it lacks an item)")
    args: dict[str, Any] = {"config": ocp.args.JsonRestore(), "summary": ocp.args.JsonRestore()}
    if with_state and state_target is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = _saved_state_metadata(step_dir)
        if state_keys is not None and isinstance(saved, dict):
            saved = {key: saved[key] for key in state_keys if key in saved}
            if not saved:
                raise UserError(
                    f"{step_dir} keeps no {' or '.join(state_keys)} (a weights-only "
                    "checkpoint, such as the bundled model, keeps only the weights it evaluates)"
                )
        state_target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
        )
    if with_state and state_keys is not None:
        args["state"] = ocp.args.PyTreeRestore(
            item=state_target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(state_target),
            partial_restore=True,
        )
    elif with_state:
        args["state"] = ocp.args.StandardRestore(state_target)
    manager = ocp.CheckpointManager(step_dir.parent.absolute())
    try:
        restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for damaged files; all mean the same here
        raise _read_error(step_dir, e) from None
    finally:
        manager.close()
    items = dict(restored)
    check_summary(items["summary"], step_dir)
    if with_state:
        _verify_checksums(items, step_dir)
    return items


def _saved_state_metadata(step_dir: Path) -> Any:
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata((step_dir / "state").absolute()).item_metadata
    except Exception as e:
        raise _read_error(step_dir, e) from None
    if metadata is None:  # what Orbax returns for a damaged _METADATA or manifest
        raise UserError(f"corrupt checkpoint {step_dir}: its state's metadata is damaged")
    return metadata.tree


def _read_error(step_dir: Path, error: Exception) -> UserError:
    cause, root = reason(error), root_cause(error)
    if "ermission denied" in cause:
        return UserError(f"cannot read checkpoint {step_dir}: permission denied")
    if isinstance(root, LookupError | AttributeError | TypeError | JSONDecodeError):
        # Orbax parsing a damaged file; its own words ('key_type') would tell the user nothing.
        cause = f"a file of it is damaged ({type(root).__name__}: {cause})"
    return UserError(f"corrupt checkpoint {step_dir}: {cause}")


def _verify_checksums(items: dict[str, Any], step_dir: Path) -> None:
    saved = items["summary"].get("checksums", {})
    state = items["state"] if isinstance(items["state"], dict) else {}
    read = {key: host_leaves(value) for key, value in state.items() if key in saved}
    verify_checksums(items["summary"], read, step_dir)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """Leaves by their '/'-joined path, the same however the tree was restored: orbax turns
    sequence indices into string keys, and named tuples into dicts without a target."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _match_tree(saved: Any, expected: Any, what: str, where: Path) -> Any:
    """`saved` arranged as `expected`, after checking every path and shape ourselves:
    orbax can restore a partial tree silently."""
    got, want = leaves_by_path(saved), leaves_by_path(expected)
    got_shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
    check_shapes(got_shapes, {k: tuple(v.shape) for k, v in want.items()}, what, where)
    return jax.tree.unflatten(jax.tree.structure(expected), [got[k] for k in want])


def read_config(path: Path, kind: str = BEST) -> tuple[Config, dict]:
    """A checkpoint's config and summary, without reading its arrays."""
    step_dir = step_dir_of(path, kind)
    items = _read_items(step_dir, with_state=False)
    return config_of(items["config"], step_dir), items["summary"]


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    config: Config
    graphdef: Any
    params: dict[str, Any]
    summary: dict
    step_dir: Path
    # Divides the logits before the softmax so that the probabilities are calibrated; None for
    # checkpoints without one (older ones, runs without held-out images, the raw weights of a
    # run that evaluates their average): the plain softmax.
    temperature: float | None = None
    # Says which images do not look like digits (`detector.py`); None for checkpoints without
    # one (all but the bundled model and runs that ask for it).
    detector: NonDigitDetector | None = None


def restore_model(path: Path, kind: str = BEST, average: bool = True) -> TrainedModel:
    """A model for evaluation or prediction, its params checked against its saved config:
    the moving average of the weights if the run kept one and `average`, else the weights."""
    from digitjax.model import abstract_model

    step_dir = step_dir_of(path, kind)
    weights = ("ema_params", "params") if average else ("params",)
    items = _read_items(step_dir, state_keys=weights)
    config = config_of(items["config"], step_dir)
    graphdef, expected = abstract_model(config, items["summary"]["num_classes"])
    kept, temperature, detector = chosen_weights(config, items["summary"], average, step_dir)
    params = items["state"].get(kept) if isinstance(items["state"], dict) else None
    if params is None:
        raise UserError(f"{step_dir} is not a digitjax checkpoint (no {kept})")
    params = _match_tree(params, expected, "its config's model", step_dir)
    return TrainedModel(config, graphdef, params, items["summary"], step_dir, temperature, detector)


def initial_params(path: Path, expected: Any) -> Any:
    """The weights a fine-tune starts from (--init-from): those that the run at `path`
    evaluates, from its best checkpoint, as host arrays laid out as `expected` (this run's
    model); a model of another shape or class count is refused."""
    model = restore_model(path)
    params = jax.tree.map(np.asarray, model.params)
    return _match_tree(params, expected, "this run's model (--channels, --dense)", model.step_dir)


def restore_state(run_dir: Path, abstract_state: Any) -> tuple[Any, dict]:
    """The full training state of the latest checkpoint, for resuming, placed as
    `abstract_state`'s shardings say; its layout is checked before anything is read."""
    step_dir = step_dir_of(run_dir, LATEST)
    saved = _saved_state_metadata(step_dir)
    if not isinstance(saved, dict) or "params" not in saved or "opt_state" not in saved:
        raise UserError(f"{step_dir} is not a digitjax training checkpoint")
    _match_tree(saved["params"], abstract_state["params"], "its config's model", step_dir)
    saved_shapes, wanted_shapes = (
        {path: tuple(leaf.shape) for path, leaf in leaves_by_path(tree).items()}
        for tree in (saved, abstract_state)
    )
    if saved_shapes != wanted_shapes:
        raise UserError(
            f"cannot resume {step_dir}: its optimizer state is laid out as an older digitjax "
            "wrote it; start a new run (evaluate and predict still read this checkpoint)"
        )
    items = _read_items(step_dir, abstract_state)
    return items["state"], items["summary"]

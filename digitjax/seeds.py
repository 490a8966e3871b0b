"""`digitjax train --seeds 0,1,2,3`: one model per seed, trained by one compiled program (the
parameters, optimizer state, example orders and random numbers of every seed stacked, the data
on the device once; `train.make_train_chunk`), and the ensemble of their models.

A run folder of this kind holds SEEDS_FILE, the record that names its seeds, and one ordinary
run per seed in `seed-<seed>/` (latest/, best/, metrics.jsonl, curves.png; its config is the
run's but for its seed), which `evaluate`, `predict --checkpoint` and `export` use as any run.
`evaluate` of the whole folder reports each seed and their ensemble: the mean of the seeds'
calibrated probabilities.

Every seed is at the same step, but the seeds' checkpoints are written one after another, so a
kill can leave the seeds that were saved first one checkpoint ahead of the others. Each seed's
run keeps the checkpoint before its latest (and before its best), and a resume first discards
every checkpoint past the step that all the seeds have, then goes on from there: the seeds
ahead compute again, exactly, the step they had reached.
"""

import contextlib
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from jax.sharding import Mesh

from digitjax import checkpoint
from digitjax.config import Config, UserError, check_seeds
from digitjax.data import Dataset, load_dataset
from digitjax.distributed import make_mesh
from digitjax.evaluate import (
    Evaluation,
    calibrated_softmax,
    compute_metrics,
    evaluate_checkpoint,
    evaluation_data,
    make_logits_fn,
    pad_to_batches,
    split_logits,
)
from digitjax.outputs import write_file
from digitjax.runs import LATEST, SEED_PREFIX, SEEDS_FILE, seed_run_dirs, usable_steps
from digitjax.tracking import RunTracker
from digitjax.train import (
    Callbacks,
    TrainResult,
    prepare_stoppable,
    resolve_config,
    run_session,
    train_runs,
)
from digitjax.train import train as train_one


class SeedsResult(TypedDict):
    """What `train --seeds` returns (and `train --json` prints)."""

    seeds: list[int]
    runs: list[TrainResult]  # each seed's, in the order of `seeds`
    best_test_accuracy: dict[str, Any]  # "each" seed's, their "mean" and "std" (None for one)
    wall_seconds: float


def is_multi_seed_run(run_dir: Path) -> bool:
    return (run_dir / SEEDS_FILE).is_file()


def seed_run_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / f"{SEED_PREFIX}{seed}"


def read_seeds(run_dir: Path) -> tuple[int, ...]:
    try:
        seeds = json.loads((run_dir / SEEDS_FILE).read_text())["seeds"]
        return check_seeds(tuple(seeds))
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{run_dir / SEEDS_FILE} is damaged ({e}): not a --seeds run") from None


def train(
    requested: Config,
    run_dir: Path,
    *,
    seeds: tuple[int, ...] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    given: frozenset[str] = frozenset(),
    callbacks: Callbacks | None = None,
    dataset: Dataset | None = None,
    mesh: Mesh | None = None,
    profile: Path | None = None,
) -> "TrainResult | SeedsResult":
    """`train.train`; with `seeds`, or to resume a run that has them, `train_seeds`."""
    options: dict[str, Any] = {"resume": resume, "overwrite": overwrite, "given": given}
    options.update(callbacks=callbacks, dataset=dataset, profile=profile)
    if seeds is None and not (resume and is_multi_seed_run(run_dir)):
        return train_one(requested, run_dir, mesh=mesh, **options)
    return train_seeds(requested, run_dir, seeds, mesh=mesh or make_mesh(), **options)


def evaluate_run(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    latest: bool = False,
) -> Evaluation:
    """`evaluate_checkpoint`, or for a `--seeds` run's folder, `evaluate_seeds`."""
    if is_multi_seed_run(Path(path)):
        return evaluate_seeds(Path(path), split, dataset, data_dir, latest)
    return evaluate_checkpoint(path, split, dataset, data_dir, latest)


def train_seeds(
    requested: Config,
    run_dir: Path,
    seeds: tuple[int, ...] | None,
    *,
    resume: bool,
    overwrite: bool,
    given: frozenset[str],
    callbacks: Callbacks | None,
    dataset: Dataset | None,
    mesh: Mesh,
    profile: Path | None,
) -> SeedsResult:
    """`train.train` with `seeds` (None: those of the run resumed); the first seed's run is
    the one traced into `profile`."""
    if "seed" in given:
        raise UserError("pass --seed or --seeds, not both")
    profiled = RunTracker(profile)  # checks --profile before any work
    with run_session(run_dir) as received_signal:
        seeds, restart_step = _check_run_dir(run_dir, seeds, resume, overwrite)
        folders = [seed_run_dir(run_dir, seed) for seed in seeds]
        # The saved config rules on resume: that of the first seed that has one.
        saved = next((f for f in folders if usable_steps(f / LATEST)), None) if resume else None
        config = resolve_config(saved or run_dir, requested, saved is not None, given)
        config = dataclasses.replace(config, seed=seeds[0])
        data = dataset or load_dataset(config.dataset, config.data_dir)
        setup = prepare_stoppable(config, data, mesh, seeds)
        # Read before the folders are touched: a bad --init-from is an input error.
        fresh_state = setup.init_state() if restart_step is None else None
        # Only now, with every input checked, may the folders change.
        _prepare_folders(run_dir, seeds, folders, restart_step)
        with contextlib.ExitStack() as locks:
            for folder in folders:  # each seed's run is a run: another `train` must not write it
                locks.enter_context(checkpoint.run_lock(folder))
            trackers = [profiled] + [RunTracker() for _ in folders[1:]]
            runs = list(zip(folders, trackers, strict=True))
            results = train_runs(setup, run_dir, runs, fresh_state, callbacks, received_signal)
    accuracies = [result["best"]["test_accuracy"] for result in results if result["best"]]
    return {
        "seeds": list(seeds),
        "runs": results,
        "best_test_accuracy": {
            "each": accuracies,
            "mean": statistics.fmean(accuracies) if accuracies else None,
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
        },
        "wall_seconds": max(result["wall_seconds"] for result in results),
    }


def _check_run_dir(
    run_dir: Path, seeds: tuple[int, ...] | None, resume: bool, overwrite: bool
) -> tuple[tuple[int, ...], int | None]:
    """The seeds, and the step that the seeds' runs go on from (None: a new start)."""
    if not resume:
        checkpoint.check_run_dir(run_dir, resume, overwrite)
        return check_seeds(seeds or ()), None
    if overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if not is_multi_seed_run(run_dir):
        raise UserError(f"{run_dir} holds no --seeds run to resume")
    saved = read_seeds(run_dir)
    if seeds is not None and seeds != saved:
        raise UserError(f"cannot resume with different --seeds: the run has {list(saved)}")
    steps = [[int(p.name) for p in usable_steps(seed_run_dir(run_dir, s) / LATEST)] for s in saved]
    if not any(steps):
        raise checkpoint.nothing_to_resume(run_dir)
    if not all(steps):
        return saved, None  # killed while the first checkpoints were written: start again
    common = min(max(each) for each in steps)
    for seed, each in zip(saved, steps, strict=True):
        if common not in each:
            raise UserError(
                f"cannot resume {run_dir}: {seed_run_dir(run_dir, seed)} lacks the checkpoint "
                f"of step {common} that the other seeds are at"
            )
    return saved, common


def _prepare_folders(
    run_dir: Path, seeds: tuple[int, ...], folders: list[Path], restart_step: int | None
) -> None:
    """A new run: the previous one removed (--overwrite), then the record of the seeds, then
    their folders. A resumed one: every seed's checkpoints past `restart_step` discarded."""
    if restart_step is None:
        checkpoint.prepare_run_dir(run_dir, resume=False)
        write_file(run_dir / SEEDS_FILE, (json.dumps({"seeds": list(seeds)}) + "\n").encode())
    for folder in folders:
        checkpoint.prepare_run_dir(folder, resume=restart_step is not None)
        if restart_step is not None:
            checkpoint.discard_steps_after(folder, restart_step)


def evaluate_seeds(
    run_dir: Path, split: str, dataset: str | None, data_dir: str | None, latest: bool
) -> Evaluation:
    """Each seed's model's metrics, and those of their ensemble: the mean of the seeds'
    calibrated probabilities (the plain softmax's for a seed without a temperature)."""
    kind = checkpoint.LATEST if latest else checkpoint.BEST
    seeds = read_seeds(run_dir)
    folders = seed_run_dirs(run_dir)
    if [f.name for f in folders] != [seed_run_dir(run_dir, s).name for s in sorted(seeds)]:
        raise UserError(f"{run_dir} lacks the run of some of its seeds {list(seeds)}")
    models = [checkpoint.restore_model(folder, kind) for folder in folders]
    recipes = {dataclasses.replace(model.config, seed=0) for model in models}
    if len(recipes) > 1:
        raise UserError(f"the runs in {run_dir} differ in more than their seed")
    data = evaluation_data(models[0], dataset, data_dir)
    images, labels = data.split(split)
    padded, logits_fn = pad_to_batches(images), make_logits_fn(models[0].graphdef)
    each, probabilities = [], []
    for model in models:
        logits = split_logits(logits_fn, model.params, padded, len(labels))
        metrics = compute_metrics(logits, labels, data.class_names, model.temperature)
        each.append(Evaluation(model.step_dir, data.name, split, metrics, images, labels))
        probabilities.append(calibrated_softmax(logits, model.temperature))
    # As logits, the log of the mean probabilities give back those probabilities.
    mean = np.maximum(np.mean(probabilities, axis=0), np.finfo(np.float64).tiny)
    ensemble = compute_metrics(np.log(mean), labels, data.class_names)
    return Evaluation(run_dir, data.name, split, ensemble, images, labels, tuple(each))

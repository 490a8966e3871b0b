"""`digitjax train --seeds`: each seed's run equals its single-seed run, the seeds differ, each
seed's folder is an ordinary run, `evaluate` of the whole run reports the ensemble, and a
signal or a kill between the seeds' saves is repaired on resume."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from helpers import (
    assert_one_line_error,
    history,
    read_events,
    run_digitjax,
    signal_until_each_lands,
    steps_and_values,
    tiny_train,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.cli import app
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh, put_replicated
from digitjax.inference.classifier import NUM_DIGITS, CheckpointClassifier
from digitjax.train import TrainingSetup, make_train_chunk, prepare_training

runner = CliRunner()
EPOCHS = 2
SEEDS = (0, 1, 2)


def seeds_train(tiny_mnist: Path, run_dir: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    seeds = ",".join(map(str, SEEDS))
    return tiny_train(tiny_mnist, run_dir, "--seeds", seeds, *extra, epochs=epochs)


def train_ok(flags: list[str]) -> None:
    result = runner.invoke(app, flags)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def seeds_run(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("seeds") / "run"
    train_ok(seeds_train(tiny_mnist, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def single_runs(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("single")
    for seed in SEEDS:
        train_ok(tiny_train(tiny_mnist, folder / str(seed), "--seed", str(seed), epochs=EPOCHS))
    return {seed: folder / str(seed) for seed in SEEDS}


def test_each_seed_equals_its_single_seed_run(seeds_run: Path, single_runs: dict[int, Path]):
    """On a CPU the seeds run one after another in the program: bit for bit a lone seed's."""
    assert json.loads((seeds_run / "seeds.json").read_text()) == {"seeds": list(SEEDS)}
    for seed, single in single_runs.items():
        seed_dir = seeds_run / f"seed-{seed}"
        assert history(seed_dir) == history(single)
        config, _ = checkpoint.read_config(seed_dir)
        assert config == checkpoint.read_config(single)[0]
        got, expected = (checkpoint.restore_model(run).params for run in (seed_dir, single))
        for got_leaf, expected_leaf in zip(
            checkpoint.leaves_by_path(got).values(),
            checkpoint.leaves_by_path(expected).values(),
            strict=True,
        ):
            np.testing.assert_array_equal(got_leaf, expected_leaf)
        assert (seed_dir / "curves.png").is_file()
    losses = {history(seeds_run / f"seed-{seed}")[-1]["test_loss"] for seed in SEEDS}
    assert len(losses) == len(SEEDS), "every seed must train a different model"


def test_each_seed_has_the_events_of_its_single_seed_run(seeds_run, single_runs):
    """TensorBoard shows each seed as its own run, with its own settings and curves."""
    for seed, single in single_runs.items():
        got, expected = read_events(seeds_run / f"seed-{seed}"), read_events(single)
        for tag in ("train/loss", "train/learning_rate", "test/accuracy", "test/ece"):
            assert steps_and_values(got, tag) == steps_and_values(expected, tag), tag
        content = got.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        settings = HParamsPluginData.FromString(content).session_start_info.hparams
        assert settings["seed"].number_value == seed
    assert not list(seeds_run.glob("events.out.tfevents.*")), "the seeds' folders hold them"


BATCHED_SEEDS = (0, 1, 2, 3)


def batching_config(tiny_mnist: Path) -> Config:
    """A small model, with non-digits: each seed draws its own from the one copy on the
    device."""
    return Config(
        data_dir=str(tiny_mnist),
        channels=(4, 8),
        dense=16,
        non_digit_fraction=0.25,
        non_digit_images=40,
    )


def first_steps(setup: TrainingSetup, chunk: Any) -> Any:
    """The state after the first 20 steps of `setup`'s run(s) through `chunk`."""
    order = put_replicated(setup.epoch_orders(0), setup.mesh)
    data = (setup.train_images, setup.train_labels, order, 20, setup.non_digit_images)
    return chunk(setup.init_state(), *data)


@pytest.fixture(scope="module")
def lone_seeds_first_steps(tiny_mnist: Path) -> dict[int, Any]:
    """Each of BATCHED_SEEDS trained alone for 20 steps (for both batchings' test)."""
    config, dataset = batching_config(tiny_mnist), load_dataset("mnist", str(tiny_mnist))
    states = {}
    for seed in BATCHED_SEEDS:
        alone = prepare_training(dataclasses.replace(config, seed=seed), dataset, make_mesh(1))
        states[seed] = first_steps(alone, alone.train_chunk)
    return states


@pytest.mark.parametrize("batching", ["map", "vmap"])
def test_each_batching_trains_every_seed_as_alone(
    tiny_mnist: Path, lone_seeds_first_steps: dict[int, Any], batching: str
):
    """Both ways of training the seeds in one program, against lone seeds, for 20 steps.
    "vmap" batches every matmul over the seeds, which XLA may sum in another order: float32
    rounding (~1e-7 relative per operation; 3.6e-7 at most in the default model's weights
    after 89 steps, measured). Another seed's randomness changes them by far more."""
    config, dataset = batching_config(tiny_mnist), load_dataset("mnist", str(tiny_mnist))
    together = prepare_training(config, dataset, make_mesh(1), BATCHED_SEEDS)
    chunk = make_train_chunk(
        config, together.schedule, together.graphdef, together.tx, None, BATCHED_SEEDS, batching
    )
    state = first_steps(together, chunk)
    for index, seed in enumerate(BATCHED_SEEDS):
        expected = lone_seeds_first_steps[seed]
        got = together.run_state(state, index)
        for got_leaf, expected_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            if batching == "map":
                np.testing.assert_array_equal(got_leaf, expected_leaf)
            else:
                np.testing.assert_allclose(got_leaf, expected_leaf, rtol=1e-5, atol=1e-6)
    first, second = (together.run_state(state, i)["params"] for i in (0, 1))
    assert not np.allclose(jax.tree.leaves(first)[0], jax.tree.leaves(second)[0])


def test_evaluate_reports_each_seed_and_the_ensemble(seeds_run: Path, tiny_mnist: Path):
    result = runner.invoke(app, ["evaluate", str(seeds_run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    images, labels = load_dataset("mnist", str(tiny_mnist)).split("test")
    probabilities = []
    for seed, each in zip(SEEDS, report["seeds"], strict=True):
        seed_dir = seeds_run / f"seed-{seed}"
        alone = json.loads(runner.invoke(app, ["evaluate", str(seed_dir), "--json"]).stdout)
        assert each == alone
        # The ensemble checked through another path: the classifier that predict uses.
        probabilities.append(CheckpointClassifier(seed_dir).outputs(images / 255.0)[:, :NUM_DIGITS])
    mean = np.mean(probabilities, axis=0)
    assert report["accuracy"] == pytest.approx(float((mean.argmax(1) == labels).mean()))
    nll = -np.log(mean[np.arange(len(labels)), labels]).mean()
    assert report["loss"] == pytest.approx(nll, rel=1e-4)
    text = runner.invoke(app, ["evaluate", str(seeds_run)])
    assert text.exit_code == 0
    said = " ".join(text.stdout.split())  # as wrapped at 80 columns
    assert "their ensemble (the mean of their calibrated probabilities)" in said


def test_an_ensemble_without_temperatures_is_not_called_calibrated(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    train_ok(seeds_train(tiny_mnist, run_dir, "--calibration-fraction", "0", epochs=1))
    said = " ".join(runner.invoke(app, ["evaluate", str(run_dir)]).stdout.split())
    assert "the mean of their probabilities: plain softmax, they have no temperature" in said


def test_each_seed_is_an_ordinary_run(seeds_run: Path, tmp_path: Path, user_image_files):
    seed_dir = seeds_run / "seed-1"
    predicted = run_digitjax("predict", "--checkpoint", str(seed_dir), str(user_image_files[0]))
    assert predicted.returncode == 0, predicted.stderr
    exported = runner.invoke(app, ["export", str(seed_dir), "--out", str(tmp_path / "m.stablehlo")])
    assert exported.exit_code == 0, exported.output
    whole = run_digitjax("predict", "--checkpoint", str(seeds_run), str(user_image_files[0]))
    assert whole.returncode == 1
    assert_one_line_error(whole.stderr, "holds one run per seed (seed-0, seed-1, seed-2)")


def test_the_newest_run_by_default(seeds_run: Path, tmp_path: Path, user_image_files):
    """evaluate: the ensemble; predict (and serve, export): the first seed's model."""
    shutil.copytree(seeds_run, tmp_path / "checkpoints" / "run")
    evaluated = run_digitjax("evaluate", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert len(json.loads(evaluated.stdout)["seeds"]) == len(SEEDS)
    predicted = run_digitjax("predict", str(user_image_files[0]), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert "checkpoints/run/seed-0/best" in predicted.stdout


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seed", "3"], "pass --seed or --seeds, not both"),
        (["--seeds", "1,1"], "takes distinct seeds"),
        (["--seeds", "0,x"], "takes comma-separated seeds"),
    ],
)
def test_bad_seeds_are_one_line_errors(tiny_mnist: Path, tmp_path: Path, extra, fragment):
    result = runner.invoke(app, [*seeds_train(tiny_mnist, tmp_path / "run"), *extra])
    assert result.exit_code != 0
    assert_one_line_error(result.stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_several_devices_are_refused_with_one_line(tiny_mnist: Path, tmp_path: Path):
    flags = seeds_train(tiny_mnist, tmp_path / "run")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = run_digitjax(*flags, env=env)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "--seeds trains on one device (4 are in use)")


def test_resume_refuses_other_seeds_and_a_finished_run_stays(seeds_run: Path):
    before = history(seeds_run / "seed-0")
    result = runner.invoke(app, ["train", "--out", str(seeds_run), "--resume", "--seeds", "0,1"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "cannot resume with different --seeds")
    again = runner.invoke(app, ["train", "--out", str(seeds_run), "--seeds", "0,1"])
    assert again.exit_code == 1
    assert_one_line_error(again.stderr, "already holds a run")
    assert history(seeds_run / "seed-0") == before


def _latest_steps(run_dir: Path) -> dict[int, list[int]]:
    return {
        seed: [int(p.name) for p in checkpoint.usable_steps(run_dir / f"seed-{seed}" / "latest")]
        for seed in SEEDS
    }


LONG_EPOCHS = 12  # long enough to interrupt many times


@pytest.fixture(scope="module")
def long_run(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of LONG_EPOCHS, for the interrupted ones to end as."""
    run_dir = tmp_path_factory.mktemp("long") / "run"
    train_ok(seeds_train(tiny_mnist, run_dir, epochs=LONG_EPOCHS))
    return run_dir


def assert_ends_as(run_dir: Path, reference: Path) -> None:
    """Every seed ended exactly as in the uninterrupted run, its best/ newest checkpoint is the
    step its summary calls best, and no temporary folder is left."""
    for seed in SEEDS:
        seed_dir, expected = run_dir / f"seed-{seed}", reference / f"seed-{seed}"
        assert history(seed_dir) == history(expected)
        summary = checkpoint.read_config(seed_dir, checkpoint.LATEST)[1]
        assert summary["history"] == history(expected)
        best = [p.name for p in checkpoint.usable_steps(seed_dir / "best")]
        assert best[-1] == str(summary["best"]["step"])
        assert not list(seed_dir.glob("*/*tmp*"))
        got, want = (checkpoint.restore_model(run).params for run in (seed_dir, expected))
        for got_leaf, want_leaf in zip(
            checkpoint.leaves_by_path(got).values(), checkpoint.leaves_by_path(want).values()
        ):
            np.testing.assert_array_equal(got_leaf, want_leaf)


def start(tiny_mnist: Path, run_dir: Path) -> subprocess.Popen:
    command = ["train", "--out", str(run_dir), "--resume"]
    if not checkpoint.has_checkpoint(run_dir):
        command = seeds_train(tiny_mnist, run_dir, "--overwrite", epochs=LONG_EPOCHS)
    return subprocess.Popen(
        ["digitjax", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_sigterm_saves_every_seed_then_resume_matches(long_run: Path, tiny_mnist, tmp_path):
    run_dir = tmp_path / "interrupted"
    process = start(tiny_mnist, run_dir)
    deadline = time.monotonic() + 300
    while not checkpoint.usable_steps(run_dir / f"seed-{SEEDS[-1]}" / "latest"):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    # Each seed's run is locked as a run: resuming one alone meanwhile is refused.
    alone = runner.invoke(app, ["train", "--out", str(run_dir / "seed-0"), "--resume"])
    assert alone.exit_code == 1
    assert_one_line_error(alone.stderr, "is in use by another digitjax run")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM at step" in stderr and "Traceback" not in stderr
    newest = {seed: steps[-1] for seed, steps in _latest_steps(run_dir).items()}
    assert len(set(newest.values())) == 1, newest  # every seed saved at the one step
    assert len(history(run_dir / "seed-0")) < LONG_EPOCHS, "stopped before the end"
    # The settings are the saved ones: --resume alone finishes the run.
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    assert_ends_as(run_dir, long_run)


@pytest.mark.slow
def test_chaos_kills_and_signals_never_lose_a_seed(long_run: Path, tiny_mnist, tmp_path):
    """As test_reliability's chaos test for one seed: kill -9, SIGINT and SIGTERM at random
    (seeded) moments, some while a seed's checkpoint is being written; resuming after each,
    every seed ends exactly as in the uninterrupted run."""
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    events = [
        (signal.SIGKILL, "write"),
        (signal.SIGTERM, "time"),
        (signal.SIGKILL, "time"),
        (signal.SIGKILL, "write"),
        (signal.SIGINT, "write"),
    ]

    def writing() -> bool:
        return bool(list(run_dir.glob("seed-*/*/*.orbax-checkpoint-tmp*")))

    def start_or_resume() -> subprocess.Popen:
        return start(tiny_mnist, run_dir)

    signal_until_each_lands(events, start_or_resume, writing, run_dir, rng, (2.0, 8.0))
    final = start(tiny_mnist, run_dir)
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    assert_ends_as(run_dir, long_run)


@pytest.mark.slow
def test_a_kill_between_the_seeds_saves_is_repaired(seeds_run: Path, tiny_mnist, tmp_path):
    """A kill after the first seeds saved an epoch end and before the others did: seed 0 has
    the last epoch, the others not. Resume goes back to the step they all have, and ends as
    the uninterrupted run did."""
    run_dir = tmp_path / "run"
    shutil.copytree(seeds_run, run_dir)
    steps = _latest_steps(run_dir)
    assert all(len(each) == 2 for each in steps.values()), steps  # the one before is kept
    last = steps[0][-1]
    for seed in SEEDS[1:]:
        for kind in ("latest", "best"):
            shutil.rmtree(run_dir / f"seed-{seed}" / kind / str(last), ignore_errors=True)
        records = history(run_dir / f"seed-{seed}")[:-1]
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (run_dir / f"seed-{seed}" / "metrics.jsonl").write_text(lines)
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    for seed in SEEDS:
        assert history(run_dir / f"seed-{seed}") == history(seeds_run / f"seed-{seed}")
        assert _latest_steps(run_dir)[seed][-1] == last
        assert not list((run_dir / f"seed-{seed}" / "latest").glob("*tmp*"))
    summary = json.loads(result.stdout)
    assert summary["seeds"] == list(SEEDS) and len(summary["runs"]) == len(SEEDS)


@pytest.mark.slow
def test_a_kill_before_every_seed_had_a_checkpoint_starts_again(seeds_run: Path, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(seeds_run, run_dir)
    for seed in SEEDS[1:]:
        shutil.rmtree(run_dir / f"seed-{seed}")
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    for seed in SEEDS:
        assert history(run_dir / f"seed-{seed}") == history(seeds_run / f"seed-{seed}")

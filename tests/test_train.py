import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import MNIST_DIR, assert_one_line_error, history, tiny_train, trained_tiny_run
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.cli import app
from digitjax.compilation import xla_options
from digitjax.config import Config, Interrupted, uses_ema
from digitjax.data import load_dataset, read_idx_split
from digitjax.distributed import make_mesh
from digitjax.model import abstract_model, apply, initial_params, normalize
from digitjax.train import (
    Callbacks,
    Schedule,
    chunk_lengths,
    epoch_order,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    prepare_training,
    train,
)

runner = CliRunner()
EPOCHS = 30  # long enough to interrupt mid-run, a few seconds in all


def test_chunk_lengths_cover_the_rest_of_the_epoch():
    schedule = Schedule(num_train=1000, batch_size=10, epochs=3)  # 100 steps per epoch
    assert chunk_lengths(0, schedule, 10) == [10] * 10
    assert chunk_lengths(100, schedule, 10) == [10] * 10
    assert chunk_lengths(35, schedule, 10) == [10] * 6 + [5]  # resumed mid-chunk
    assert chunk_lengths(0, schedule, 7) == [15] * 6 + [10]
    assert chunk_lengths(0, Schedule(30, 10, 1), 10) == [1, 1, 1]  # never more chunks than steps


def test_epoch_order_is_a_fixed_permutation_per_seed_and_epoch():
    first = epoch_order(0, 0, 1000)
    assert sorted(first.tolist()) == list(range(1000)) and first.dtype == np.int32
    np.testing.assert_array_equal(first, epoch_order(0, 0, 1000))
    assert not np.array_equal(first, epoch_order(0, 1, 1000))
    assert not np.array_equal(first, epoch_order(1, 0, 1000))


def test_one_train_step_matches_a_reference_written_out_by_hand():
    """The step's loss, label smoothing, AdamW update, moving average and running totals,
    against the same step computed directly with optax and the plain `lax.conv` model."""
    config = Config(channels=(4, 8), dense=16, ema_decay=0.9, label_smoothing=0.1)
    schedule = Schedule(num_train=640, batch_size=64, epochs=1)
    tx = make_optimizer(config, schedule)
    graphdef, param_shapes = abstract_model(config)
    state = init_state(config, tx, param_shapes)
    images, labels = read_idx_split(MNIST_DIR, "train")
    images, labels = normalize(jnp.asarray(images[:64])), jnp.asarray(labels[:64])
    # Past the warmup, so that the learning rate is not zero.
    state = {**state, "step": jnp.asarray(5, jnp.int32)}
    new = jax.jit(make_train_step(config, graphdef, tx))(state, images, labels)

    def loss_fn(params):
        logits = apply(graphdef, params, images)
        targets = jax.nn.one_hot(labels, 10) * 0.9 + 0.1 / 10
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, _ = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = min(0.9, 6 / 15)  # the moving average's warm-up at step 5
    for got, want in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    for got, old, trained in zip(
        jax.tree.leaves(new["ema_params"]),
        jax.tree.leaves(state["params"]),
        jax.tree.leaves(params),
    ):
        np.testing.assert_allclose(got, decay * old + (1 - decay) * trained, rtol=1e-4, atol=1e-6)
    assert int(new["step"]) == 6
    np.testing.assert_allclose(new["epoch_totals"]["loss"], 64 * loss, rtol=1e-5)
    assert int(new["epoch_totals"]["correct"]) == int((logits.argmax(-1) == labels).sum())
    assert int(new["epoch_totals"]["count"]) == 64


@pytest.mark.parametrize("preset", [None, "fast", "best"])
def test_a_fresh_state_is_the_one_the_optimizer_makes(tiny_mnist: Path, preset: str | None):
    """`init_state` makes the state on the host, its optimizer's as zeros: exactly what
    `tx.init` makes, leaf for leaf, and shaped as the chunk's own output, so that the
    second chunk runs the program the first compiled."""
    config = dataclasses.replace(Config.from_flags({}, preset), channels=(4, 8), dense=16)
    setup = prepare_training(config, load_dataset("mnist", str(tiny_mnist)), make_mesh(1))
    fresh = setup.init_state()
    want = jax.jit(setup.tx.init)(fresh["params"])
    assert jax.tree.structure(fresh["opt_state"]) == jax.tree.structure(want)
    for got, wanted in zip(jax.tree.leaves(fresh["opt_state"]), jax.tree.leaves(want)):
        assert jax.typeof(got).weak_type == jax.typeof(wanted).weak_type
        np.testing.assert_array_equal(got, wanted, strict=True)  # shapes and dtypes too
    params = initial_params(setup.param_shapes, config.seed)
    jax.tree.map(np.testing.assert_array_equal, fresh["params"], params)
    assert ("ema_params" in fresh) == uses_ema(config)
    # As every checkpoint written so far holds them.
    assert fresh["step"].dtype == np.int32
    assert {t.dtype for t in fresh["epoch_totals"].values()} == {np.dtype(np.float32)}
    order = epoch_order(0, 0, setup.schedule.num_train)
    trained = setup.train_chunk(fresh, setup.train_images, setup.train_labels, order, 2)
    assert jax.tree.map(jax.typeof, trained) == jax.tree.map(jax.typeof, setup.init_state())


@pytest.mark.parametrize("preset", [None, "fast", "robust"])
def test_a_chunk_draws_random_keys_only_when_it_uses_them(tiny_mnist: Path, preset: str | None):
    """Nothing random (`--preset fast`: no augmentation, no non-digits): the chunk traces no
    key, whose hashes cost lowering time at every cold start; the default (random shifts) and
    `robust` (non-digits too) draw theirs."""
    config = dataclasses.replace(Config.from_flags({}, preset), channels=(4, 8), dense=16)
    setup = prepare_training(config, load_dataset("mnist", str(tiny_mnist)), make_mesh(1))
    order = epoch_order(0, 0, setup.schedule.num_train)
    args = (setup.train_images, setup.train_labels, order, 2, setup.non_digit_images)
    jaxpr = str(setup.train_chunk.trace(setup.init_state(), *args).jaxpr)
    assert ("random_fold_in" in jaxpr) == (preset != "fast")


@pytest.mark.parametrize("setting", [{"adam_beta2": 0.999}, {"adam_nesterov": False}])
def test_adam_settings_are_the_optimizers(setting: dict):
    """`--adam-beta2` is AdamW's b2 and `--adam-nesterov` its Nesterov momentum: two updates
    (the first does not depend on b2) equal optax's own with those settings, and differ from
    those with either setting at its default."""
    schedule = Schedule(num_train=640, batch_size=64, epochs=1)
    params = {"w": jnp.ones(3)}
    grads = [{"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([-0.5, 1.0, 3.0])}]

    def second_update(tx: optax.GradientTransformation) -> np.ndarray:
        opt_state = tx.init(params)
        for grad in grads:
            updates, opt_state = tx.update(grad, opt_state, params)
        return np.asarray(updates["w"])

    config = Config(adam_beta2=0.5, adam_nesterov=True, warmup_epochs=0)
    rate = learning_rate_schedule(config, schedule)
    adamw = optax.adamw(rate, b2=0.5, weight_decay=config.weight_decay, nesterov=True)
    want = second_update(adamw)
    np.testing.assert_allclose(second_update(make_optimizer(config, schedule)), want, rtol=1e-6)
    default = make_optimizer(dataclasses.replace(config, **setting), schedule)
    assert np.abs(second_update(default) - want).max() > 1e-4


def train_flags(tiny_mnist: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_train(tiny_mnist, run_dir, *extra, epochs=EPOCHS)


@pytest.fixture(scope="module")
def reference_run(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_tiny_run(tiny_mnist, tmp_path_factory.mktemp("reference"), epochs=EPOCHS)


def test_run_writes_checkpoints_metrics_and_curves(reference_run: Path):
    summary = history(reference_run)
    assert [r["epoch"] for r in summary] == list(range(1, EPOCHS + 1))
    assert summary[-1]["test_accuracy"] > 0.85  # a tiny model on 2k real digits
    assert summary[-1]["train_loss"] < summary[0]["train_loss"]
    for kind in ("latest", "best"):
        steps = [p.name for p in (reference_run / kind).iterdir()]
        assert len(steps) == 1 and steps[0].isdigit()
    best = max(summary, key=lambda r: r["test_accuracy"])
    assert (reference_run / "best" / str(best["step"])).is_dir()
    assert (reference_run / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_mnist: Path, tmp_path: Path):
    def run(name: str, *extra: str) -> list[dict]:
        flags = tiny_train(tiny_mnist, tmp_path / name, *extra, epochs=3)
        assert runner.invoke(app, flags).exit_code == 0
        return history(tmp_path / name)

    assert run("first") == run("second")
    assert run("other-seed", "--seed", "1") != run("first-again")


def _start_and_wait_for_checkpoint(tiny_mnist: Path, run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        ["digitjax", *train_flags(tiny_mnist, run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.isdigit() and int(p.name) >= 64 for p in run_dir.glob("latest/*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    return process


def _resume(run_dir: Path) -> None:
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted_run(reference_run, tiny_mnist, tmp_path):
    run_dir = tmp_path / "killed"
    process = _start_and_wait_for_checkpoint(tiny_mnist, run_dir)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert len(history(run_dir)) < EPOCHS, "killed before the end"
    _resume(run_dir)
    assert history(run_dir) == history(reference_run)


@pytest.mark.slow
def test_ctrl_c_saves_then_resume_matches_uninterrupted_run(reference_run, tiny_mnist, tmp_path):
    run_dir = tmp_path / "interrupted"
    process = _start_and_wait_for_checkpoint(tiny_mnist, run_dir)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "SIGINT at step" in stderr and "Traceback" not in stderr
    _resume(run_dir)
    assert history(run_dir) == history(reference_run)


def test_resume_refuses_different_settings(reference_run: Path):
    flags = ["--epochs", "3", "--channels", "8,16"]
    result = runner.invoke(app, ["train", "--out", str(reference_run), "--resume", *flags])
    assert result.exit_code == 1
    assert_one_line_error(
        result.stderr,
        "cannot resume with other settings than the run's: --channels 8,16 (the run's: 4,8), "
        f"--epochs 3 (the run's: {EPOCHS}); a run resumes with its own: drop these flags",
    )


def test_existing_run_is_never_overwritten_unasked(reference_run: Path, tiny_mnist: Path):
    before = history(reference_run)
    result = runner.invoke(app, train_flags(tiny_mnist, reference_run))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "already holds a run", "--overwrite")
    assert history(reference_run) == before


def test_epoch_lines_and_the_done_line_keep_one_clock(tiny_mnist, tmp_path, monkeypatch):
    """The seconds of an epoch's line and of the Done line both count from the training's
    start (an epoch line once counted the data's loading too, and read later than Done)."""
    import digitjax.train

    def slow_load(*args):  # a slow disk
        time.sleep(1)
        return load_dataset(*args)

    monkeypatch.setattr(digitjax.train, "load_dataset", slow_load)
    result = runner.invoke(app, tiny_train(tiny_mnist, tmp_path / "run", epochs=1))
    assert result.exit_code == 0, result.output
    epoch_seconds = float(re.search(r"^epoch +1 .* ([\d.]+)s$", result.stderr, re.M)[1])
    done_seconds = float(re.search(r"^Done: .*\(([\d.]+)s\)$", result.stderr, re.M)[1])
    assert epoch_seconds <= done_seconds


def test_overwrite_replaces_only_the_run(tiny_mnist: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    flags = tiny_train(tiny_mnist, run_dir, epochs=1)
    assert runner.invoke(app, flags).exit_code == 0
    (run_dir / "notes.txt").write_text("mine")
    assert runner.invoke(app, [*flags, "--overwrite"]).exit_code == 0
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert len(history(run_dir)) == 1


def test_diverging_loss_stops_with_a_clear_error(tiny_mnist: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = runner.invoke(app, tiny_train(tiny_mnist, run_dir, "--learning-rate", "1e6", epochs=2))
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "loss became NaN/inf", "No checkpoint had been written")
    assert not list(run_dir.glob("*/[0-9]*")), "a diverged state must never be saved"
    step = int(result.stderr.split("NaN/inf at step ")[1].split(";")[0])
    assert f" {step}/60 steps" in result.stderr  # the bar stops where the run did


def test_quick_compile_compiles_otherwise_and_trains_to_the_same_numbers(
    tiny_run: Path, tiny_mnist: Path, tmp_path: Path
):
    flags = tiny_train(tiny_mnist, tmp_path / "quick", "--quick-compile", epochs=3)
    assert runner.invoke(app, flags).exit_code == 0
    assert history(tmp_path / "quick") == history(tiny_run)
    # ... because XLA compiled the same computation another way (the option reached it).
    dataset = load_dataset("mnist", str(tiny_mnist))

    def compiled_chunk(quick: bool) -> str:
        config = Config(channels=(4, 8), dense=16, quick_compile=quick)
        setup = prepare_training(config, dataset, make_mesh(1))
        order = epoch_order(0, 0, setup.schedule.num_train)
        args = (setup.init_state(), setup.train_images, setup.train_labels, order, 1)
        return setup.train_chunk.lower(*args).compile().as_text()

    assert compiled_chunk(True) != compiled_chunk(False)


@pytest.mark.parametrize("quick", [False, True])
def test_codegen_split_by_cores_trains_to_the_numbers_of_xlas_own(tiny_mnist: Path, quick: bool):
    """`xla_options` splits LLVM's code generation into a part per core, not XLA's 32 parts:
    the chunk it compiles takes the same steps as with one part or 32, bit for bit."""
    config = Config(channels=(4, 8), dense=16, quick_compile=quick)
    setup = prepare_training(config, load_dataset("mnist", str(tiny_mnist)), make_mesh(1))
    order = epoch_order(0, 0, setup.schedule.num_train)
    inputs = (setup.train_images, setup.train_labels, order, 3)
    lowered = setup.train_chunk.lower(setup.init_state(), *inputs)
    ours = lowered.compile()(setup.init_state(), *inputs)
    for parts in (1, 32):  # one part, and XLA's default
        options = {**xla_options(quick), "xla_cpu_parallel_codegen_split_count": parts}
        theirs = lowered.compile(options)(setup.init_state(), *inputs)
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@pytest.mark.slow
def test_fast_preset_reaches_99_percent(tmp_path: Path):
    """The real `--preset fast` on full MNIST through tfds (prepared offline in the test's
    cache): 2 epochs of the small model, ~10 s here. The longer presets' accuracy is measured
    in benchmarks/README.md, not here."""
    result = runner.invoke(
        app, ["train", "--preset", "fast", "--out", str(tmp_path / "run"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["best"]["test_accuracy"] >= 0.99
    assert summary["config"]["dataset"] == "mnist"


def test_resume_refuses_an_optimizer_state_of_another_layout(reference_run, tmp_path):
    """Before 2026-11-24 the optimizer kept one moment per parameter array, not one vector."""
    step_dir = next((reference_run / "latest").iterdir())
    manager = ocp.CheckpointManager(step_dir.parent.absolute())
    saved = manager.restore(int(step_dir.name))
    manager.close()
    state = saved["state"]
    state["opt_state"] = optax.adamw(1e-3).init(state["params"])
    old_run = tmp_path / "old"
    checkpointer = checkpoint.RunCheckpointer(old_run)
    checkpointer.save(checkpoint.LATEST, state, Config.from_dict(saved["config"]), saved["summary"])
    checkpointer.close()
    result = runner.invoke(app, ["train", "--out", str(old_run), "--resume"])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "cannot resume", "older digitjax")


def test_init_from_starts_where_the_checkpoint_ended(tiny_run: Path, tiny_mnist: Path, tmp_path):
    """A learning rate of ~0 keeps the starting weights: the fine-tune's model is the
    checkpoint's, and its first epoch scores what the checkpoint scored (a fresh start: ~10%)."""
    run_dir = tmp_path / "fine-tune"
    flags = ["--init-from", str(tiny_run), "--learning-rate", "1e-12"]
    result = runner.invoke(app, tiny_train(tiny_mnist, run_dir, *flags, epochs=1))
    assert result.exit_code == 0, result.output
    start, tuned = checkpoint.restore_model(tiny_run), checkpoint.restore_model(run_dir)
    assert tuned.config.init_from == str(tiny_run.resolve())
    for path, value in checkpoint.leaves_by_path(tuned.params).items():
        np.testing.assert_allclose(value, checkpoint.leaves_by_path(start.params)[path], atol=1e-6)
    assert history(run_dir)[0]["test_accuracy"] == start.summary["best"]["test_accuracy"]


def test_a_fine_tune_resumes_from_its_own_checkpoint_alone(
    tiny_run: Path, tiny_mnist: Path, tmp_path: Path
):
    """An --init-from run stopped in its second epoch resumes exactly, even with the run it
    started from gone (resuming used to read that run again, and failed)."""
    source = Path(shutil.copytree(tiny_run, tmp_path / "source"))
    reference = tmp_path / "reference"
    flags = tiny_train(tiny_mnist, reference, "--init-from", str(source), epochs=2)
    assert runner.invoke(app, flags).exit_code == 0
    config = checkpoint.read_config(reference, checkpoint.LATEST)[0]
    run_dir = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step >= 40:  # in the second epoch (30 steps each)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(config, run_dir, callbacks=Callbacks(on_chunk=interrupt))
    shutil.rmtree(source)
    result = runner.invoke(app, ["train", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 0, result.output
    assert history(run_dir) == history(reference)


def test_init_from_refuses_another_model_before_touching_the_run(
    tiny_run: Path, tiny_mnist: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    flags = tiny_train(tiny_mnist, run_dir, epochs=1)
    assert runner.invoke(app, flags).exit_code == 0
    before = history(run_dir)
    for init_from, message in [
        (tiny_run, "does not match this run's model"),
        (tmp_path / "missing", "no checkpoint at"),
    ]:
        wider = [*flags, "--dense", "32", "--init-from", str(init_from), "--overwrite"]
        result = runner.invoke(app, wider)
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, message)
        assert history(run_dir) == before, "--overwrite must not remove a run it cannot replace"

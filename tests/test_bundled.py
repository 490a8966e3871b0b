"""Models on numpy, run without importing JAX for a cold `predict`: the bundled model (weights
only) and any checkpoint, read and checked by TensorStore alone; the same answers as the JAX
forward pass."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import (
    MNIST_DIR,
    assert_one_line_error,
    assert_same_outputs,
    fit_small_detectors,
    tiny_train,
)
from PIL import Image
from typer.testing import CliRunner

from digitjax import detector
from digitjax.checkpoint import restore_model
from digitjax.cli import app
from digitjax.config import UserError
from digitjax.data import read_idx_split
from digitjax.inference.bundled import (
    WEIGHTS_FILE,
    bundled_classifier,
    checkpoint_classifier,
    write_bundle,
)
from digitjax.inference.classifier import BUNDLED_MODEL, CheckpointClassifier
from digitjax.inference.predict import predict_files


@pytest.fixture(scope="module")
def mnist_test_images() -> np.ndarray:
    return read_idx_split(MNIST_DIR, "test")[0].astype(np.float32) / 255


def test_numpy_forward_matches_the_jax_forward_on_mnist_test(mnist_test_images):
    on_numpy, on_jax = bundled_classifier(), CheckpointClassifier(BUNDLED_MODEL)
    assert on_numpy is not None, f"run write_bundle: {WEIGHTS_FILE} is missing or stale"
    assert on_numpy.info == on_jax.info and on_numpy.source == on_jax.source
    assert on_numpy.info.detects_non_digits
    got, want = on_numpy.outputs(mnist_test_images), on_jax.outputs(mnist_test_images)
    assert got.shape == (10_000, 11)
    assert_same_outputs(got, want)
    assert (got[:, :10].argmax(axis=1) == want[:, :10].argmax(axis=1)).all()


def test_the_bundled_checkpoint_holds_only_what_inference_needs():
    model = restore_model(BUNDLED_MODEL)  # checksums, config and shapes checked as for any
    assert model.temperature is not None and model.summary["best"]["test_accuracy"] >= 0.994
    size = sum(p.stat().st_size for p in BUNDLED_MODEL.rglob("*") if p.is_file())
    assert size < 8_000_000  # 13 MB with the optimizer state
    # It keeps only its averaged weights: asked for the raw ones, it says so (it once said
    # "corrupt checkpoint", Orbax's complaint about an empty tree to restore).
    with pytest.raises(UserError, match=r"keeps no params \(a weights-only checkpoint"):
        restore_model(BUNDLED_MODEL, average=False)


def test_the_bundled_detector_flags_the_share_of_threshold_digits_it_records():
    """Its `false_alarms` is what its threshold flags of the held-out digits thresholds are
    set on, as classifiers score them: the record stays true of a threshold moved by hand
    (benchmarks/README.md, "Non-digit rejection")."""
    classifier = bundled_classifier(BUNDLED_MODEL)
    assert classifier is not None and classifier.detector is not None
    threshold_digits = detector.threshold_digits()
    flagged = (classifier.outputs(threshold_digits)[:, 10] > 0).sum()
    assert abs(flagged - classifier.detector.false_alarms * len(threshold_digits)) <= 1


def test_write_bundle_from_a_run(tiny_run, tiny_mnist, tmp_path, mnist_test_images, monkeypatch):
    """The lead's step after training a new bundled model, on a tiny run (read, not changed),
    its non-digit detector fitted on fewer images in fewer steps."""
    fit_small_detectors(monkeypatch, tiny_mnist)
    run = tiny_run
    folder = tmp_path / "model"
    step_dir = write_bundle(run, folder)
    on_numpy, on_jax = bundled_classifier(folder), CheckpointClassifier(step_dir)
    assert on_numpy is not None and on_numpy.source == step_dir
    assert on_numpy.info.detects_non_digits and on_jax.info.detects_non_digits
    assert on_jax.info.step == CheckpointClassifier(run).info.step
    images = mnist_test_images[:500]
    assert_same_outputs(on_numpy.outputs(images), on_jax.outputs(images))
    # The run's own probabilities, and a detector that flags digits rarely.
    np.testing.assert_allclose(
        on_jax.outputs(images)[:, :10], CheckpointClassifier(run).outputs(images)[:, :10]
    )
    assert (on_jax.outputs(images)[:, 10] > 0).mean() < 0.1
    # Its threshold flags FALSE_ALARMS of the held-out digits as classifiers score them.
    threshold_digits = detector.threshold_digits()
    flagged = (on_jax.outputs(threshold_digits)[:, 10] > 0).sum()
    assert abs(flagged - detector.FALSE_ALARMS * len(threshold_digits)) <= 1
    saved = json.loads((step_dir / "summary" / "metadata").read_text())
    assert set(saved["checksums"]) == {"ema_params", "step"}  # no optimizer state
    # A checkpoint replaced without a new weights file is not run on stale weights.
    step_dir.rename(step_dir.with_name("99999"))
    assert bundled_classifier(folder) is None


def test_a_cold_predict_with_the_bundled_model_imports_no_jax(tmp_path):
    images, labels = read_idx_split(MNIST_DIR, "test")
    Image.fromarray(images[0]).save(tmp_path / "seven.png")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "digitjax.cli", "predict", "seven.png"]
        + ["--json"],
        cwd=tmp_path,  # no checkpoints/ here
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["digit"] == labels[0]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "flax", "orbax")}


def test_a_checkpoint_on_numpy_matches_the_jax_forward(tiny_run, mnist_test_images):
    """Any run's checkpoint, read by TensorStore alone, answers as its Flax model does."""
    on_numpy, on_jax = checkpoint_classifier(tiny_run), CheckpointClassifier(tiny_run)
    assert on_numpy is not None
    assert on_numpy.info == on_jax.info and on_numpy.source == on_jax.source
    assert on_numpy.info.temperature is not None  # calibrated: the temperature is applied
    images = mnist_test_images[:2000]
    got, want = on_numpy.outputs(images), on_jax.outputs(images)
    assert_same_outputs(got, want)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_raw_weights_of_a_run_without_averaging(tiny_mnist, tmp_path, mnist_test_images):
    run = trained_tiny_run_with(tiny_mnist, tmp_path, "--ema-decay", "0")
    assert_numpy_reads_it_as_jax(run, mnist_test_images[:500])


def assert_numpy_reads_it_as_jax(run, images):
    """The checkpoint's weights read by TensorStore and run on numpy give what Orbax's restore
    run by Flax gives."""
    on_numpy, on_jax = checkpoint_classifier(run), CheckpointClassifier(run)
    assert on_numpy is not None and on_numpy.info == on_jax.info
    assert_same_outputs(on_numpy.outputs(images), on_jax.outputs(images))


def trained_tiny_run_with(data_dir, folder, *extra: str):
    run_dir = folder / "run"
    result = CliRunner().invoke(app, tiny_train(data_dir, run_dir, *extra, epochs=1))
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("layout", [{"use_ocdbt": False}, {"use_zarr3": True}])
def test_every_layout_orbax_writes_is_read(layout, tiny_run, tmp_path, mnist_test_images):
    """A folder per array (Orbax before OCDBT), and zarr v3 arrays (a later Orbax default);
    in a folder whose name a URL would garble."""
    run = shutil.copytree(tiny_run, tmp_path / "a run #1?")
    state_dir = next(run.glob("best/*/state")).absolute()
    state = ocp.StandardCheckpointer().restore(state_dir)
    shutil.rmtree(state_dir)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**layout)) as checkpointer:
        checkpointer.save(state_dir, state)
    assert_numpy_reads_it_as_jax(run, mnist_test_images[:500])


def test_a_cold_predict_of_a_checkpoint_imports_no_jax(tiny_run, tmp_path):
    images, labels = read_idx_split(MNIST_DIR, "test")
    Image.fromarray(images[0]).save(tmp_path / "seven.png")
    command = ["predict", "seven.png", "--checkpoint", str(tiny_run), "--json"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "digitjax.cli", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)[0]
    assert answer["digit"] == labels[0]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "flax", "orbax")}
    assert "tensorstore" in imported
    # The same answer, to the 6 decimals shown, as through Orbax and JAX.
    [expected] = predict_files(CheckpointClassifier(tiny_run), [tmp_path / "seven.png"], None)[0]
    assert answer["probabilities"] == pytest.approx(list(expected.probabilities), abs=2e-6)


def flip_bits(step_dir: Path) -> None:
    for data_file in (step_dir / "state").rglob("*"):
        if data_file.is_file() and data_file.parent.name == "d":
            raw = bytearray(data_file.read_bytes())
            for position in range(len(raw) // 64, len(raw), max(1, len(raw) // 32)):
                raw[position] ^= 0x10
            data_file.write_bytes(bytes(raw))


def truncate(step_dir: Path) -> None:
    for data_file in (step_dir / "state").rglob("*"):
        if data_file.is_file() and data_file.parent.name == "d":
            data_file.write_bytes(data_file.read_bytes()[:100])


def edit_json(item: str, edit) -> Callable[[Path], None]:
    def damage(step_dir: Path) -> None:
        item_file = step_dir / item / "metadata"
        item_file.write_text(json.dumps(edit(json.loads(item_file.read_text()))))

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_bits, "corrupt checkpoint"),
        (truncate, "corrupt checkpoint"),
        (edit_json("config", lambda c: {**c, "channels": [4, 16]}), "does not match its config"),
        (edit_json("config", lambda c: {**c, "epochs": "5"}), "epochs = '5' has the wrong type"),
        (edit_json("summary", lambda s: {**s, "history": None}), "has no history"),
        (edit_json("summary", lambda s: {**s, "temperature": -1}), "invalid temperature -1"),
    ],
)
def test_predict_checks_a_checkpoint_on_numpy_as_orbax_restores_do(
    damage, message, tiny_run, tmp_path
):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    damage(next(run.glob("best/*")))
    image = tmp_path / "x.png"
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--checkpoint", str(run)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, message)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: {**d, "kernel": d["kernel"][:-1]}, "invalid non-digit detector"),  # another's
        (lambda d: {**d, "bias": float("nan")}, "invalid non-digit detector"),
        (lambda d: {**d, "kernel": ["1"] * len(d["kernel"])}, "invalid non-digit detector"),
        (lambda d: {"step": d["step"], "kernel": d["kernel"]}, "invalid non-digit detector"),
        (lambda d: {**d, "step": "10235"}, "invalid non-digit detector"),
        (lambda d: [], "invalid non-digit detector"),
        (lambda d: "{", "cannot read the non-digit detector"),
    ],
)
def test_a_forged_non_digit_detector_is_refused(edit, message, tmp_path):
    """Whether read by numpy (the bundled model's path), by TensorStore for numpy (any
    checkpoint's) or by Orbax."""
    model = shutil.copytree(BUNDLED_MODEL, tmp_path / "model")
    detector_file = model / "non_digit_detector.json"
    edited = edit(json.loads(detector_file.read_text()))
    detector_file.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(UserError, match=message):
        bundled_classifier(model)
    image = tmp_path / "x.png"
    Image.fromarray(read_idx_split(MNIST_DIR, "test")[0][0]).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--checkpoint", str(model)])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, message)
    with pytest.raises(UserError, match=message):
        restore_model(model)


def test_a_detector_fitted_for_other_weights_of_the_run_is_not_used(tmp_path):
    """A run resumed to a new best keeps the old best's detector file until it is fitted
    again: the new weights run without one."""
    model = shutil.copytree(BUNDLED_MODEL, tmp_path / "model")
    detector_file = model / "non_digit_detector.json"
    detector_file.write_text(json.dumps(json.loads(detector_file.read_text()) | {"step": 1}))
    assert restore_model(model).detector is None
    classifier = bundled_classifier(model)
    assert classifier is not None and not classifier.info.detects_non_digits

"""The bundled model: weights only, run by numpy without importing JAX for a cold `predict`,
and the same answers as the JAX forward pass."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import MNIST_DIR, trained_tiny_run
from PIL import Image

from digitjax.checkpoint import restore_model
from digitjax.data import read_idx_split
from digitjax.inference.bundled import WEIGHTS_FILE, bundled_classifier, write_bundle
from digitjax.inference.classifier import BUNDLED_MODEL, CheckpointClassifier


@pytest.fixture(scope="module")
def mnist_test_images() -> np.ndarray:
    return read_idx_split(MNIST_DIR, "test")[0].astype(np.float32) / 255


def test_numpy_forward_matches_the_jax_forward_on_mnist_test(mnist_test_images):
    on_numpy, on_jax = bundled_classifier(), CheckpointClassifier(BUNDLED_MODEL)
    assert on_numpy is not None, f"run write_bundle: {WEIGHTS_FILE} is missing or stale"
    assert on_numpy.info == on_jax.info and on_numpy.source == on_jax.source
    got, want = on_numpy.probabilities(mnist_test_images), on_jax.probabilities(mnist_test_images)
    assert got.shape == (10_000, 10)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_the_bundled_checkpoint_holds_only_what_inference_needs():
    model = restore_model(BUNDLED_MODEL)  # checksums, config and shapes checked as for any
    assert model.temperature is not None and model.summary["best"]["test_accuracy"] >= 0.994
    size = sum(p.stat().st_size for p in BUNDLED_MODEL.rglob("*") if p.is_file())
    assert size < 8_000_000  # 13 MB with the optimizer state


def test_write_bundle_from_a_run(tiny_mnist, tmp_path, mnist_test_images):
    """The lead's step after training a new bundled model, on a tiny run."""
    run = trained_tiny_run(tiny_mnist, tmp_path, epochs=1)
    folder = tmp_path / "model"
    step_dir = write_bundle(run, folder)
    on_numpy, on_jax = bundled_classifier(folder), CheckpointClassifier(run)
    assert on_numpy is not None and on_numpy.source == step_dir
    assert on_numpy.info.step == on_jax.info.step
    images = mnist_test_images[:500]
    np.testing.assert_allclose(
        on_numpy.probabilities(images), on_jax.probabilities(images), atol=1e-5, rtol=0
    )
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

"""Muon (`--optimizer muon`, which `--preset fast` uses): the orthogonalization against
optax's own, which parameters take it, and a run that checkpoints and resumes exactly."""

import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_train
from optax.contrib import MuonDimensionNumbers
from typer.testing import CliRunner

from digitjax import checkpoint
from digitjax.cli import app
from digitjax.config import Config, Interrupted
from digitjax.model import create_model
from digitjax.muon import NEWTON_SCHULZ_STEPS, interior_kernels, orthogonalize
from digitjax.train import Callbacks, Schedule, make_optimizer, train

runner = CliRunner()


@pytest.mark.parametrize("shape", [(1568, 64), (40, 96), (3, 3, 8, 16), (3, 3, 16, 32)])
def test_orthogonalize_is_optax_muons_newton_schulz(shape):
    """The iterations on the Gram matrix give what optax.contrib's run on the matrix gives,
    scaled as Muon scales an output wider than its input; tall and wide alike."""
    update = jax.random.normal(jax.random.key(0), shape)
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    newton_schulz = optax.contrib.scale_by_muon(
        ns_steps=NEWTON_SCHULZ_STEPS,
        beta=0.0,  # no momentum: the update is the orthogonalized gradient
        nesterov=False,
        weight_dimension_numbers=MuonDimensionNumbers(tuple(range(len(shape) - 1)), -1),
    )
    want, _ = newton_schulz.update(update, newton_schulz.init(update))
    got = orthogonalize(update)
    np.testing.assert_allclose(got, want * math.sqrt(max(1, fan_out / fan_in)), atol=2e-6)
    # Singular values brought near one (before the scaling), whatever the gradient's scale.
    singular_values = np.linalg.svd(np.asarray(got).reshape(-1, fan_out), compute_uv=False)
    singular_values /= math.sqrt(max(1, fan_out / fan_in))
    assert 0.6 < singular_values.min() and singular_values.max() < 1.2
    np.testing.assert_allclose(orthogonalize(1e-3 * update), got, atol=1e-5)


def test_muon_steps_the_interior_kernels_and_adamw_the_rest():
    """One step of `--optimizer muon`: the kernels of the convolutions after the first and of
    the hidden layer move by Muon's rate along their orthogonalized gradient (plus the weight
    decay); the first convolution, the output layer and every bias move as AdamW moves them."""
    config = Config(optimizer="muon", warmup_epochs=0, channels=(4, 8, 8), dense=16)
    _, params = create_model(config, 10)
    labels = interior_kernels(params)
    assert [path for path, label in flat(labels) if label == "muon"] == [
        "convs/1/kernel",
        "convs/2/kernel",
        "hidden/kernel",
    ]
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape) + 1.0), params)
    schedule = Schedule(num_train=640, batch_size=64, epochs=1)
    muon_tx, adamw_tx = (
        make_optimizer(config, schedule),
        make_optimizer(Config(warmup_epochs=0, channels=(4, 8, 8), dense=16), schedule),
    )
    updates = dict(flat(muon_tx.update(grads, muon_tx.init(params), params)[0]))
    adamw_updates = dict(flat(adamw_tx.update(grads, adamw_tx.init(params), params)[0]))
    for path, label in flat(labels):
        param, grad = dict(flat(params))[path], dict(flat(grads))[path]
        if label == "muon":
            step = orthogonalize(grad) + config.weight_decay * param
            want = -config.muon_learning_rate * step
            np.testing.assert_allclose(updates[path], want, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_allclose(updates[path], adamw_updates[path], rtol=1e-6)


def flat(tree):
    return [
        ("/".join(str(getattr(key, "key", key)) for key in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def test_a_muon_run_checkpoints_and_resumes_exactly(tiny_mnist, tmp_path):
    """Muon's state (its momentum beside AdamW's moments) is saved and restored: a run stopped
    in its first epoch and resumed ends with the uninterrupted run's metrics, which differ
    from AdamW's."""
    reference = tmp_path / "reference"
    result = runner.invoke(app, tiny_train(tiny_mnist, reference, "--optimizer", "muon", epochs=2))
    assert result.exit_code == 0, result.output
    saved, summary = checkpoint.read_config(reference, checkpoint.LATEST)
    assert saved.optimizer == "muon"
    run_dir = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(saved, run_dir, callbacks=Callbacks(on_chunk=interrupt))
    assert runner.invoke(app, ["train", "--out", str(run_dir), "--resume"]).exit_code == 0
    assert checkpoint.read_config(run_dir, checkpoint.LATEST)[1]["history"] == summary["history"]
    adamw = tmp_path / "adamw"
    assert runner.invoke(app, tiny_train(tiny_mnist, adamw, epochs=2)).exit_code == 0
    adamw_history = checkpoint.read_config(adamw, checkpoint.LATEST)[1]["history"]
    assert adamw_history[-1]["train_loss"] != summary["history"][-1]["train_loss"]

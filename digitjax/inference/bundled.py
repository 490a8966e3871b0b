"""Models run by numpy alone: the model bundled with digitjax, any checkpoint in a one-off
`predict`, and how the bundled model is made from a run.

A one-image `digitjax predict` must not pay for importing JAX, which alone costs more than the
whole prediction: so the bundled model folder holds, beside its Orbax checkpoint (what
evaluate, export and serve read), `weights.npz`: the same weights, its temperature and what
`ModelInfo` says; and a checkpoint the user names has its weights read by TensorStore alone
(`digitjax.weights`: no JAX, Flax or Orbax). `NumpyClassifier` runs either (convolutions as
im2col matmuls, 2x2 max-pooling as a reshape). Tests hold it to the JAX forward pass on the
MNIST test set.

`write_bundle` makes both from a run's best checkpoint, keeping only what inference needs
(the evaluated weights: no optimizer state, 13 MB -> 3.6 MB), with a non-digit detector
(fitted, ~1 min, if the run has none). After training a new bundled model, run (it may
overwrite the folder it reads):

    python -m digitjax.inference.bundled checkpoints/bundled digitjax/assets/model
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from digitjax.config import Config
from digitjax.inference.classifier import (
    BUNDLED_MODEL,
    ModelInfo,
    checkpoint_info,
    in_batches,
    packed,
)
from digitjax.runs import BEST, step_dir_of
from digitjax.weights import (
    NUM_POOLS,
    NonDigitDetector,
    conv_statistics,
    detector_features,
    read_detector,
    read_weights,
)

WEIGHTS_FILE = "weights.npz"
METADATA_KEY = "metadata"  # the npz entry holding the JSON document; the others are weights


class NumpyClassifier:
    """The CNN of digitjax.model on numpy: 3x3 'SAME' convolutions with ReLU, 2x2 max-pooling
    after the first `num_pools` of them, a ReLU dense layer, the logits divided by the
    temperature, and the softmax; and the non-digit detector on what they computed."""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        temperature: float | None,
        detector: NonDigitDetector | None,
        num_pools: int,
        info: ModelInfo,
        source: Path,
    ):
        self.params, self.temperature, self.num_pools = params, temperature, num_pools
        self.detector = detector
        self.num_convs = sum(1 for k in self.params if k.startswith("convs/") and "kernel" in k)
        self.info, self.source = info, source

    def outputs(self, images: np.ndarray) -> np.ndarray:
        return in_batches(self._forward, images)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        x = images[..., None]  # (N, 28, 28, 1): channels last, as Flax
        conv_stats = []
        for i in range(self.num_convs):
            x = conv_same(x, self.params[f"convs/{i}/kernel"], self.params[f"convs/{i}/bias"])
            x = np.maximum(x, 0)
            if i < self.num_pools:
                n, h, w, c = x.shape
                x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            if self.detector is not None:
                # Now rather than at the end: kept alive till then, the layers' outputs made
                # a batch of 256 ~8% slower.
                conv_stats.append(conv_statistics(np, x))
        x = x.reshape(len(x), -1)  # (height, width, channel) order, as Flax flattens
        hidden = np.maximum(x @ self.params["hidden/kernel"] + self.params["hidden/bias"], 0)
        logits = hidden @ self.params["logits/kernel"] + self.params["logits/bias"]
        if self.temperature is not None:
            logits = logits / np.float32(self.temperature)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = None
        if self.detector is not None:
            features = detector_features(np, hidden, logits, conv_stats)
            scores = self.detector.scores(features)
        return packed(exp / exp.sum(axis=1, keepdims=True), scores)


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A stride-1 'SAME' convolution (any odd kernel size) as one matmul over the stacked
    shifted inputs: (N, H, W, C) x (kh, kw, C, F) -> (N, H, W, F)."""
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = np.concatenate(
        [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    out = patches.reshape(-1, kh * kw * c) @ kernel.reshape(-1, features)
    return out.reshape(n, h, w, features) + bias


def bundled_classifier(folder: Path = BUNDLED_MODEL) -> NumpyClassifier | None:
    """The bundled model on numpy, if its weights file is there and belongs to the checkpoint
    beside it (a model replaced without rerunning `write_bundle` is not mistaken for it)."""
    steps = [p for p in (folder / BEST).glob("*") if p.name.isdigit()]
    weights_file = folder / WEIGHTS_FILE
    if len(steps) != 1 or not weights_file.is_file():
        return None
    with np.load(weights_file, allow_pickle=False) as stored:
        metadata = json.loads(str(stored[METADATA_KEY]))
        params = {k: stored[k] for k in stored.files if k != METADATA_KEY}
    if metadata["step"] != int(steps[0].name):
        return None
    config = Config.from_dict(metadata["config"])
    detector = read_detector(steps[0], config, metadata["num_classes"])
    info = ModelInfo(
        name="bundled",
        kind="checkpoint",
        step=metadata["step"],
        test_accuracy=metadata["test_accuracy"],
        temperature=metadata["temperature"],
        dataset=metadata["dataset"],
        num_classes=metadata["num_classes"],
        detects_non_digits=detector is not None,
    )
    return NumpyClassifier(
        params, metadata["temperature"], detector, metadata["num_pools"], info, steps[0]
    )


def checkpoint_classifier(path: Path) -> NumpyClassifier | None:
    """The checkpoint at `path` (a run, a `latest`/`best` folder or a step's) on numpy, its
    weights read and checked without JAX; None if only Orbax can read it."""
    stored = read_weights(step_dir_of(path))
    if stored is None:
        return None
    info = checkpoint_info(stored)
    return NumpyClassifier(
        stored.params, stored.temperature, stored.detector, NUM_POOLS, info, stored.step_dir
    )


def write_bundle(run: Path, out: Path) -> Path:
    """The bundled model's folder at `out`, made from the best checkpoint of `run`: a
    weights-only Orbax checkpoint, its `weights.npz`, and its non-digit detector (the run's,
    else one fitted now). Returns the checkpoint's folder."""
    import jax.numpy as jnp

    from digitjax import detector
    from digitjax.checkpoint import RunCheckpointer, leaves_by_path, restore_model
    from digitjax.config import uses_ema

    model = restore_model(run)
    fitted = model.detector or detector.fit(model)
    info = checkpoint_info(model)
    # Under the name the run evaluated them by, so that restore_model finds them.
    state = {
        "ema_params" if uses_ema(model.config) else "params": model.params,
        "step": jnp.asarray(info.step, jnp.int32),
    }
    staging = out.with_name(f"{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    checkpointer = RunCheckpointer(staging)
    checkpointer.save(BEST, state, model.config, model.summary)
    checkpointer.close()
    shutil.rmtree(staging / "latest")
    metadata = {
        "step": info.step,
        "test_accuracy": info.test_accuracy,
        "temperature": info.temperature,
        "dataset": info.dataset,
        "num_classes": info.num_classes,
        "num_pools": NUM_POOLS,
        "config": model.config.to_dict(),  # what the detector's features are read for
    }
    arrays = {k: np.asarray(v, np.float32) for k, v in leaves_by_path(model.params).items()}
    arrays[METADATA_KEY] = np.array(json.dumps(metadata))
    np.savez(staging / WEIGHTS_FILE, allow_pickle=False, **arrays)
    detector.save(fitted, staging, int(model.step_dir.name))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out / BEST / str(info.step)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m digitjax.inference.bundled RUN OUT")
    print(f"written: {write_bundle(Path(sys.argv[1]), Path(sys.argv[2]))}")

"""Evaluation: logits for a whole split in one compiled program, metrics on the host."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from digitjax import checkpoint
from digitjax.config import UserError
from digitjax.data import load_dataset
from digitjax.distributed import batch_sharded, replicated, to_host
from digitjax.model import apply, conv_impls_for, normalize

EVAL_BATCH = 200  # the fastest of the sizes measured (benchmarks/README.md)


def make_logits_fn(
    graphdef: nnx.GraphDef, mesh: Mesh | None = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted fn(params, images (N, 28, 28) uint8 with N % EVAL_BATCH == 0) -> logits.
    With a mesh, devices share each batch and every process gets all the logits."""
    split_batches = mesh is not None and EVAL_BATCH % mesh.size == 0

    def batch_logits(images: jax.Array, params: Any) -> jax.Array:
        if split_batches:
            images = jax.lax.with_sharding_constraint(images, batch_sharded(mesh))
        conv_impls = conv_impls_for(jax.default_backend(), False, len(params["convs"]))
        return apply(graphdef, params, normalize(images), conv_impls)

    def logits_fn(params: Any, images: jax.Array) -> jax.Array:
        batches = images.reshape(-1, EVAL_BATCH, *images.shape[1:])
        logits = jax.lax.map(lambda x: batch_logits(x, params), batches)
        return logits.reshape(images.shape[0], -1)

    return jax.jit(logits_fn, out_shardings=replicated(mesh) if mesh is not None else None)


def pad_to_batches(images: np.ndarray) -> np.ndarray:
    """Pads with blank images so a split is whole eval batches (one compile for any size)."""
    padding = -len(images) % EVAL_BATCH
    return np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])


def split_logits(logits_fn: Callable, params: Any, padded_images: Any, count: int) -> np.ndarray:
    """The logits of a whole split in one compiled call: `padded_images` (from
    `pad_to_batches`, on the host or already on device) holds `count` real images."""
    return to_host(logits_fn(params, padded_images))[:count]


def split_metrics(
    logits_fn: Callable,
    params: Any,
    padded_images: Any,
    labels: np.ndarray,
    class_names: tuple[str, ...],
) -> "Metrics":
    logits = split_logits(logits_fn, params, padded_images, len(labels))
    return compute_metrics(logits, labels, class_names)


@dataclasses.dataclass(frozen=True)
class Metrics:
    accuracy: float
    loss: float
    confusion: np.ndarray  # [true, predicted] counts
    predictions: np.ndarray
    class_names: tuple[str, ...]

    @property
    def precision(self) -> np.ndarray:
        return np.diag(self.confusion) / np.maximum(self.confusion.sum(axis=0), 1)

    @property
    def recall(self) -> np.ndarray:
        return np.diag(self.confusion) / np.maximum(self.confusion.sum(axis=1), 1)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "num_examples": int(self.confusion.sum()),
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(
                    self.class_names,
                    self.precision,
                    self.recall,
                    self.f1,
                    self.confusion.sum(axis=1),
                )
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]
) -> Metrics:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    predictions = logits.argmax(axis=1)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return Metrics(
        float((predictions == labels).mean()), float(loss), confusion, predictions, class_names
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    step_dir: Path
    dataset: str
    split: str
    metrics: Metrics
    images: np.ndarray  # the split evaluated, for the report's misclassified digits
    labels: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.step_dir),
            "dataset": self.dataset,
            "split": self.split,
            **self.metrics.to_dict(),
        }


def evaluate_checkpoint(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    latest: bool = False,
) -> Evaluation:
    """A checkpoint's metrics on a split of its own dataset (or of another one, given by name
    or folder)."""
    model = checkpoint.restore_model(path, checkpoint.LATEST if latest else checkpoint.BEST)
    config, num_classes = model.config, model.summary["num_classes"]
    if dataset is None and data_dir is None:
        dataset, data_dir = config.dataset, config.data_dir
    data = load_dataset(dataset or config.dataset, data_dir)
    if len(data.class_names) != num_classes:
        raise UserError(f"{data.name} has {len(data.class_names)} classes, the model {num_classes}")
    images, labels = data.split(split)
    logits_fn = make_logits_fn(model.graphdef)
    metrics = split_metrics(
        logits_fn, model.params, pad_to_batches(images), labels, data.class_names
    )
    return Evaluation(model.step_dir, data.name, split, metrics, images, labels)

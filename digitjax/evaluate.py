"""Evaluation: logits for a whole split in one compiled program, metrics on the host; and the
calibration of the probabilities (a temperature, and the expected calibration error)."""

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
from digitjax.data import Dataset, load_dataset
from digitjax.distributed import batch_sharded, replicated, to_host
from digitjax.model import apply, conv_impls_for, normalize

EVAL_BATCH = 200  # the fastest of the sizes measured (benchmarks/README.md)


def make_batch_logits(
    graphdef: nnx.GraphDef, mesh: Mesh | None = None
) -> Callable[[jax.Array, Any], jax.Array]:
    """fn(images (EVAL_BATCH, 28, 28) uint8, params) -> logits, to call inside a jitted
    program. With a mesh, devices share the batch."""
    split = mesh is not None and EVAL_BATCH % mesh.size == 0
    sharding = batch_sharded(mesh) if mesh is not None and split else None

    def batch_logits(images: jax.Array, params: Any) -> jax.Array:
        if sharding is not None:
            images = jax.lax.with_sharding_constraint(images, sharding)
        conv_impls = conv_impls_for(jax.default_backend(), False, len(params["convs"]))
        return apply(graphdef, params, normalize(images), conv_impls)

    return batch_logits


def make_logits_fn(graphdef: nnx.GraphDef, mesh: Mesh | None = None) -> jax.stages.Wrapped:
    """A jitted fn(params, images (N, 28, 28) uint8 with N % EVAL_BATCH == 0) -> logits.
    With a mesh, devices share each batch and every process gets all the logits."""
    batch_logits = make_batch_logits(graphdef, mesh)

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
    temperature: float | None = None,
) -> "Metrics":
    logits = split_logits(logits_fn, params, padded_images, len(labels))
    return compute_metrics(logits, labels, class_names, temperature)


# --- Calibration -------------------------------------------------------------------------

ECE_BINS = 15
# log T is searched in [log 1/20, log 20]: wide enough for any model trained with or without
# label smoothing, and a run that separates its held-out images perfectly (whose likelihood
# keeps growing as T -> 0) stops at the bound instead of at an infinitely sharp model.
TEMPERATURE_BRACKET = (1 / 20, 20.0)


def log_probabilities(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """log softmax(logits / T) in float64; no temperature (an uncalibrated checkpoint) is
    the plain softmax."""
    logits = np.asarray(logits, np.float64)
    if temperature is not None:
        logits = logits / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def calibrated_softmax(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """The class probabilities a model with this temperature shows."""
    return np.exp(log_probabilities(logits, temperature))


def mean_nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimizes the NLL of softmax(logits / T) on images the model was not trained
    on: temperature scaling (Guo et al., 2017), which leaves every argmax as it is. The NLL is
    convex in 1/T, so unimodal in log T: a golden-section search over TEMPERATURE_BRACKET,
    deterministic, to ~1e-9 in log T."""
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one image")
    logits = np.asarray(logits, np.float64)

    def nll(log_t: float) -> float:
        return mean_nll(log_probabilities(logits, float(np.exp(log_t))), labels)

    ratio = (np.sqrt(5) - 1) / 2
    low, high = np.log(TEMPERATURE_BRACKET)
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    while high - low > 1e-9:
        if nll_a <= nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return float(np.exp((low + high) / 2))


@dataclasses.dataclass(frozen=True)
class Reliability:
    """A reliability diagram's data: the images binned by their top probability (ECE_BINS
    equal-width bins over [0, 1]), with each bin's accuracy and mean confidence."""

    counts: np.ndarray  # images per bin
    accuracy: np.ndarray  # share of them predicted right (0 in an empty bin)
    confidence: np.ndarray  # their mean top probability (0 in an empty bin)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, len(self.counts) + 1)

    @property
    def ece(self) -> float:
        """Expected calibration error: |accuracy - confidence| averaged over the bins,
        weighted by their share of the images."""
        gaps = np.abs(self.accuracy - self.confidence)
        return float((self.counts * gaps).sum() / max(self.counts.sum(), 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bin_edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "accuracy": self.accuracy.tolist(),
            "confidence": self.confidence.tolist(),
        }


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bins are (k/bins, (k+1)/bins]; a top probability can be no lower than 1/classes."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    per_bin = np.maximum(counts, 1)
    return Reliability(
        counts,
        np.bincount(which, correct, minlength=bins) / per_bin,
        np.bincount(which, confidence, minlength=bins) / per_bin,
    )


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    return reliability(probs, labels, bins).ece


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Figures of the probabilities the model shows: with its temperature, if it has one."""

    accuracy: float
    loss: float
    confusion: np.ndarray  # [true, predicted] counts
    predictions: np.ndarray
    class_names: tuple[str, ...]
    temperature: float | None
    reliability: Reliability
    uncalibrated_loss: float  # of the plain softmax, for comparison
    uncalibrated_ece: float

    @property
    def ece(self) -> float:
        return self.reliability.ece

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
            "temperature": self.temperature,
            "ece": self.ece,
            "uncalibrated_loss": self.uncalibrated_loss,
            "uncalibrated_ece": self.uncalibrated_ece,
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
            "reliability": self.reliability.to_dict(),
        }


def compute_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    temperature: float | None = None,
) -> Metrics:
    """A temperature changes the loss and the calibration, never the predictions."""
    predictions = logits.argmax(axis=1)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    uncalibrated = log_probabilities(logits)
    plain = reliability(np.exp(uncalibrated), labels)
    if temperature is None:
        calibrated, calibrated_reliability = uncalibrated, plain
    else:
        calibrated = log_probabilities(logits, temperature)
        calibrated_reliability = reliability(np.exp(calibrated), labels)
    return Metrics(
        accuracy=float((predictions == labels).mean()),
        loss=mean_nll(calibrated, labels),
        confusion=confusion,
        predictions=predictions,
        class_names=class_names,
        temperature=temperature,
        reliability=calibrated_reliability,
        uncalibrated_loss=mean_nll(uncalibrated, labels),
        uncalibrated_ece=plain.ece,
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    step_dir: Path  # of a `--seeds` run: its folder
    dataset: str
    split: str
    metrics: Metrics  # of a `--seeds` run: its ensemble's
    images: np.ndarray  # the split evaluated, for the report's misclassified digits
    labels: np.ndarray
    seeds: tuple["Evaluation", ...] = ()  # of a `--seeds` run: each seed's (digitjax/seeds.py)
    # The share of the split's images the model's non-digit detector flags: false alarms on
    # digits, refusals on another dataset's images; None for a model without a detector.
    non_digit_flagged: float | None = None

    def to_dict(self) -> dict[str, Any]:
        document = {
            "checkpoint": str(self.step_dir),
            "dataset": self.dataset,
            "split": self.split,
            **self.metrics.to_dict(),
            "non_digit_flagged": self.non_digit_flagged,
        }
        if self.seeds:
            document["seeds"] = [each.to_dict() for each in self.seeds]
        return document


def evaluate_checkpoint(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    latest: bool = False,
) -> Evaluation:
    """A checkpoint's metrics on a split of its own dataset (or of another one, given by name
    or folder). (A `--seeds` run's folder: digitjax/seeds.py.)"""
    model = checkpoint.restore_model(path, checkpoint.LATEST if latest else checkpoint.BEST)
    data = evaluation_data(model, dataset, data_dir)
    images, labels = data.split(split)
    logits_fn = make_logits_fn(model.graphdef)
    metrics = split_metrics(
        logits_fn, model.params, pad_to_batches(images), labels, data.class_names, model.temperature
    )
    flagged = None
    if model.detector is not None:
        from digitjax.detector import flagged_share

        flagged = flagged_share(model, images)
    return Evaluation(model.step_dir, data.name, split, metrics, images, labels, (), flagged)


def evaluation_data(
    model: checkpoint.TrainedModel, dataset: str | None, data_dir: str | None
) -> Dataset:
    """The dataset to evaluate `model` on: its own, or the one given by name or folder (named
    after the folder: its images are whatever it holds)."""
    config, num_classes = model.config, model.summary["num_classes"]
    if dataset is not None and data_dir is not None:
        raise UserError("pass --dataset or --data-dir, not both: a folder's images are its own")
    if data_dir is not None:
        data = dataclasses.replace(load_dataset(config.dataset, data_dir), name=str(data_dir))
    else:
        data = load_dataset(dataset or config.dataset, None if dataset else config.data_dir)
    if len(data.class_names) != num_classes:
        raise UserError(f"{data.name} has {len(data.class_names)} classes, the model {num_classes}")
    return data

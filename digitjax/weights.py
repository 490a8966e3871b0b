"""A checkpoint's weights without JAX, Flax or Orbax: the shapes a config's CNN has, the
checksum of a tree of arrays, the checks of a checkpoint's JSON items, and `read_weights`,
which reads one weights tree of a checkpoint with TensorStore alone.

Importing JAX costs ~1 s and Orbax and Flax ~0.8 s more; TensorStore, which Orbax writes its
arrays with, costs ~0.6 s. So a one-off `predict` of a checkpoint reads its weights here and
runs them on numpy (`inference.bundled.NumpyClassifier`), with every check that
`checkpoint.restore_model` makes; anything else restores through Orbax (`checkpoint.py`).
"""

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from digitjax.config import Config, UserError, is_int, uses_ema

IMAGE_SIZE = 28
NUM_POOLS = 2  # 28 -> 14 -> 7; deeper layers keep 7x7
KERNEL_SIZE = 3


def parameter_shapes(
    channels: tuple[int, ...], dense: int, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """The shape of every weight of the CNN (`model.CNN` is built from these), by its
    '/'-joined path in the model's parameter tree."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 1
    for i, out_channels in enumerate(channels):
        shapes[f"convs/{i}/kernel"] = (KERNEL_SIZE, KERNEL_SIZE, in_channels, out_channels)
        shapes[f"convs/{i}/bias"] = (out_channels,)
        in_channels = out_channels
    side = IMAGE_SIZE // 2 ** min(len(channels), NUM_POOLS)
    shapes["hidden/kernel"], shapes["hidden/bias"] = (side * side * in_channels, dense), (dense,)
    shapes["logits/kernel"], shapes["logits/bias"] = (dense, num_classes), (num_classes,)
    return shapes


def detector_feature_count(channels: tuple[int, ...], dense: int, num_classes: int) -> int:
    """How many numbers `NonDigitDetector` reads of an image: the hidden layer, the calibrated
    logits and their logsumexp, then each conv layer's mean and maximum activation per channel
    (over the positions after its ReLU and pooling), in that order."""
    return dense + num_classes + 1 + 2 * sum(channels)


def conv_statistics(xp: Any, x: Any) -> Any:
    """(N, 2C): the mean and then the maximum of a conv layer's (N, H, W, C) output over its
    positions, per channel; `xp` is numpy or jax.numpy."""
    return xp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=1)


def detector_features(xp: Any, hidden: Any, logits: Any, conv_stats: list) -> Any:
    """The (N, detector_feature_count) features of N images, in numpy (`xp=np`) or JAX
    (`xp=jax.numpy`): one formula for both forward passes. `conv_stats`: `conv_statistics`
    of each conv layer's output, in order."""
    top = logits.max(axis=1, keepdims=True)
    logsumexp = top + xp.log(xp.exp(logits - top).sum(axis=1, keepdims=True))
    return xp.concatenate([hidden, logits, logsumexp, *conv_stats], axis=1)


# The detector's score of an image moves by ~0.8 (the median standard deviation over the
# bundled model's images) when the image moves by one pixel, which leaves an image scored
# near the threshold on the side chance puts it. There (within STEADY_BAND of 0) the score
# is the mean over the image and its four one-pixel shifts: it flags more of the held-out
# non-digit kinds and fewer users' digits at the same threshold (benchmarks/README.md,
# "Non-digit rejection"). Outside the band no image's mean was seen on the other side of 0,
# so the images outside it (93% of MNIST test, 82% of users' digits) cost one forward pass.
STEADY_BAND = 3.0
ONE_PIXEL_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def shifted(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, H, W) images moved by `rows` down and `cols` right (at most one pixel), the
    pixels moved in black."""
    out = np.zeros_like(images)
    height, width = images.shape[1:]
    out[:, max(rows, 0) : height + min(rows, 0), max(cols, 0) : width + min(cols, 0)] = images[
        :, max(-rows, 0) : height + min(-rows, 0), max(-cols, 0) : width + min(-cols, 0)
    ]
    return out


def steady_scores(
    scores: np.ndarray,
    images: np.ndarray,
    scores_of: Callable[[np.ndarray], np.ndarray],
    band: float | None = None,
) -> np.ndarray:
    """`scores` (N,) of `images` (N, 28, 28), those within `band` (STEADY_BAND if None) of 0
    replaced by their mean over the image and its ONE_PIXEL_SHIFTS, scored by `scores_of`
    (the same forward pass). NaN scores (no detector) stay NaN."""
    near = np.flatnonzero(np.abs(scores) < (STEADY_BAND if band is None else band))
    if near.size == 0:
        return scores
    views = np.concatenate([shifted(images[near], *shift) for shift in ONE_PIXEL_SHIFTS])
    shifted_scores = np.reshape(scores_of(views), (len(ONE_PIXEL_SHIFTS), near.size))
    steady = np.array(scores, copy=True)
    steady[near] = (scores[near] + shifted_scores.sum(axis=0)) / (1 + len(ONE_PIXEL_SHIFTS))
    return steady


@dataclasses.dataclass(frozen=True)
class NonDigitDetector:
    """A logistic score on what the CNN computes for an image (`detector_feature_count`):
    `features @ kernel + bias`, positive for an image that does not look like a digit. Its
    input normalization and threshold are folded into `kernel` and `bias` (`detector.fit`),
    so that 0 is the threshold; `false_alarms` is the share of held-out digits it flags."""

    kernel: np.ndarray  # (features,) float32
    bias: float
    false_alarms: float

    def scores(self, features: Any) -> Any:
        """The (N,) scores of (N, features) float32 features, numpy or JAX arrays alike:
        positive for what does not look like a digit. Float32, as the features are."""
        return features @ self.kernel + np.float32(self.bias)

    def to_dict(self, step: int) -> dict[str, Any]:
        """As DETECTOR_FILE holds it, for the weights saved at `step`."""
        return {
            "step": step,
            "kernel": [float(w) for w in self.kernel],
            "bias": self.bias,
            "false_alarms": self.false_alarms,
        }

    @classmethod
    def from_dict(cls, raw: Any, num_features: int, where: Path) -> "NonDigitDetector":
        numbers = (
            [*raw["kernel"], raw["bias"], raw["false_alarms"]]
            if isinstance(raw, dict)
            and {"kernel", "bias", "false_alarms"} <= set(raw)
            and isinstance(raw["kernel"], list)
            else []
        )
        if not (
            len(numbers) == num_features + 2
            and all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
            and np.isfinite(numbers).all()
        ):
            raise UserError(f"{where} is an invalid non-digit detector for its model")
        return cls(np.asarray(numbers[:-2], np.float32), float(numbers[-2]), float(numbers[-1]))


# A run's non-digit detector, in the run folder beside best/ and latest/: fitted after the
# checkpoints were written (`detector.fit_for_run`), so that it needs no new checkpoint, and
# said to be for the weights of one step, so that a run resumed to a new best does not pass
# it off as the new weights' until it is fitted again.
DETECTOR_FILE = "non_digit_detector.json"


def read_detector(step_dir: Path, config: Config, num_classes: int) -> NonDigitDetector | None:
    """The non-digit detector fitted for the weights in `step_dir`, if its run has one."""
    path = step_dir.parents[1] / DETECTOR_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the non-digit detector {path}: {e}") from None
    step = raw.get("step") if isinstance(raw, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise UserError(f"{path} is an invalid non-digit detector for its model")
    if step != int(step_dir.name):
        return None  # fitted for other weights of the run
    num_features = detector_feature_count(config.channels, config.dense, num_classes)
    return NonDigitDetector.from_dict(raw, num_features, path)


def check_shapes(
    got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]], what: str, where: Path
) -> None:
    """Every path and shape of a restored tree against those `what` expects."""
    if dict(got) != dict(want):
        differing = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise UserError(
            f"checkpoint {where} does not match {what}: "
            f"differs at {', '.join(f'{k} {s}' for k, s in differing)}"
        )


def checksum(leaves: Mapping[str, np.ndarray]) -> str:
    """The SHA-256 of a tree's leaves (by '/'-joined path) over each path, dtype, shape and
    bytes: what a checkpoint's summary holds for each top-level state item."""
    digest = hashlib.sha256()
    for path, value in sorted(leaves.items()):
        digest.update(f"{path}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def verify_checksums(
    summary: dict, items: Mapping[str, Mapping[str, np.ndarray]], step_dir: Path
) -> None:
    """The state items read (their leaves by path) against the summary's checksums;
    checkpoints written before checksums existed (and the bundled model) have none."""
    saved = summary.get("checksums", {})
    damaged = [key for key in saved if key in items and checksum(items[key]) != saved[key]]
    if damaged:
        raise UserError(
            f"corrupt checkpoint {step_dir}: {', '.join(sorted(damaged))} "
            "do not match their checksums (damaged on disk)"
        )


def check_summary(summary: Any, step_dir: Path) -> None:
    """The summary's fields that evaluating, predicting and resuming read, each of the type and
    range that training writes: a forged or damaged one is refused here, in one line, rather
    than failing (or answering NaN) where a value is used."""
    records = summary.get("history") if isinstance(summary, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and {"epoch", "step", "test_accuracy"} <= set(r) for r in records
    ):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (its summary has no history)")
    if not all(
        is_int(r["epoch"]) and is_int(r["step"]) and is_number(r["test_accuracy"], 0, 1)
        for r in records
    ):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (its history is not numbers)")
    if not is_class_count(summary.get("num_classes")):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (no class count)")
    checksums = summary.get("checksums", {})
    if not (isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (its checksums are not text)")
    curve = summary.get("curve", [])
    if not (isinstance(curve, list) and all(isinstance(point, dict) for point in curve)):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (its curve is not a list)")
    if not is_number(summary.get("wall_seconds", 0.0), 0, math.inf):
        raise UserError(f"{step_dir} is not a digitjax checkpoint (its wall time is no number)")
    temperature = summary.get("temperature")
    if temperature is not None and not is_temperature(temperature):
        raise UserError(f"{step_dir} has an invalid temperature {temperature!r} in its summary")


def is_number(value: Any, low: float, high: float) -> bool:
    """A number in [low, high] (so not NaN) as JSON gives it."""
    return (is_int(value) or isinstance(value, float)) and low <= value <= high


def is_class_count(value: Any) -> bool:
    return is_int(value) and 2 <= value <= 100_000


def is_temperature(value: Any) -> bool:
    """Fitted temperatures lie in evaluate.TEMPERATURE_BRACKET (1/20 to 20); far outside it
    the logits divided by one overflow, and the probabilities are NaN."""
    return is_number(value, 1e-3, 1e3)


def config_of(raw: Any, step_dir: Path) -> Config:
    try:
        return Config.from_dict(raw)
    except (TypeError, UserError) as e:
        raise UserError(f"{step_dir} is not a digitjax checkpoint: {e}") from None


def chosen_weights(
    config: Config, summary: dict, average: bool, step_dir: Path
) -> tuple[str, float | None, "NonDigitDetector | None"]:
    """Which weights to restore, "ema_params" (the moving average, if the run kept one and
    `average`) or "params", with the temperature that calibrates them and the non-digit
    detector: both were fitted for the weights the run evaluates, so the raw weights of a run
    that averages have neither."""
    evaluated = "ema_params" if uses_ema(config) else "params"
    kept = evaluated if average else "params"
    if kept != evaluated:
        return kept, None, None
    temperature = summary.get("temperature")
    detector = read_detector(step_dir, config, summary["num_classes"])
    return kept, None if temperature is None else float(temperature), detector


@dataclasses.dataclass(frozen=True)
class StoredWeights:
    """A checkpoint's evaluated weights as numpy arrays by '/'-joined path, checked against
    their checksum and their config; as `checkpoint.TrainedModel`, without the graph."""

    config: Config
    params: dict[str, np.ndarray]
    summary: dict
    step_dir: Path
    temperature: float | None
    detector: NonDigitDetector | None


def read_weights(step_dir: Path) -> StoredWeights | None:
    """The weights `checkpoint.restore_model` would restore from `step_dir`, or None where
    its items are not laid out as Orbax lays them out (`_read_arrays`) or TensorStore cannot
    read them: the caller then restores it through Orbax, which names what is wrong with a
    damaged checkpoint. Raises the UserError of restore_model when a check fails."""
    state = step_dir / "state"
    try:
        config_raw = json.loads((step_dir / "config" / "metadata").read_text())
        summary = json.loads((step_dir / "summary" / "metadata").read_text())
        layout = json.loads((state / "_METADATA").read_text())
    except (OSError, ValueError):
        return None
    check_summary(summary, step_dir)
    config = config_of(config_raw, step_dir)
    key, temperature, detector = chosen_weights(config, summary, True, step_dir)
    arrays = _read_arrays(state, layout, key)
    if arrays is None:
        return None
    verify_checksums(summary, {key: arrays}, step_dir)
    expected = parameter_shapes(config.channels, config.dense, summary["num_classes"])
    check_shapes({k: v.shape for k, v in arrays.items()}, expected, "its config's model", step_dir)
    return StoredWeights(config, arrays, summary, step_dir, temperature, detector)


def _read_arrays(state: Path, layout: Any, key: str) -> dict[str, np.ndarray] | None:
    """The arrays under `key` in an Orbax state item, by their path below it, read with
    TensorStore as Orbax stores them (its checkpoint format guide): each a zarr (or zarr3)
    array named by its path joined with '.', in one OCDBT database or (older Orbax) a folder
    of its own, as the item's `_METADATA` says."""
    try:
        leaves = layout["tree_metadata"].values()
        paths = [[str(k["key"]) for k in leaf["key_metadata"]] for leaf in leaves]
        paths = [path for path in paths if path[0] == key]
    except (AttributeError, KeyError, TypeError):
        return None
    if not paths:
        return None
    import tensorstore as ts

    folder = state.absolute()
    driver = "zarr3" if layout.get("use_zarr3") else "zarr"

    def kvstore(name: str) -> dict[str, Any]:
        if layout.get("use_ocdbt"):
            return {
                "driver": "ocdbt",
                "base": {"driver": "file", "path": f"{folder}/"},
                "path": name,
            }
        return {"driver": "file", "path": f"{folder}/{name}/"}

    try:
        opening = [
            ts.open({"driver": driver, "kvstore": kvstore(".".join(p))}, read=True) for p in paths
        ]
        reads = [store.result().read() for store in opening]
        return {"/".join(p[1:]): np.asarray(read.result()) for p, read in zip(paths, reads)}
    except Exception:  # whatever TensorStore raises, Orbax's restore then names it
        return None

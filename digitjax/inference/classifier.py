"""The one inference contract, shared by everything that answers (predict, the API, the page):

- a `Classifier` turns (N, 28, 28) images in [0, 1] into (N, 10) calibrated probabilities and
  its non-digit detector's score (`outputs`), and says what it is (`ModelInfo`); a checkpoint
  (`CheckpointClassifier`) and a file written by `digitjax export` (`export.ExportedModel`)
  are classifiers (`predict.load_classifier` opens whichever the user named);
- `in_batches` runs a forward pass over padded power-of-two batches, so any number of images
  costs at most one compilation per batch size, and steadies the non-digit scores near the
  threshold (`weights.steady_scores`), so that every kind of classifier scores alike;
- `judge` is the one policy that says whether an answer is a digit, not sure, or not a digit
  (a model with a detector refuses what does not look like a digit, however sure its ten
  probabilities are);
- `Prediction` is the one schema an answer is shown in (`predict --json/--csv`, the API, the page).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from digitjax.config import UserError
from digitjax.weights import steady_scores

BUNDLED_MODEL = Path(__file__).parents[1] / "assets" / "model"
MAX_BATCH = 256
NUM_DIGITS = 10
# A classifier's outputs for an image: the ten calibrated probabilities, then this column: the
# non-digit detector's score, positive for an image that does not look like a digit (NaN for
# a model without a detector).
NON_DIGIT_SCORE = NUM_DIGITS
NUM_OUTPUTS = NUM_DIGITS + 1

# A calibrated model's answers below this confidence are marked "not sure": with the bundled
# model, the lowest threshold that leaves most non-digit images flagged while few real digits
# are (benchmarks/uncertain_rate.py, benchmarks/README.md).
DEFAULT_MIN_CONFIDENCE = 0.95
# Below this confidence an answer is "not a digit" rather than a digit the model is unsure of:
# a model taught to refuse non-digits spreads their probability over the ten classes. An image
# the model's non-digit detector flags is "not a digit" too, however sure its top class.
NOT_A_DIGIT_BELOW = 0.5

Verdict = Literal["digit", "not_sure", "not_a_digit"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model is, without the host's paths: safe to show to any client."""

    name: str  # "bundled", the run folder's name, or the exported file's name
    kind: str  # "checkpoint", "onnx" or "stablehlo"
    step: int | None
    test_accuracy: float | None  # on its dataset's test split, at that step
    temperature: float | None  # None: the probabilities are not calibrated
    dataset: str
    num_classes: int
    detects_non_digits: bool  # it has a non-digit detector (detector.py)

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"calibrated": self.calibrated}


class Classifier(Protocol):
    info: ModelInfo
    source: Path  # where it was loaded from, for this machine's own messages

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """(N, 28, 28) float32 images in [0, 1] → (N, NUM_OUTPUTS): the calibrated class
        probabilities, then the non-digit score."""
        ...


def packed(probabilities: np.ndarray, non_digit_scores: np.ndarray | None) -> np.ndarray:
    """(N, NUM_OUTPUTS) outputs from a forward pass's two results."""
    scores = np.full(len(probabilities), np.nan) if non_digit_scores is None else non_digit_scores
    return np.concatenate([probabilities, np.reshape(scores, (-1, 1))], axis=1, dtype=np.float32)


def padded_size(count: int) -> int:
    """The batch `count` images run in: the next power of two, at most MAX_BATCH."""
    return min(MAX_BATCH, 1 << max(count - 1, 0).bit_length())


def batch_sizes(largest: int) -> list[int]:
    """Every batch size `in_batches` can run up to `largest` images in, smallest first."""
    return [2**i for i in range(padded_size(largest).bit_length())]


def in_batches(forward: Callable[[np.ndarray], Any], images: np.ndarray) -> np.ndarray:
    """`forward` (a batch of images to its (B, NUM_OUTPUTS) outputs) over `images`, with the
    non-digit scores near the threshold steadied by running their images again, shifted."""
    images = np.asarray(images, np.float32)
    outputs = _padded_batches(forward, images)
    outputs[:, NON_DIGIT_SCORE] = steady_scores(
        outputs[:, NON_DIGIT_SCORE],
        images,
        lambda views: _padded_batches(forward, views)[:, NON_DIGIT_SCORE],
    )
    return outputs


def _padded_batches(forward: Callable[[np.ndarray], Any], images: np.ndarray) -> np.ndarray:
    """`forward` over `images` in zero-padded batches of one power-of-two size."""
    batch = padded_size(len(images))
    padded = np.zeros((-(-len(images) // batch) * batch, *images.shape[1:]), np.float32)
    padded[: len(images)] = images
    outputs = [np.asarray(forward(padded[i : i + batch])) for i in range(0, len(padded), batch)]
    return np.concatenate(outputs)[: len(images)] if outputs else np.zeros((0, NUM_OUTPUTS))


def check_digit_model(info: ModelInfo, source: Path) -> None:
    if info.num_classes != NUM_DIGITS or info.dataset != "mnist":
        raise UserError(
            f"{source} is a {info.dataset} model, not a digit model: pass a digit model "
            "(a digitjax run on mnist, or a file exported from one)"
        )


class CheckpointClassifier:
    """A restored checkpoint with one jitted forward pass: the softmax of the logits divided
    by the checkpoint's temperature, if it has one, and its non-digit detector's score."""

    def __init__(self, path: Path):
        import jax

        from digitjax.checkpoint import restore_model
        from digitjax.model import calibrated_outputs, conv_impls_for

        model = restore_model(path)
        self.source = model.step_dir
        self.info = checkpoint_info(model)
        self.params = model.params
        conv_impls = conv_impls_for(
            jax.default_backend(), training=False, num_layers=len(model.config.channels)
        )
        temperature, detector = model.temperature, model.detector
        self._forward = jax.jit(
            lambda params, images: calibrated_outputs(
                model.graphdef, params, images, conv_impls, temperature, detector
            )
        )

    def outputs(self, images: np.ndarray) -> np.ndarray:
        return in_batches(lambda batch: packed(*self._forward(self.params, batch)), images)


def step_record(model: Any) -> dict[str, Any]:
    """The history record of the epoch a restored `checkpoint.TrainedModel` was saved at
    (empty for a checkpoint saved mid-epoch by a Ctrl-C)."""
    step = int(model.step_dir.name)
    return next((r for r in model.summary.get("history", []) if r["step"] == step), {})


def checkpoint_info(model: Any) -> ModelInfo:
    """The ModelInfo of a restored `checkpoint.TrainedModel`."""
    bundled = model.step_dir.is_relative_to(BUNDLED_MODEL)
    return ModelInfo(
        name="bundled" if bundled else model.step_dir.parents[1].name,
        kind="checkpoint",
        step=int(model.step_dir.name),
        test_accuracy=step_record(model).get("test_accuracy"),
        temperature=model.temperature,
        dataset=model.config.dataset,
        num_classes=model.summary.get("num_classes", NUM_DIGITS),
        detects_non_digits=model.detector is not None,
    )


def default_min_confidence(info: ModelInfo) -> float | None:
    """DEFAULT_MIN_CONFIDENCE for a calibrated model; none for one without a temperature,
    whose confidences are not probabilities to trust (a label-smoothed model shows ~90% for
    an obvious digit), unless the user asks for a threshold."""
    return DEFAULT_MIN_CONFIDENCE if info.calibrated else None


def judge(
    confidence: float, min_confidence: float | None, non_digit_score: float | None = None
) -> Verdict:
    """ "Not a digit" where the detector flags the image (a positive score); else a digit at
    `min_confidence` or more (always, without a threshold); below it "not sure"; below
    NOT_A_DIGIT_BELOW too, "not a digit"."""
    if non_digit_score is not None and non_digit_score > 0:
        return "not_a_digit"
    if min_confidence is None or confidence >= min_confidence:
        return "digit"
    return "not_a_digit" if confidence < NOT_A_DIGIT_BELOW else "not_sure"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's answer. `digit` is None when the image holds no digit: it could not be read
    or preprocessing found nothing (`error` says which), or the model judged it not a digit."""

    name: str | None  # the file's path (predict) or the upload's file name (API)
    digit: int | None = None
    confidence: float | None = None  # the top calibrated probability
    verdict: Verdict | None = None  # None when there is an error
    probabilities: tuple[float, ...] | None = None
    non_digit_score: float | None = None  # None: an error, or a model without a detector
    error: str | None = None

    @property
    def uncertain(self) -> bool | None:
        """Flagged: not sure, or not a digit; None for an image with an error."""
        return None if self.verdict is None else self.verdict != "digit"

    def top(self, k: int = 3) -> list[tuple[int, float]]:
        if self.probabilities is None:
            return []
        order = np.argsort(-np.asarray(self.probabilities), kind="stable")[:k]
        return [(int(d), self.probabilities[d]) for d in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digit": self.digit,
            "confidence": self.confidence,
            "uncertain": self.uncertain,
            "verdict": self.verdict,
            "probabilities": None if self.probabilities is None else list(self.probabilities),
            "non_digit_score": self.non_digit_score,
            "error": self.error,
        }


def answer(name: str | None, outputs: np.ndarray, min_confidence: float | None) -> Prediction:
    """The Prediction for one image's outputs, the probabilities rounded to 6 decimals as every
    surface shows them (so predict, the API and the page agree to the digit), the non-digit
    score to 2: a sum over ~600 features, it differs between the numpy and the JAX forward
    pass in its fifth decimal, and only its sign decides."""
    probabilities = outputs[:NUM_DIGITS]
    rounded = tuple(round(float(p), 6) for p in probabilities)
    best = int(np.argmax(probabilities))
    score = (
        None if np.isnan(outputs[NON_DIGIT_SCORE]) else round(float(outputs[NON_DIGIT_SCORE]), 2)
    )
    verdict = judge(rounded[best], min_confidence, score)
    digit = None if verdict == "not_a_digit" else best
    return Prediction(name, digit, rounded[best], verdict, rounded, score)


def failed(name: str | None, error: str) -> Prediction:
    return Prediction(name, error=error)

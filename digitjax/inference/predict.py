"""Recognizing the user's own images: find the files, preprocess them like MNIST, and run one
compiled forward pass over all of them."""

import dataclasses
import glob
from pathlib import Path

import numpy as np

from digitjax.config import UserError
from digitjax.inference.parallel import preprocess_many
from digitjax.outputs import write_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BUNDLED_MODEL = Path(__file__).parents[1] / "assets" / "model"
MAX_BATCH = 256
TOP_K = 3


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str
    digit: int | None = None
    confidence: float | None = None
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    error: str | None = None  # why there is no digit: unreadable file, blank image...
    uncertain: bool = False  # a digit, but with a confidence below --min-confidence

    def to_dict(self) -> dict:
        fields = {
            "path": self.path,
            "digit": self.digit,
            "confidence": self.confidence,
            "uncertain": self.uncertain,
            "top": [list(pair) for pair in self.top],
        }
        return fields | ({"error": self.error} if self.error else {})


def collect_images(patterns: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Expands files, folders (recursively) and globs; returns the images and per-path errors."""
    files, errors = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(Prediction(pattern, error="folder holds no images"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                errors.append(Prediction(pattern, error="no such file"))
            files.extend(matches)
    return list(dict.fromkeys(files)), errors


def default_checkpoint() -> Path:
    """The newest run's best checkpoint, else the model shipped with the package."""
    from digitjax.checkpoint import newest_run

    return newest_run() or BUNDLED_MODEL


class Predictor:
    """A restored model with one jitted forward pass returning class probabilities: the
    softmax of the logits divided by the checkpoint's temperature, if it has one."""

    def __init__(self, checkpoint_path: Path | None = None):
        import jax

        from digitjax.checkpoint import restore_model
        from digitjax.model import conv_impls_for, probabilities

        model = restore_model(checkpoint_path or default_checkpoint())
        if model.summary["num_classes"] != 10 or model.config.dataset != "mnist":
            raise UserError(
                f"{model.step_dir} was trained on {model.config.dataset}, not on digits: "
                "pass --checkpoint with a digit model"
            )
        self.params, self.step_dir = model.params, model.step_dir
        self.config, self.summary = model.config, model.summary
        self.temperature = model.temperature
        conv_impls = conv_impls_for(
            jax.default_backend(), training=False, num_layers=len(model.config.channels)
        )

        self.forward = jax.jit(
            lambda params, images: probabilities(
                model.graphdef, params, images, conv_impls, self.temperature
            )
        )

    @property
    def source(self) -> Path:
        """Where the model came from (`digitjax.inference.export.ExportedModel` has one too)."""
        return self.step_dir

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """images: (N, 28, 28) floats in [0, 1]. Pads to a power-of-two batch so that any
        number of images costs at most one compilation per batch size."""
        batch = min(MAX_BATCH, 1 << max(len(images) - 1, 0).bit_length())
        padded = np.zeros((-(-len(images) // batch) * batch, 28, 28), np.float32)
        padded[: len(images)] = images
        chunks = [
            self.forward(self.params, padded[i : i + batch]) for i in range(0, len(padded), batch)
        ]
        return np.concatenate([np.asarray(c) for c in chunks])[: len(images)]


def predict_files(
    predictor: Predictor, files: list[Path], min_confidence: float | None = None
) -> tuple[list[Prediction], dict]:
    """Predictions in input order, and the 28x28 image the model saw for each recognized file;
    those whose confidence is below `min_confidence` (if given) are marked uncertain."""
    outcomes = dict(zip(files, preprocess_many(files)))
    seen = {path: image for path, (image, _) in outcomes.items() if image is not None}
    probabilities = dict(
        zip(seen, predictor.probabilities(np.stack(list(seen.values()))) if seen else [])
    )
    predictions = []
    for path in files:
        if path not in seen:
            predictions.append(Prediction(str(path), error=outcomes[path][1]))
            continue
        probs = probabilities[path]
        top = [(int(d), float(probs[d])) for d in np.argsort(-probs)[:TOP_K]]
        uncertain = min_confidence is not None and top[0][1] < min_confidence
        predictions.append(Prediction(str(path), top[0][0], top[0][1], top, uncertain=uncertain))
    return predictions, seen


def write_csv(path: Path, predictions: list[Prediction]) -> None:
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "digit", "confidence", "uncertain", "top", "error"])
    for p in predictions:
        top = " ".join(f"{d}:{prob:.4f}" for d, prob in p.top)
        uncertain = "" if p.digit is None else str(p.uncertain).lower()
        writer.writerow([p.path, p.digit, p.confidence, uncertain, top, p.error or ""])
    write_file(path, text.getvalue().encode())


def save_seen(folder: Path, seen: dict[Path, np.ndarray]) -> None:
    """The 28x28 image the model saw for each input, as `<input name>.png`."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, image in seen.items():
        name = path.stem
        while name in used:  # same file name in different folders
            name += "_"
        used.add(name)
        png = io.BytesIO()
        Image.fromarray((image * 255).round().astype("uint8")).save(png, "PNG")
        write_file(folder / f"{name}.png", png.getvalue())

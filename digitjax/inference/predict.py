"""Recognizing the user's own images: choose the model, find the files, preprocess them like
MNIST, and run one compiled forward pass over all of them."""

import functools
import glob
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from digitjax.inference.classifier import (
    BUNDLED_MODEL,
    CheckpointClassifier,
    Classifier,
    Prediction,
    answer,
    check_digit_model,
    failed,
)
from digitjax.inference.parallel import preprocess_many, preprocess_previewed
from digitjax.inference.preprocess import NO_DIGIT_FOUND, png_bytes
from digitjax.outputs import write_file, write_files

# What a folder search takes: the names of preprocess.FORMATS' files.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif"}
IMAGE_SUFFIXES |= {".ppm", ".pgm", ".pbm", ".pnm"}
# Up to this many images, `predict` runs its model on numpy: JAX's, Flax's and Orbax's imports
# and the restore (~1.5 s) cost more than numpy's slower forward pass (~1 ms more per image of
# the bundled model than JAX's; benchmarks/README.md, "Cold predict").
NUMPY_UP_TO = 1000
# `predict --plot` shows each input in a cell ~150 px across: a preview of this size keeps
# it legible at a few times the memory of the 28x28 digit.
PREVIEW_SIDE = 96


class Seen(NamedTuple):
    """What the model saw of an input, and for a plot (else None) a small copy of the input."""

    digit: np.ndarray
    preview: np.ndarray | None


def default_checkpoint(ensemble: bool = False) -> Path:
    """The best checkpoint of the newest run that has one, else the model shipped with the
    package: a run stopped in its first epoch holds only its unfinished weights (`latest/`),
    no answer anyone asked for. Of a `--seeds` run, its first seed's run, or with `ensemble`
    the whole run (which `evaluate` reports as the ensemble of its seeds)."""
    from digitjax.runs import BEST, has_checkpoint, newest_run, seed_run_dirs

    newest = newest_run(kinds=(BEST,))
    if newest is not None and not ensemble and seed_run_dirs(newest):
        return next(run for run in seed_run_dirs(newest) if has_checkpoint(run, (BEST,)))
    return newest or BUNDLED_MODEL


def load_classifier(path: Path | None = None, quick_start: bool = False) -> Classifier:
    """The model at `path`: a file written by `digitjax export` (told by its content), else a
    run or checkpoint folder; by default the newest run, else the bundled model. With
    `quick_start` (a one-off command), a checkpoint runs on numpy where it can: importing JAX
    (and Flax and Orbax) costs more than a numpy forward pass; a server keeps JAX's, ~3x
    faster on large batches."""
    if path is None:
        path = default_checkpoint()
    if path.is_file() or path.suffix.lower() in (".onnx", ".stablehlo"):
        from digitjax.inference.export import ExportedModel

        classifier: Classifier = ExportedModel(path)
    elif quick_start and (quick := quick_classifier(path)) is not None:
        classifier = quick
    else:
        from digitjax.compilation import enable_compilation_cache

        enable_compilation_cache()  # a fresh process loads the forward pass compiled before
        classifier = CheckpointClassifier(path)
    check_digit_model(classifier.info, path)
    return classifier


def quick_classifier(path: Path) -> Classifier | None:
    """The checkpoint at `path` on numpy, without importing JAX: the bundled model from its
    `weights.npz`, any other from its weights read by TensorStore; None where neither can."""
    from digitjax.inference.bundled import bundled_classifier, checkpoint_classifier

    if path == BUNDLED_MODEL:
        bundled = bundled_classifier()
        if bundled is not None:
            return bundled
    return checkpoint_classifier(path)


def collect_images(patterns: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Expands files, folders (recursively) and globs; returns the images and per-path errors.
    A path named by the user is read as given (/dev/stdin too); a search finds regular files
    only: a named pipe would block the run, a folder named like an image is no image."""
    files, errors = [], []
    for pattern in patterns:
        path = Path(pattern)
        if not pattern:  # Path("") is the current folder, which nobody meant
            errors.append(failed('""', "no such file (an empty name)"))
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not found:
                errors.append(failed(pattern, "folder holds no images"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif path.is_symlink():
            errors.append(failed(pattern, "a link that leads to no file"))
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                is_glob = re.search(r"[*?]|\[.+\]", pattern) is not None
                errors.append(failed(pattern, "no file matches" if is_glob else "no such file"))
            files.extend(matches)
    return list(dict.fromkeys(files)), errors


def predict_files(
    classifier: Classifier, files: list[Path], min_confidence: float | None, previews: bool = False
) -> tuple[list[Prediction], dict[Path, Seen]]:
    """Predictions in input order, judged at `min_confidence`, and what the model saw of each
    file in which preprocessing found a digit (with `previews`, and a small copy of the file)."""
    preview_side = PREVIEW_SIDE if previews else 0
    preprocess = functools.partial(preprocess_previewed, preview_side=preview_side)
    outcomes = dict(zip(files, preprocess_many(files, preprocess=preprocess)))
    seen = {
        path: Seen(digit, preview)
        for path, ((digit, _), preview) in outcomes.items()
        if digit is not None
    }
    digits = [s.digit for s in seen.values()]
    outputs = dict(zip(seen, classifier.outputs(np.stack(digits)) if digits else []))
    return [
        answer(str(path), outputs[path], min_confidence)
        if path in seen
        else failed(str(path), outcomes[path][0][1] or NO_DIGIT_FOUND)
        for path in files
    ], seen


def write_csv(path: Path, predictions: list[Prediction]) -> None:
    """The predictions in the schema of `--json`, a row each; probabilities space-separated."""
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(Prediction(None).to_dict())  # the column names
    for prediction in predictions:
        row = prediction.to_dict()
        row["probabilities"] = " ".join(map(str, row["probabilities"] or ()))
        writer.writerow(
            ["" if v is None else str(v).lower() if v in (True, False) else v for v in row.values()]
        )
    # A file name that is not UTF-8 is written as its bytes: the CSV names the file there is.
    write_file(path, text.getvalue().encode("utf-8", "surrogateescape"))


def preprocessed_names(folder: Path, files: list[Path]) -> dict[Path, Path]:
    """Where `save_seen` writes each input's 28x28 image: `<input name>.png`. Named over every
    input, read or not, so that the names are known (and checked) before the work."""
    names: dict[Path, Path] = {}
    used: set[str] = set()
    for path in files:
        name = path.stem
        while name in used:  # same file name in different folders
            name += "_"
        used.add(name)
        names[path] = folder / f"{name}.png"
    return names


def save_seen(folder: Path, files: list[Path], seen: dict[Path, Seen]) -> None:
    """The 28x28 image the model saw for each of the `files` it saw, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = preprocessed_names(folder, files)
    write_files({names[path]: png_bytes(image.digit) for path, image in seen.items()})

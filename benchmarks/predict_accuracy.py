"""Per-kind accuracy of `digitjax predict` on generated user images (benchmarks/user_digits.py)
for one or more models side by side, beside the accuracy of the same model on the same images
merely resized to 28x28. "no digit found" on an image (every one holds a digit) counts as wrong.

    python benchmarks/predict_accuracy.py --per-kind 200 [--checkpoint RUN ...] [--kinds K ...]

Prints a JSON report, then a markdown table (accuracy, with the count of "no digit found" in
brackets when there are any). Without --checkpoint: the model bundled in the package.
"""

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from digitjax.inference.classifier import BUNDLED_MODEL, NUM_DIGITS, CheckpointClassifier
from digitjax.inference.parallel import preprocess_many
from digitjax.inference.preprocess import load_grayscale
from digitjax.synthetic.user_digits import KINDS, generate


def plain_resize(path: Path) -> np.ndarray:
    gray = load_grayscale(path)
    return np.asarray(Image.fromarray(gray).resize((28, 28), Image.Resampling.BILINEAR))


def score(predictor: CheckpointClassifier, samples: list, seen: list, resized: np.ndarray) -> dict:
    """Per kind: images, accuracy, plain-resize accuracy and "no digit found" count."""
    found = [i for i, image in enumerate(seen) if image is not None]
    digits = np.full(len(samples), -1)
    if found:
        probabilities = predictor.outputs(np.stack([seen[i] for i in found]))[:, :NUM_DIGITS]
        digits[found] = probabilities.argmax(axis=1)
    resize_digits = predictor.outputs(resized)[:, :NUM_DIGITS].argmax(axis=1)
    counts = {name: Counter() for name in dict.fromkeys(kind for _, _, kind in samples)}
    for (_, label, kind), digit, resize_digit in zip(samples, digits, resize_digits):
        counts[kind].update(
            n=1,
            correct=int(digit == label),
            no_digit=int(digit == -1),
            resize=int(resize_digit == label),
        )
    return {
        kind: {
            "images": c["n"],
            "accuracy": c["correct"] / c["n"],
            "no_digit_found": c["no_digit"],
            "plain_resize_accuracy": c["resize"] / c["n"],
        }
        for kind, c in counts.items()
    }


def markdown(reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = [
        "| kind | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for kind in next(iter(reports.values())):
        cells = []
        for name in names:
            result = reports[name][kind]
            missing = f" ({result['no_digit_found']} no digit)" if result["no_digit_found"] else ""
            cells.append(f"{100 * result['accuracy']:.1f}%{missing}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=[BUNDLED_MODEL])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args()
    predictors = [CheckpointClassifier(path) for path in args.checkpoint]
    with tempfile.TemporaryDirectory() as folder:
        samples = generate(Path(folder), args.per_kind, args.seed, kinds=tuple(args.kinds))
        fonts = (Path(folder) / "fonts.txt").read_text().splitlines()
        paths = [path for path, _, _ in samples]
        # Preprocessed once for all models, on one core (the machine is shared).
        seen = [image for image, _ in preprocess_many(paths, workers=1)]
        resized = np.stack([plain_resize(path) for path in paths])
    names = ["bundled" if path == BUNDLED_MODEL else str(path) for path in args.checkpoint]
    reports = {name: score(p, samples, seen, resized) for name, p in zip(names, predictors)}
    print(json.dumps({"seed": args.seed, "fonts": fonts, "models": reports}, indent=2))
    print(markdown(reports))


if __name__ == "__main__":
    main()

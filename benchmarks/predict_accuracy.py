"""Per-kind accuracy of `digitjax predict` on generated user images, beside the accuracy of
the same model on the same images merely resized to 28x28.

    python benchmarks/predict_accuracy.py --per-kind 200 [--checkpoint RUN]
"""

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from user_digits import generate

from digitjax.predict import Predictor, predict_files
from digitjax.preprocess import load_grayscale


def plain_resize(path: Path) -> np.ndarray:
    gray = load_grayscale(path)
    return np.asarray(Image.fromarray(gray).resize((28, 28), Image.Resampling.BILINEAR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    predictor = Predictor(args.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        samples = generate(Path(folder), args.per_kind, args.seed)
        predictions, _ = predict_files(predictor, [path for path, _, _ in samples])
        resized = predictor.probabilities(np.stack([plain_resize(p) for p, _, _ in samples]))
    by_kind = defaultdict(lambda: {"correct": 0, "resize_correct": 0, "no_digit": 0, "n": 0})
    for (_, label, kind), prediction, probs in zip(samples, predictions, resized):
        counts = by_kind[kind]
        counts["n"] += 1
        counts["correct"] += prediction.digit == label
        counts["no_digit"] += prediction.digit is None
        counts["resize_correct"] += int(probs.argmax()) == label
    report = {
        kind: {
            "images": c["n"],
            "accuracy": c["correct"] / c["n"],
            "plain_resize_accuracy": c["resize_correct"] / c["n"],
            "no_digit_found": c["no_digit"],
        }
        for kind, c in by_kind.items()
    }
    print(
        json.dumps(
            {"checkpoint": str(predictor.step_dir), "seed": args.seed, "kinds": report}, indent=2
        )
    )


if __name__ == "__main__":
    main()

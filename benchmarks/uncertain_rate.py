"""How often `digitjax predict --min-confidence P` marks a prediction uncertain, per kind of
image: on images with no digit (`non_digits.py`: faces, text, letters, textures, scribbles),
where it should, and on digit images (`user_digits.py`), where it is a false alarm. Images in
which preprocessing finds no digit at all are counted apart ("no digit found": not a
confident wrong answer either).

    python benchmarks/uncertain_rate.py --per-kind 100 [--checkpoint RUN] [--thresholds 0.5,0.9]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from digitjax.inference.predict import load_classifier, predict_files
from digitjax.synthetic import user_digits
from digitjax.synthetic.non_digits import generate as generate_non_digits


def rates(confidences: list[float | None], thresholds: list[float]) -> dict:
    """The share of images below each threshold, among all images of a kind (an image with
    no digit found counts as neither)."""
    found = np.array([c for c in confidences if c is not None])
    return {
        "images": len(confidences),
        "no_digit_found": len(confidences) - len(found),
        "uncertain": {f"{t:g}": float((found < t).sum() / len(confidences)) for t in thresholds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    predictor = load_classifier(args.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        non_digits = generate_non_digits(Path(folder) / "non_digits", args.per_kind, args.seed)
        digits = user_digits.generate(Path(folder) / "digits", args.per_kind, args.seed)
        samples = [(path, kind, None) for path, kind in non_digits]
        samples += [(path, kind, label) for path, label, kind in digits]
        predictions, _ = predict_files(predictor, [path for path, _, _ in samples], None)
    by_kind: dict[str, list] = {}
    for (_, kind, label), prediction in zip(samples, predictions):
        by_kind.setdefault(kind, []).append((prediction, label))
    report = {}
    for kind, results in by_kind.items():
        report[kind] = rates([p.confidence for p, _ in results], thresholds)
        if results[0][1] is not None:  # digits: how often a confident answer is wrong
            report[kind]["wrong_above"] = {
                f"{t:g}": sum(
                    p.digit is not None and p.digit != label and p.confidence >= t
                    for p, label in results
                )
                for t in thresholds
            }
    non_digit_kinds = {kind for _, kind, label in samples if label is None}
    for name, kinds in (
        ("all non-digits", non_digit_kinds),
        ("all digits", set(by_kind) - non_digit_kinds),
    ):
        report[name] = rates(
            [p.confidence for kind in sorted(kinds) for p, _ in by_kind[kind]], thresholds
        )
    print(
        json.dumps(
            {
                "model": predictor.info.to_dict(),
                "seed": args.seed,
                "kinds": report,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""How often a model's answers are flagged (no digit found, "not sure" or "not a digit": see
`digitjax/rejection.py`), per kind of image: on images of no digit (`non_digits.py`), held-out
kinds apart from the kinds trained on, where it should be; on MNIST test and on users' digits
(`user_digits.py`), where it is a false alarm. Every image except MNIST's goes through
`digitjax predict`'s path (a file, preprocessed).

    python benchmarks/uncertain_rate.py --per-kind 100 [--checkpoint RUN] [--seed 0]

Prints a JSON report, then markdown tables: flagged share by top-probability threshold and
group, and per kind at the policy's thresholds.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from digitjax.data import load_dataset
from digitjax.predict import Predictor, predict_files
from digitjax.rejection import MIN_CONFIDENCE, NOT_A_DIGIT, NOT_A_DIGIT_BELOW, verdicts
from digitjax.synthetic import non_digits, user_digits

GROUPS = ("held-out non-digits", "training non-digits", "MNIST test", "user digits")


def rates(probabilities: np.ndarray, missing: int, thresholds: list[float]) -> dict:
    """Among the images of a kind (the probabilities of those in which a digit was found, and
    how many had none): the share flagged at each top-probability threshold and the share the
    policy calls "not a digit", no digit found counting as both."""
    count = len(probabilities) + missing
    tops = probabilities.max(axis=1)
    refused = int((np.asarray(verdicts(probabilities)) == NOT_A_DIGIT).sum())
    return {
        "images": count,
        "no_digit_found": missing,
        "flagged": {f"{t:g}": float(((tops < t).sum() + missing) / count) for t in thresholds},
        "not_a_digit": (refused + missing) / count,
    }


def markdown(report: dict, thresholds: list[float]) -> str:
    head = "| group | " + " | ".join(f"flagged below {t:g}" for t in thresholds) + " |"
    lines = [head, "| --- |" + " --- |" * len(thresholds)]
    for group in GROUPS:
        cells = [f"{100 * report[group]['all']['flagged'][f'{t:g}']:.1f}%" for t in thresholds]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    default = f"{MIN_CONFIDENCE:g}"
    lines += ["", f"| group | kind | flagged (below {default}) | not a digit (below "
              f"{NOT_A_DIGIT_BELOW:g}, or none found) |", "| --- | --- | --- | --- |"]  # fmt: skip
    for group in GROUPS:
        for kind, result in report[group].items():
            lines.append(
                f"| {group} | {kind} | {100 * result['flagged'][default]:.1f}% | "
                f"{100 * result['not_a_digit']:.1f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--thresholds", default=f"0.5,0.8,0.9,{MIN_CONFIDENCE:g},0.99")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if MIN_CONFIDENCE not in thresholds:
        thresholds.append(MIN_CONFIDENCE)
    predictor = Predictor(args.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        samples = non_digits.generate(Path(folder) / "non_digits", args.per_kind, args.seed)
        digits = user_digits.generate(Path(folder) / "digits", args.per_kind, args.seed)
        samples += [(path, kind) for path, _, kind in digits]
        _, seen = predict_files(predictor, [path for path, _ in samples])
    found: dict[str, list] = {}
    missing: dict[str, int] = {}
    for path, kind in samples:
        if path in seen:
            found.setdefault(kind, []).append(seen[path])
        else:
            missing[kind] = missing.get(kind, 0) + 1
    probabilities = {
        kind: predictor.probabilities(np.stack(images)) for kind, images in found.items()
    }
    mnist_images, _ = load_dataset("mnist").split("test")
    report = {
        "MNIST test": {
            "all": rates(predictor.probabilities(mnist_images / np.float32(255)), 0, thresholds)
        }
    }
    kinds_of = {
        "held-out non-digits": non_digits.HELD_OUT_KINDS,
        "training non-digits": non_digits.TRAINING_KINDS,
        "user digits": user_digits.KINDS,
    }
    empty = np.zeros((0, 10), np.float32)
    for group, kinds in kinds_of.items():
        report[group] = {
            kind: rates(probabilities.get(kind, empty), missing.get(kind, 0), thresholds)
            for kind in kinds
        }
        report[group]["all"] = rates(
            np.concatenate([probabilities.get(kind, empty) for kind in kinds]),
            sum(missing.get(kind, 0) for kind in kinds),
            thresholds,
        )
    print(
        json.dumps(
            {
                "checkpoint": str(predictor.step_dir),
                "temperature": predictor.temperature,
                "seed": args.seed,
                "groups": report,
            },
            indent=2,
        )
    )
    print(markdown(report, thresholds))


if __name__ == "__main__":
    main()

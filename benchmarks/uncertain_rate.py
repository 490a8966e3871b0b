"""How often a model's answers are flagged (no digit found, "not sure" or "not a digit", by
its non-digit detector where it has one: see `judge` in `digitjax/inference/classifier.py`),
per kind of image: on images of no digit
(`non_digits.py`), held-out kinds apart from the kinds trained on, where it should be, and
on real images of no digit that nothing in digitjax generated or trained on (Fashion-MNIST
test: photos of clothes, per class); on MNIST test and on users' digits (`user_digits.py`),
where it is a false alarm. Every image except MNIST's goes through `digitjax predict`'s path
(a file, preprocessed).

    python benchmarks/uncertain_rate.py --per-kind 100 [--checkpoint RUN] [--seed 0]

Prints a JSON report, then markdown tables: the share flagged below each top-probability
threshold, by group, and per kind at the default threshold.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from digitjax.data import load_dataset
from digitjax.inference.classifier import (
    DEFAULT_MIN_CONFIDENCE,
    NON_DIGIT_SCORE,
    NOT_A_DIGIT_BELOW,
    NUM_DIGITS,
    judge,
)
from digitjax.inference.predict import load_classifier, predict_files
from digitjax.synthetic import non_digits, user_digits

GROUPS = (
    "held-out non-digits",
    "training non-digits",
    "Fashion-MNIST test",
    "MNIST test",
    "user digits",
)


def fashion_files(folder: Path, count: int) -> list[tuple[Path, str]]:
    """The first `count` Fashion-MNIST test images as PNG files, each with its class name."""
    from PIL import Image

    dataset = load_dataset("fashion_mnist")
    images, labels = dataset.split("test")
    folder.mkdir(parents=True)
    samples = []
    for n, (image, label) in enumerate(zip(images[:count], labels[:count])):
        path = folder / f"fashion_{n:05d}.png"
        Image.fromarray(image).save(path)
        samples.append((path, dataset.class_names[label]))
    return samples


# An image's answer as counted here: its top probability and non-digit score (None: no
# detector), or None where preprocessing found no digit.
Answer = tuple[float, float | None] | None


def rates(answers: list[Answer], thresholds: list[float]) -> dict:
    """Among the images of a kind: the share flagged below each threshold (or by the
    detector), the share the detector flags, and the share `judge` calls "not a digit" at
    the default threshold, no digit found counting as all three."""
    missing = sum(a is None for a in answers)
    tops = np.array([a[0] for a in answers if a is not None])
    detected = np.array([a[1] is not None and a[1] > 0 for a in answers if a is not None])
    refused = sum(
        judge(a[0], DEFAULT_MIN_CONFIDENCE, a[1]) == "not_a_digit" for a in answers if a is not None
    )
    count = len(answers)
    return {
        "images": count,
        "no_digit_found": missing,
        "flagged": {
            f"{t:g}": float(((detected | (tops < t)).sum() + missing) / count) for t in thresholds
        },
        "detector": float((detected.sum() + missing) / count),
        "not_a_digit": (refused + missing) / count,
    }


def markdown(report: dict, thresholds: list[float]) -> str:
    head = "| group | " + " | ".join(f"flagged below {t:g}" for t in thresholds) + " |"
    lines = [head, "| --- |" + " --- |" * len(thresholds)]
    for group in GROUPS:
        cells = [f"{100 * report[group]['all']['flagged'][f'{t:g}']:.1f}%" for t in thresholds]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    default = f"{DEFAULT_MIN_CONFIDENCE:g}"
    lines += ["", f"| group | kind | flagged (below {default}) | detector (or none found) | "
              f"not a digit (detector, below {NOT_A_DIGIT_BELOW:g}, or none found) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for group in GROUPS:
        for kind, result in report[group].items():
            lines.append(
                f"| {group} | {kind} | {100 * result['flagged'][default]:.1f}% | "
                f"{100 * result['detector']:.1f}% | {100 * result['not_a_digit']:.1f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--thresholds", default=f"0.5,0.8,0.9,{DEFAULT_MIN_CONFIDENCE:g},0.99")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if DEFAULT_MIN_CONFIDENCE not in thresholds:
        thresholds.append(DEFAULT_MIN_CONFIDENCE)
    classifier = load_classifier(args.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        samples = non_digits.generate(Path(folder) / "non_digits", args.per_kind, args.seed)
        digits = user_digits.generate(Path(folder) / "digits", args.per_kind, args.seed)
        samples += [(path, kind) for path, _, kind in digits]
        samples += fashion_files(Path(folder) / "fashion", 10 * args.per_kind)
        predictions, _ = predict_files(classifier, [path for path, _ in samples], None)
    answers: dict[str, list[Answer]] = {}
    for (_, kind), p in zip(samples, predictions):
        found = p.confidence is not None
        answers.setdefault(kind, []).append((p.confidence, p.non_digit_score) if found else None)
    mnist_images, _ = load_dataset("mnist").split("test")
    mnist = classifier.outputs(mnist_images / np.float32(255))
    mnist_answers: list[Answer] = [
        (float(row[:NUM_DIGITS].max()), None if np.isnan(s := row[NON_DIGIT_SCORE]) else float(s))
        for row in mnist
    ]
    report = {"MNIST test": {"all": rates(mnist_answers, thresholds)}}
    kinds_of = {
        "held-out non-digits": non_digits.HELD_OUT_KINDS,
        "training non-digits": non_digits.TRAINING_KINDS,
        "user digits": user_digits.KINDS,
        "Fashion-MNIST test": load_dataset("fashion_mnist").class_names,
    }
    for group, kinds in kinds_of.items():
        report[group] = {kind: rates(answers[kind], thresholds) for kind in kinds}
        report[group]["all"] = rates([a for kind in kinds for a in answers[kind]], thresholds)
    print(
        json.dumps(
            {
                "model": classifier.info.to_dict(),
                "seed": args.seed,
                "groups": report,
            },
            indent=2,
        )
    )
    print(markdown(report, thresholds))


if __name__ == "__main__":
    main()

"""How often a model's answers are flagged (no digit found, "not sure" or "not a digit": see
`judge` in `digitjax/inference/classifier.py`), per kind of image: on images of no digit
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
from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE, NOT_A_DIGIT_BELOW, judge
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


def rates(tops: list[float | None], thresholds: list[float]) -> dict:
    """Among the images of a kind (the top probability of each, None where preprocessing found
    no digit): the share flagged below each threshold and the share `judge` calls "not a digit"
    at the default threshold, no digit found counting as both."""
    missing = sum(top is None for top in tops)
    found = np.array([top for top in tops if top is not None])
    refused = sum(judge(float(top), DEFAULT_MIN_CONFIDENCE) == "not_a_digit" for top in found)
    return {
        "images": len(tops),
        "no_digit_found": missing,
        "flagged": {f"{t:g}": float(((found < t).sum() + missing) / len(tops)) for t in thresholds},
        "not_a_digit": (refused + missing) / len(tops),
    }


def markdown(report: dict, thresholds: list[float]) -> str:
    head = "| group | " + " | ".join(f"flagged below {t:g}" for t in thresholds) + " |"
    lines = [head, "| --- |" + " --- |" * len(thresholds)]
    for group in GROUPS:
        cells = [f"{100 * report[group]['all']['flagged'][f'{t:g}']:.1f}%" for t in thresholds]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    default = f"{DEFAULT_MIN_CONFIDENCE:g}"
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
    tops: dict[str, list] = {}
    for (_, kind), prediction in zip(samples, predictions):
        tops.setdefault(kind, []).append(prediction.confidence)
    mnist_images, _ = load_dataset("mnist").split("test")
    mnist_tops = classifier.probabilities(mnist_images / np.float32(255)).max(axis=1)
    report = {"MNIST test": {"all": rates(list(mnist_tops), thresholds)}}
    kinds_of = {
        "held-out non-digits": non_digits.HELD_OUT_KINDS,
        "training non-digits": non_digits.TRAINING_KINDS,
        "user digits": user_digits.KINDS,
        "Fashion-MNIST test": load_dataset("fashion_mnist").class_names,
    }
    for group, kinds in kinds_of.items():
        report[group] = {kind: rates(tops[kind], thresholds) for kind in kinds}
        report[group]["all"] = rates([top for kind in kinds for top in tops[kind]], thresholds)
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

"""How often a model's answers are flagged (no digit found, "not sure" or "not a digit", by
its non-digit detector where it has one: see `judge` in `digitjax/inference/classifier.py`),
per kind of image: on images of no digit
(`non_digits.py`), held-out kinds apart from the kinds trained on, where it should be, and
on real images of no digit that nothing in digitjax generated or trained on (Fashion-MNIST
test: photos of clothes, per class; and the pictograms of the Adwaita icon theme, where it is
installed, `icon_files`); on MNIST test and on users' digits (`user_digits.py`),
where it is a false alarm. Every image except MNIST's goes through `digitjax predict`'s path
(a file, preprocessed).

    python benchmarks/uncertain_rate.py --per-kind 100 [--checkpoint RUN] [--seed 0]

Prints a JSON report, then markdown tables: the share flagged below each top-probability
threshold, by group, and per kind at the default threshold; and, on digits, which of the
flags caught a misreading (the model's top class is not the digit's label) and how many
misreadings went unflagged.
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
    Prediction,
    judge,
)
from digitjax.inference.predict import load_classifier, predict_files
from digitjax.synthetic import non_digits, user_digits

GROUPS = (
    "held-out non-digits",
    "training non-digits",
    "Fashion-MNIST test",
    "Adwaita icons",
    "MNIST test",
    "user digits",
)


# Real pictograms drawn by no one on this project, installed with Chromium (Debian's
# adwaita-icon-theme): a second set of real images of no digit, as untouched as Fashion-MNIST
# was before a threshold was chosen with it (benchmarks/README.md, "Non-digit rejection").
ICON_FOLDER = Path("/usr/share/icons/Adwaita")
ICON_SIZES = ("48x48", "64x64", "96x96", "32x32", "24x24")  # one file per icon, the first found


def icon_files() -> list[tuple[Path, str]]:
    """One PNG per Adwaita icon name (none where the theme is not installed): (path, kind),
    kind "symbolic" (one-colour glyphs) or "full colour". Left out: icons whose names say they
    may show a digit (a number in the name, dial pads, calendars), and the mirrored copies
    for right-to-left languages."""
    chosen: dict[str, Path] = {}
    for size in ICON_SIZES:
        for path in sorted((ICON_FOLDER / size).glob("*/*.png")):
            name = path.name.removesuffix(".png")
            hints_a_digit = (
                any(c.isdigit() for c in name) or "dialpad" in name or "calendar" in name
            )
            if not hints_a_digit and "-rtl" not in name:
                chosen.setdefault(name, path)
    return [
        (path, "symbolic" if "symbolic" in name else "full colour")
        for name, path in sorted(chosen.items())
    ]


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


# An image's answer as counted here: its top probability, non-digit score (None: no
# detector) and whether its top class is the image's digit (None: an image of no digit); or
# None where preprocessing found no digit.
Answer = tuple[float, float | None, bool | None] | None


def rates(answers: list[Answer], thresholds: list[float]) -> dict:
    """Among the images of a kind: the share flagged below each threshold (or by the
    detector), the share the detector flags, and the share `judge` calls "not a digit" at
    the default threshold, no digit found counting as all three; for digits, also the
    shares flagged at the default that were misread or read right, and misread unflagged."""
    missing = sum(a is None for a in answers)
    tops = np.array([a[0] for a in answers if a is not None])
    detected = np.array([a[1] is not None and a[1] > 0 for a in answers if a is not None])
    refused = sum(
        judge(a[0], DEFAULT_MIN_CONFIDENCE, a[1]) == "not_a_digit" for a in answers if a is not None
    )
    count = len(answers)
    result = {
        "images": count,
        "no_digit_found": missing,
        "flagged": {
            f"{t:g}": float(((detected | (tops < t)).sum() + missing) / count) for t in thresholds
        },
        "detector": float((detected.sum() + missing) / count),
        "not_a_digit": (refused + missing) / count,
    }
    read_right = np.array([a[2] for a in answers if a is not None])
    if len(read_right) and read_right[0] is not None:
        flagged = detected | (tops < DEFAULT_MIN_CONFIDENCE)
        misread = ~read_right.astype(bool)
        result["at_the_default"] = {
            "flagged_misread": float((flagged & misread).sum() / count),
            "flagged_read_right": float((flagged & ~misread).sum() / count),
            "unflagged_misread": float((~flagged & misread).sum() / count),
        }
    return result


def answer(prediction: Prediction, label: int | None) -> Answer:
    """`prediction` as counted here; `label`: the digit the image shows (None: no digit)."""
    if prediction.confidence is None or prediction.probabilities is None:
        return None
    read_right = None if label is None else prediction.top(1)[0][0] == label
    return (prediction.confidence, prediction.non_digit_score, read_right)


def markdown(report: dict, thresholds: list[float]) -> str:
    head = "| group | " + " | ".join(f"flagged below {t:g}" for t in thresholds) + " |"
    lines = [head, "| --- |" + " --- |" * len(thresholds)]
    for group in (group for group in GROUPS if group in report):
        cells = [f"{100 * report[group]['all']['flagged'][f'{t:g}']:.1f}%" for t in thresholds]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    default = f"{DEFAULT_MIN_CONFIDENCE:g}"
    lines += ["", f"| group | kind | flagged (below {default}) | detector (or none found) | "
              f"not a digit (detector, below {NOT_A_DIGIT_BELOW:g}, or none found) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for group in (group for group in GROUPS if group in report):
        for kind, result in report[group].items():
            lines.append(
                f"| {group} | {kind} | {100 * result['flagged'][default]:.1f}% | "
                f"{100 * result['detector']:.1f}% | {100 * result['not_a_digit']:.1f}% |"
            )
    lines += ["", f"| group | kind | flagged (below {default}) | of which misread | of which "
              "read right (no digit found apart) | misread, not flagged |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for group in ("MNIST test", "user digits"):
        for kind, result in report[group].items():
            shares = result["at_the_default"]
            lines.append(
                f"| {group} | {kind} | {100 * result['flagged'][default]:.1f}% | "
                f"{100 * shares['flagged_misread']:.1f}% | "
                f"{100 * shares['flagged_read_right']:.1f}% | "
                f"{100 * shares['unflagged_misread']:.1f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        # (path, kind, the digit it shows or None)
        samples: list[tuple[Path, str, int | None]] = [
            (path, kind, None)
            for path, kind in non_digits.generate(
                Path(folder) / "non_digits", args.per_kind, args.seed
            )
            + fashion_files(Path(folder) / "fashion", 10 * args.per_kind)
            + [(path, f"icon: {kind}") for path, kind in icon_files()]
        ]
        samples += [
            (path, kind, label)
            for path, label, kind in user_digits.generate(
                Path(folder) / "digits", args.per_kind, args.seed
            )
        ]
        predictions, _ = predict_files(classifier, [path for path, _, _ in samples], None)
    answers: dict[str, list[Answer]] = {}
    for (_, kind, label), p in zip(samples, predictions):
        answers.setdefault(kind, []).append(answer(p, label))
    mnist_images, mnist_labels = load_dataset("mnist").split("test")
    mnist = classifier.outputs(mnist_images / np.float32(255))
    mnist_answers: list[Answer] = [
        (
            float(row[:NUM_DIGITS].max()),
            None if np.isnan(s := row[NON_DIGIT_SCORE]) else float(s),
            bool(row[:NUM_DIGITS].argmax() == label),
        )
        for row, label in zip(mnist, mnist_labels)
    ]
    report = {"MNIST test": {"all": rates(mnist_answers, thresholds)}}
    kinds_of = {
        "held-out non-digits": non_digits.HELD_OUT_KINDS,
        "training non-digits": non_digits.TRAINING_KINDS,
        "user digits": user_digits.KINDS,
        "Fashion-MNIST test": load_dataset("fashion_mnist").class_names,
        "Adwaita icons": [
            kind for kind in ("icon: symbolic", "icon: full colour") if kind in answers
        ],
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

"""What flags users' digits, per kind, over several seeds: the non-digit detector alone, the
model's own "not sure" alone (top calibrated probability below the default 0.95), both, or no
digit found; how many of the flagged digits were read right; and the misreadings. The images
are `user_digits.py`'s, each through `digitjax predict`'s path (a file, preprocessed).
`uncertain_rate.py` gives one seed's shares beside the non-digits'; this tells the causes
apart, which is what a change to the detector or to the model acts on.

    python benchmarks/user_digit_flags.py [--checkpoint RUN] [--seeds 0,1,2,3] [--per-kind 100]

Prints a JSON report (per kind and per seed), then a markdown table.
"""

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE, Prediction, judge
from digitjax.inference.predict import load_classifier, predict_files
from digitjax.synthetic import user_digits

COLUMNS = ("images", "flagged", "detector", "not_sure", "both", "none_found", "flagged_read_right",
           "misread")  # fmt: skip


def causes(prediction: Prediction, label: int) -> Counter:
    """The counts one image adds to its kind's row."""
    row = Counter(images=1)
    if prediction.confidence is None:  # preprocessing found no digit
        return row + Counter(flagged=1, none_found=1, misread=1)
    score, confidence = prediction.non_digit_score, prediction.confidence
    read_right = prediction.top(1)[0][0] == label
    # Each of the policy's (`judge`'s) two tests alone; `predict` flags what either flags.
    detected = judge(confidence, None, score) != "digit"
    not_sure = judge(confidence, DEFAULT_MIN_CONFIDENCE) != "digit"
    if detected or not_sure:
        row["flagged"] += 1
        row["both" if detected and not_sure else "detector" if detected else "not_sure"] += 1
        row["flagged_read_right"] += read_right
    row["misread"] += not read_right
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--per-kind", type=int, default=100)
    args = parser.parse_args()
    classifier = load_classifier(args.checkpoint)
    by_kind: dict[str, Counter] = {kind: Counter() for kind in user_digits.KINDS}
    by_seed: dict[int, Counter] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            samples = user_digits.generate(Path(folder), args.per_kind, seed)
            predictions, _ = predict_files(classifier, [path for path, _, _ in samples], None)
        by_seed[seed] = Counter()
        for (_, label, kind), prediction in zip(samples, predictions):
            row = causes(prediction, label)
            by_kind[kind] += row
            by_seed[seed] += row
    total = sum(by_kind.values(), Counter())
    rows = {**by_kind, "all": total}
    print(
        json.dumps(
            {
                "model": classifier.info.to_dict(),
                "seeds": list(by_seed),
                "kinds": {kind: {c: row[c] for c in COLUMNS} for kind, row in rows.items()},
                "flagged_by_seed": {
                    seed: row["flagged"] / row["images"] for seed, row in by_seed.items()
                },
            },
            indent=2,
        )
    )
    print("| kind | " + " | ".join(COLUMNS) + " | flagged |")
    print("| --- |" + " --- |" * (len(COLUMNS) + 1))
    for kind, row in rows.items():
        cells = " | ".join(str(row[c]) for c in COLUMNS)
        print(f"| {kind} | {cells} | {100 * row['flagged'] / row['images']:.2f}% |")
    per_seed = ", ".join(
        f"seed {seed}: {100 * row['flagged'] / row['images']:.2f}%" for seed, row in by_seed.items()
    )
    print(f"\nFlagged by seed: {per_seed}")


if __name__ == "__main__":
    main()

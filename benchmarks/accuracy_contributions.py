"""What the weight average and test-time shifts add to a trained run's test accuracy: its
raw weights and its moving average (if it kept one), each alone and with the logits summed
over the test images shifted by up to one pixel (9 shifts).

    python benchmarks/accuracy_contributions.py RUN_DIR [--kind best|latest]
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from digitjax.checkpoint import restore_model
from digitjax.config import uses_ema
from digitjax.data import load_dataset
from digitjax.evaluate import compute_metrics, make_logits_fn, pad_to_batches, split_logits
from digitjax.weights import shifted


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--kind", default="best", choices=("best", "latest"))
    args = parser.parse_args()
    raw = restore_model(args.run_dir, args.kind, average=False)
    models = {"raw weights": raw}
    if uses_ema(raw.config):
        models["moving average"] = restore_model(args.run_dir, args.kind)
    data = load_dataset(raw.config.dataset, raw.config.data_dir)
    logits_fn = make_logits_fn(raw.graphdef)
    results = {"checkpoint": str(raw.step_dir)}
    count = len(data.test_images)

    def logits_of(params, images: np.ndarray) -> np.ndarray:
        return split_logits(logits_fn, params, pad_to_batches(images), count)

    for name, model in models.items():
        plain = logits_of(model.params, data.test_images)
        summed = sum(
            logits_of(model.params, shifted(data.test_images, dy, dx))
            for dy, dx in itertools.product((-1, 0, 1), repeat=2)
        )
        for label, logits in ((name, plain), (f"{name}, 9-shift TTA", summed)):
            metrics = compute_metrics(logits, data.test_labels, data.class_names)
            results[label] = metrics.accuracy
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

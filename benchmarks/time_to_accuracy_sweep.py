"""Wall time to 99% MNIST test accuracy (compilation and evaluations included) for recipe
variants, measured the way `digitjax benchmark --target` measures the default recipe.

    python benchmarks/time_to_accuracy_sweep.py [--target 0.99] [VARIANT ...]
"""

import argparse
import json

from digitjax.benchmark import time_to_accuracy
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh

VARIANTS = {
    "default": {},
    "1 epoch": {"epochs": 1},
    "1 epoch, no augmentation": {"epochs": 1, "augment_shift": 0},
    "1 epoch, no augmentation, batch 256, lr 5e-3": {
        "epochs": 1,
        "augment_shift": 0,
        "batch_size": 256,
        "learning_rate": 5e-3,
    },
    "1 epoch, no augmentation, lr 5e-3, warmup 0.2": {
        "epochs": 1,
        "augment_shift": 0,
        "learning_rate": 5e-3,
        "warmup_epochs": 0.2,
    },
    "2 epochs, no augmentation": {"epochs": 2, "augment_shift": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--target", type=float, default=0.99)
    args = parser.parse_args()
    dataset, mesh = load_dataset("mnist"), make_mesh()
    for name in args.variants:
        result = time_to_accuracy(Config(**VARIANTS[name]), dataset, args.target, mesh)
        print(
            json.dumps(
                {
                    "variant": name,
                    "flags": VARIANTS[name],
                    "reached": result["reached"],
                    "seconds": round(result["seconds"], 2),
                    "final_accuracy": result["evaluations"][-1]["test_accuracy"],
                }
            )
        )


if __name__ == "__main__":
    main()

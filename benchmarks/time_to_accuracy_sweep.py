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
    "--epochs 1": {"epochs": 1},
    "--epochs 3": {"epochs": 3},
    "--augment-shift 2": {"augment_shift": 2},
    "--batch-size 128 --learning-rate 5e-3": {"batch_size": 128, "learning_rate": 5e-3},
    "--channels 12,24,48": {"channels": (12, 24, 48)},
    "--channels 16,32,64 (the previous default model)": {"channels": (16, 32, 64)},
    "previous default recipe (16,32,64, batch 128, shifts, warmup 0.5, 10 epochs)": {
        "channels": (16, 32, 64),
        "batch_size": 128,
        "augment_shift": 2,
        "warmup_epochs": 0.5,
        "epochs": 10,
    },
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

"""Wall time to 99% MNIST test accuracy (compilation and evaluations included) for recipe
variants, measured as `digitjax benchmark --target` measures its own recipe, `--preset fast
--epochs 1` ("default"), which each variant's flags override. (Before 2026-12-07 that recipe,
and what the variants changed, was `--preset fast` itself, of 2 epochs: now "--epochs 2".)

    python benchmarks/time_to_accuracy_sweep.py [--target 0.99] [--seeds 0,1,2] [VARIANT ...]
"""

import argparse
import itertools
import json

from digitjax.benchmark import TIME_TO_ACCURACY_EPOCHS, time_to_accuracy
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh

VARIANTS = {
    "default": {},
    "--epochs 2": {"epochs": 2},
    **{f"--seed {seed}": {"seed": seed} for seed in range(1, 5)},
    "--ema-decay 0": {"ema_decay": 0.0},
    "--dense 128": {"dense": 128},
    "--learning-rate 3e-3 --warmup-epochs 0.2": {"learning_rate": 3e-3, "warmup_epochs": 0.2},
    "previous default (--dense 128 --learning-rate 3e-3 --warmup-epochs 0.2 --ema-decay 0)": {
        "dense": 128,
        "learning_rate": 3e-3,
        "warmup_epochs": 0.2,
        "ema_decay": 0.0,
    },
    "--ema-decay 0.995": {"ema_decay": 0.995},
    "--batch-size 32 --learning-rate 3.5e-3": {"batch_size": 32, "learning_rate": 3.5e-3},
    "--batch-size 128 --learning-rate 6e-3": {"batch_size": 128, "learning_rate": 6e-3},
    "--channels 16,16,32": {"channels": (16, 16, 32)},
    "--channels 16,32": {"channels": (16, 32)},
    "--learning-rate 1e-2": {"learning_rate": 1e-2},
    "--batch-size 128 --learning-rate 1e-2": {"batch_size": 128, "learning_rate": 1e-2},
    "--channels 8,16": {"channels": (8, 16)},
    "--ema-decay 0.98": {"ema_decay": 0.98},
    "--label-smoothing 0": {"label_smoothing": 0.0},
    "--warmup-epochs 0.05": {"warmup_epochs": 0.05},
    "--learning-rate 7e-3 --warmup-epochs 0.05": {"learning_rate": 7e-3, "warmup_epochs": 0.05},
    "--dense 32": {"dense": 32},
    "--weight-decay 0": {"weight_decay": 0.0},
    "--label-smoothing 0.05": {"label_smoothing": 0.05},
    "--learning-rate 7e-3": {"learning_rate": 7e-3},
    "--epochs 1 --ema-decay 0.98": {"epochs": 1, "ema_decay": 0.98},
    # `--preset fast` before 2026-12-05 (afternoon), and what was swept around its change.
    "--learning-rate 5e-3 --adam-beta2 0.999": {"learning_rate": 5e-3, "adam_beta2": 0.999},
    "--adam-beta2 0.9": {"adam_beta2": 0.9},
    "--learning-rate 5e-3": {"learning_rate": 5e-3},
    # The recipe before Nesterov momentum (2026-12-07, night), and what was swept around it.
    "plain AdamW (no --adam-nesterov)": {"adam_nesterov": False},
    "--learning-rate 6e-3": {"learning_rate": 6e-3},
    "--learning-rate 8e-3": {"learning_rate": 8e-3},
    "--learning-rate 9e-3": {"learning_rate": 9e-3},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--seeds", default="0", help="comma-separated, each run per variant")
    args = parser.parse_args()
    dataset, mesh = load_dataset("mnist"), make_mesh()
    for name, seed in itertools.product(args.variants, args.seeds.split(",")):
        flags = {"epochs": TIME_TO_ACCURACY_EPOCHS, "seed": int(seed), **VARIANTS[name]}
        config = Config.from_flags(flags, "fast")
        result = time_to_accuracy(config, dataset, args.target, mesh)
        print(
            json.dumps(
                {
                    "variant": name,
                    "seed": config.seed,
                    "flags": VARIANTS[name],
                    "reached": result["reached"],
                    "seconds": round(result["seconds"], 2),
                    "cpu_seconds": round(result["cpu_seconds"], 2),  # steadier under load
                    "epochs": round(result["epochs"], 2) if result["reached"] else None,
                    "accuracy": result["evaluations"][-1]["test_accuracy"]
                    if result["reached"]
                    else result["final_accuracy"],
                }
            )
        )


if __name__ == "__main__":
    main()

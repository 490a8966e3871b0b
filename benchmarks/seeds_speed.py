"""Times `digitjax train` of one seed against `digitjax train --seeds` of several, interleaved
(the machine is shared), and prints one Markdown row per run: wall and CPU seconds of the
whole command, the load average before it, and each seed's best test accuracy.

    python benchmarks/seeds_speed.py --rounds 2 --seeds 0,1,2,3 -- --epochs 8

Arguments after `--` go to every `digitjax train`. The runs write into a temporary folder.
"""

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path


def timed_run(flags: list[str], out_dir: Path) -> dict:
    """One `digitjax train --json` with `flags`: its JSON, wall and CPU seconds, load before."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        ["digitjax", "train", "--json", "--out", str(out_dir), *flags],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"result": json.loads(done.stdout), "wall": wall, "cpu": cpu, "load": load}


def best_accuracies(result: dict) -> list[float]:
    runs = result["runs"] if "seeds" in result else [result]
    return [run["best"]["test_accuracy"] for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description="Times train of one seed against --seeds.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2,3", help="the --seeds of the many-seed runs")
    parser.add_argument("train_flags", nargs="*", help="flags for every digitjax train")
    args = parser.parse_args()
    variants = {
        "1 seed (--seed 0)": ["--seed", "0"],
        f"--seeds {args.seeds}": ["--seeds", args.seeds],
    }
    print("| round | command | wall s | CPU s | load before | best test accuracy per seed |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(1, args.rounds + 1):
            for name, flags in variants.items():
                out_dir = Path(scratch) / f"{round_number}-{len(flags[1])}"
                run = timed_run([*flags, *args.train_flags], out_dir)
                accuracies = ", ".join(f"{100 * a:.2f}%" for a in best_accuracies(run["result"]))
                print(
                    f"| {round_number} | {name} | {run['wall']:.1f} | {run['cpu']:.1f} "
                    f"| {run['load']:.1f} | {accuracies} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

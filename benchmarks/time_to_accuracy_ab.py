"""Interleaved cold time to 99% of several versions of digitjax, and of the hand-written peer:
each round runs every version once, in a fresh process, in the order of the round before
reversed (ABBA), so that the shared machine's drift falls on all of them alike. Reports wall
and process CPU seconds (steadier under load), and each version's wall seconds over the first
version's, round by round.

    git worktree add /tmp/before <commit>    # or: git archive <commit> | tar -x -C /tmp/before
    python benchmarks/time_to_accuracy_ab.py before=/tmp/before now=. --peer --rounds 3

By default each run calls `time_to_accuracy` first thing in its process; with
`--whole-benchmark` it runs `digitjax benchmark --target` itself and reads the time it
reports, measured after the benchmark's other measurements (which leave their garbage, and
JAX's one-time costs paid).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# What `digitjax benchmark --target` times, each version its own recipe, with the CPU seconds
# measured from outside, so that versions from before `cpu_seconds` existed report it too.
TIME_TO_ACCURACY = """
import json, time
from digitjax.benchmark import time_to_accuracy
from digitjax.config import Config
from digitjax.data import load_dataset
from digitjax.distributed import make_mesh
config = Config.from_flags({}, "fast")
try:
    from digitjax.benchmark import time_to_accuracy_recipe
    config = time_to_accuracy_recipe(config)
except ImportError:  # versions before 2026-12-07 timed `--preset fast` itself
    pass
dataset, mesh = load_dataset("mnist"), make_mesh()
cpu_start = time.process_time()
result = time_to_accuracy(config, dataset, TARGET, mesh)
print(json.dumps({"seconds": result["seconds"], "cpu_seconds": time.process_time() - cpu_start,
                  "epochs": result.get("epochs")}))
"""
# `digitjax benchmark --target TARGET --json`, its default measurements first; versions from
# before `cpu_seconds` existed report 0 CPU seconds.
WHOLE_BENCHMARK = """
import contextlib, io, json, sys
from digitjax.cli import app
out = io.StringIO()
sys.argv = ["digitjax", "benchmark", "--target", "TARGET", "--json"]
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    app()
result = json.loads(out.getvalue())["time_to_accuracy"]
print(json.dumps({"seconds": result["seconds"], "cpu_seconds": result.get("cpu_seconds", 0),
                  "epochs": result.get("epochs")}))
"""
PEER = Path(__file__).resolve().parent / "peer_trainer.py"


def run_once(name: str, source: Path | None, target: float, whole_benchmark: bool) -> dict:
    """One cold run: of the digitjax in `source`, or of the peer (no source)."""
    if source is None:
        args = [sys.executable, str(PEER), "--target", str(target), "--json"]
        env = {**os.environ, "PYTHONPATH": ""}
        return last_json_line(
            subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        )
    if whole_benchmark:
        return run_in_tree(WHOLE_BENCHMARK.replace("TARGET", str(target)), source)
    return run_in_tree(TIME_TO_ACCURACY.replace("TARGET", str(target)), source)


def run_in_tree(code: str, source: Path) -> dict:
    """What Python `code` prints last, as JSON, run in a fresh process on the digitjax of the
    source tree `source`."""
    source = source.resolve()
    env = {**os.environ, "PYTHONPATH": str(source)}
    args = [sys.executable, "-c", code]
    return last_json_line(
        subprocess.run(args, cwd=source, env=env, capture_output=True, text=True, check=True)
    )


def last_json_line(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("versions", nargs="+", help="NAME=SOURCE_TREE")
    parser.add_argument("--peer", action="store_true", help="also run peer_trainer.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument(
        "--whole-benchmark", action="store_true", help="time `digitjax benchmark --target`"
    )
    args = parser.parse_args()
    versions: dict[str, Path | None] = {
        name: Path(tree) for name, tree in (v.split("=", 1) for v in args.versions)
    }
    if args.peer:
        versions["peer"] = None
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    order = list(versions.items())
    for round_number in range(args.rounds):
        # ABBA: a version's place in the round (the host slows over a round of runs) falls
        # on every version alike.
        for name, source in order if round_number % 2 == 0 else order[::-1]:
            run = run_once(name, source, args.target, args.whole_benchmark)
            runs[name].append(run)
            print(
                f"round {round_number}: {name} {run['seconds']:.2f} s, "
                f"CPU {run['cpu_seconds']:.2f} s, epoch {run['epochs']} "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    for name, measured in runs.items():
        for key in ("seconds", "cpu_seconds"):
            values = [run[key] for run in measured]
            print(
                f"{name} {key}: median {statistics.median(values):.2f} "
                f"({min(values):.2f}..{max(values):.2f})"
            )
    print_ratios(runs)


def print_ratios(runs: dict[str, list[dict]]) -> None:
    """Each version's wall seconds over the first version's, round by round: within a round
    both met the same spell of the host, so the ratio is steadier than either's median."""
    first, *others = runs
    for name in others:
        ratios = [run["seconds"] / base["seconds"] for run, base in zip(runs[name], runs[first])]
        print(
            f"{name}/{first}, round by round: median {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}..{max(ratios):.3f}), faster in "
            f"{sum(ratio < 1 for ratio in ratios)} of {len(ratios)} rounds"
        )


if __name__ == "__main__":
    main()

"""Where the time to a target accuracy goes, from `digitjax benchmark --target ... --json`
output files: set-up, compiling the training chunk, training, evaluation; medians and ranges
over the files given, and the process's imports measured here.

    digitjax benchmark --target 0.99 --steps 10 --repeats 1 --json > b1.json  # b2, b3 likewise
    python benchmarks/time_to_accuracy_breakdown.py b1.json b2.json b3.json
"""

import json
import statistics
import subprocess
import sys
import time


def breakdown(result: dict) -> dict[str, float]:
    """Seconds per part of one run. The first chunk's time beyond the median chunk's is its
    compilation; the first evaluation's includes compiling the evaluation."""
    evaluations = result["evaluations"]
    ends = [result["setup_s"]] + [e["seconds"] for e in evaluations]
    chunks = [e["trained_s"] - end for e, end in zip(evaluations, ends, strict=False)]
    compile_s = chunks[0] - statistics.median(chunks[1:]) if len(chunks) > 1 else 0.0
    return {  # the parts add up to the total
        "setup (data to device, initial state)": result["setup_s"],
        "compiling the training chunk": compile_s,
        "training": sum(chunks) - compile_s,
        "evaluation (its compile included)": sum(
            e["seconds"] - e["trained_s"] for e in evaluations
        ),
        "total": result["seconds"],
    }


def import_seconds() -> float:
    """A fresh interpreter's import of what `digitjax benchmark` runs, and the dataset load."""
    code = "from digitjax.benchmark import run_benchmark; from digitjax.data import load_dataset"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{code}; load_dataset('mnist')"], check=True)
    return time.perf_counter() - start


def main() -> None:
    runs = [json.loads(open(path).read())["time_to_accuracy"] for path in sys.argv[1:]]
    parts = [breakdown(run) for run in runs]
    epochs = ", ".join(f"{run['epochs']:.1f}" for run in runs)
    print(f"{len(runs)} runs; crossing at epoch {epochs}")
    rows = {"imports and dataset load (not in the total)": [import_seconds()]}
    rows |= {name: [p[name] for p in parts] for name in parts[0]}
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:<45} {median:5.2f} s ({min(values):.2f}..{max(values):.2f})")


if __name__ == "__main__":
    main()

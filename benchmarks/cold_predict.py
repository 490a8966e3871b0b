"""A cold one-image `digitjax predict`, in fresh processes, against a bare `import jax`:
whole runs interleaved (A, B, A, B...) with medians and ranges, then where the time goes.

    python benchmarks/cold_predict.py IMAGE --checkpoint RUN [--before OLD_CHECKOUT] [--rounds 7]

Run from a folder without checkpoints/ (so that predict's default is the bundled model).
`--before` names a checkout of another version (e.g. `git archive 27ee3f6 | tar -x -C old`),
run through PYTHONPATH; the installed console script runs either. Each configuration runs
once untimed first, so JAX's persistent compilation cache is warm.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The phases of one predict in one process, as the command runs them.
PHASES = """
import sys, time
started = time.perf_counter()
from importlib.util import find_spec
from pathlib import Path
import digitjax.cli
from digitjax.inference.predict import predict_files
marks = {"command's imports": time.perf_counter()}
path = Path(sys.argv[1]) if sys.argv[1] else None
if path is not None:
    import tensorstore  # reads the arrays: through Orbax before, alone now
marks["TensorStore import"] = time.perf_counter()
if path is not None and find_spec("digitjax.weights") is None:  # restores through Orbax
    import digitjax.checkpoint  # jax, flax, orbax
marks["jax, flax, orbax imports"] = time.perf_counter()
try:
    from digitjax.inference.predict import load_classifier

    classifier = load_classifier(path, quick_start=True)  # as `digitjax predict`
except ImportError:  # digitjax before 2026-12-04
    from digitjax.inference.classifier import load_classifier

    classifier = load_classifier(path)
marks["restore (or load)"] = time.perf_counter()
from digitjax.inference.preprocess import preprocess_file
image = preprocess_file(Path(sys.argv[2]))
marks["preprocess"] = time.perf_counter()
forward = getattr(classifier, "outputs", None) or classifier.probabilities  # before 2026-12-05
forward(image[None])
marks["first forward: compile or cache load"] = time.perf_counter()
forward(image[None])
marks["forward pass"] = time.perf_counter()
previous = started
for name, mark in marks.items():
    print(f"{name}\\t{mark - previous:.3f}")
    previous = mark
"""


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--before", help="a checkout of the version to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    versions = {"now": str(Path(__file__).resolve().parents[1])}
    if args.before:
        versions["before"] = args.before
    runs = {"import jax": ([sys.executable, "-c", "import jax"], os.environ.copy())}
    for version, root in versions.items():
        env = {**os.environ, "PYTHONPATH": root}
        predict = ["digitjax", "predict", args.image]
        runs[f"{version}: default model"] = (predict, env)
        runs[f"{version}: --checkpoint"] = ([*predict, "--checkpoint", args.checkpoint], env)
    for command, env in runs.values():
        timed(command, env)  # warm the compilation cache
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (command, env) in runs.items():
            seconds[name].append(timed(command, env))
    base = statistics.median(seconds["import jax"])
    print(f"{'wall seconds':32} median  range        x import jax")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(
            f"{name:32} {median:6.2f}  {min(values):.2f}-{max(values):.2f}  {median / base:5.2f}x"
        )
    for version, root in versions.items():
        env = {**os.environ, "PYTHONPATH": root}
        for checkpoint in ([], [args.checkpoint]):
            label = f"{version}, {'--checkpoint' if checkpoint else 'default model'}"
            phases = [[] for _ in range(7)]
            for _ in range(3):
                out = subprocess.run(
                    [sys.executable, "-c", PHASES, *(checkpoint or [""]), args.image],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                rows = [line.split("\t") for line in out.splitlines()]
                for phase, (_, value) in zip(phases, rows):
                    phase.append(float(value))
            medians = ", ".join(
                f"{name} {statistics.median(values):.3f}" for (name, _), values in zip(rows, phases)
            )
            print(f"phases ({label}), median of 3: {medians}")


if __name__ == "__main__":
    main()

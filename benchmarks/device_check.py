"""One check of digitjax on a machine with a GPU or TPU, ending in one table of figures.

Runs, each in its own process so that every step starts cold as a user's command does:
1. the tests that touch the device (model, train, evaluate, export; the quick ones),
2. `digitjax benchmark --target 0.99 --json`: throughput, compile time, time to 99%,
3. one epoch of `digitjax train --preset best`, timed,
4. `digitjax export` of that run to StableHLO, then that file run on the device over the
   10,000 test images, with jax alone, and its accuracy set against the checkpoint's.

    benchmarks/device_check.sh [--quick] [--out DIR]    # installs the wheels of .whl/ first
    python benchmarks/device_check.py [--quick] [--out DIR]

`--quick` is the same sequence, small enough for a CPU in seconds (no tests, a short benchmark
without a target, a tiny model for one epoch): tests/test_device_check.py runs it. DIR gets
`device_check.json` (every figure) and `device_check.txt` (the table); the steps' output goes
to `device_check.log` there.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# Each step's process takes GPU memory as it needs it, instead of JAX's default 75% of the card
# at its first use, which would leave too little to the next process while this one (or the
# test runner) holds its share.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the environment variable it reads)
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE_TESTS = ["tests/test_model.py", "tests/test_train.py", "tests/test_evaluate.py"]
DEVICE_TESTS += ["tests/test_export.py"]
# Seconds each step may take on the device, so that the whole check ends within 8 minutes even
# if one step hangs (the quick mode, on a loaded CPU, has none).
TIME_LIMITS = {"tests": 150, "benchmark": 120, "train": 90, "export": 45}


def run_step(
    name: str, args: list[str], log: Path, timeout: float | None, json_out: bool = False
) -> dict:
    """Runs one command from the repository's root, appending its output to the log; returns
    its wall time, exit status (None if it ran past `timeout` seconds and was killed: the
    later steps still run) and, with `json_out`, the JSON document it printed."""
    print(f"== {name}", file=sys.stderr, flush=True)
    # The subprocesses import digitjax from this repository, whatever is installed.
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        # What was read before the kill, as bytes (so even with text=True).
        stdout, stderr = (x.decode(errors="replace") if x else "" for x in (e.stdout, e.stderr))
        done = subprocess.CompletedProcess(args, None, stdout, f"{stderr}\ntimed out")
    seconds = time.perf_counter() - start
    with log.open("a") as f:
        f.write(f"== {name}: {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    lines = done.stdout.strip().splitlines()
    result = {
        "seconds": seconds,
        "exit_code": done.returncode,
        "last_line": lines[-1] if lines else "",
    }
    if json_out and done.returncode == 0:
        result["json"] = json.loads(done.stdout)
    return result


def digitjax(*args: str) -> list[str]:
    return [sys.executable, "-m", "digitjax.cli", *args]


def run_exported(path: Path, data_dir: str | None) -> dict:
    """The exported file run as docs/export.md shows, with jax alone, on the test images."""
    from digitjax.data import load_dataset

    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))
        exported = jax.export.deserialize(bytearray(archive.read("model.jax_exported")))
    dataset = load_dataset("mnist", data_dir)
    images = dataset.test_images.astype(np.float32) / 255
    start = time.perf_counter()
    outputs = exported.call(images)
    # A model with a non-digit detector returns its scores too.
    probabilities = np.asarray(outputs[0] if metadata.get("non_digit_score") else outputs)
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(exported.call(images))
    again = time.perf_counter() - start
    accuracy = float((probabilities.argmax(axis=1) == dataset.test_labels).mean())
    return {
        "accuracy": accuracy,
        "checkpoint_accuracy": metadata["test_accuracy"],
        "first_call_s": first_call,
        "images_per_s": len(images) / again,
        "platforms": list(exported.platforms),
    }


def driver_info() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        return done.stdout.strip() or done.stderr.strip()
    except FileNotFoundError:
        return "no nvidia-smi"


def check(quick: bool, out: Path, data_dir: str | None) -> dict:
    limits = dict.fromkeys(TIME_LIMITS) if quick else TIME_LIMITS
    out.mkdir(parents=True, exist_ok=True)
    log = out / "device_check.log"
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    device = jax.devices()[0]
    results: dict = {
        "device": f"{device.platform}: {device.device_kind} x {jax.device_count()}",
        "jax": jax.__version__,
        "driver": driver_info(),
        "quick": quick,
    }
    if not quick:
        results["tests"] = run_step(
            "tests",
            # One process (`-o addopts=`: no xdist workers, which the wheels here lack, nor
            # two of them on one accelerator).
            [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "not slow"]
            + DEVICE_TESTS,
            log,
            limits["tests"],
        )
    bench_args = ["--steps", "5", "--repeats", "2"] if quick else ["--target", "0.99"]
    results["benchmark"] = run_step(
        "benchmark",
        digitjax("benchmark", *bench_args, "--json"),
        log,
        limits["benchmark"],
        json_out=True,
    )
    train_args = ["--preset", "best", "--epochs", "1"]
    if quick:
        train_args += ["--channels", "4,8", "--dense", "16"]
    if data_dir is not None:
        train_args += ["--data-dir", data_dir]
    run_dir = work / "best"
    results["train"] = run_step(
        "train",
        digitjax("train", *train_args, "--out", str(run_dir), "--json"),
        log,
        limits["train"],
        json_out=True,
    )
    model_file = work / "model.stablehlo"
    results["export"] = run_step(
        "export",
        digitjax("export", str(run_dir), "--out", str(model_file), "--json"),
        log,
        limits["export"],
    )
    if results["export"]["exit_code"] == 0:
        results["exported_model"] = run_exported(model_file, data_dir)
    return results


def table(results: dict) -> str:
    """The figures worth reading, one per row."""
    rows = [("device", results["device"]), ("jax", results["jax"])]
    rows.append(("driver (nvidia-smi)", results["driver"]))
    if "tests" in results:
        tests = results["tests"]
        rows.append(("tests", f"{tests['last_line']} (exit status {tests['exit_code']})"))
    bench = results["benchmark"].get("json")
    if bench is None:
        rows.append(("benchmark", f"failed, exit status {results['benchmark']['exit_code']}"))
    else:
        training = bench["training"][0]
        rows += [
            ("matmul peak (float32)", f"{bench['matmul_peak']['gflops']:,.0f} GFLOP/s"),
            (
                f"training, batch {training['batch_size']}",
                f"{training['images_per_s']:,.0f} img/s, "
                f"{100 * training['fraction_of_peak']:.1f}% of peak",
            ),
            ("training chunk compile", f"{training['compile_s']:.2f} s"),
            ("inference, test set", f"{bench['inference']['images_per_s']:,.0f} img/s"),
        ]
        reached = bench.get("time_to_accuracy")
        if reached is not None:
            rows.append(
                (
                    f"time to {100 * reached['target']:.0f}% (cold)",
                    f"{reached['seconds']:.2f} s, epoch {reached['epochs']:.2f}"
                    if reached["reached"]
                    else f"not reached in {reached['seconds']:.1f} s",
                )
            )
    train = results["train"]
    if "json" in train:
        best = train["json"]["best"]
        rows.append(
            (
                "train --preset best, 1 epoch",
                f"{train['seconds']:.1f} s wall, test {100 * best['test_accuracy']:.2f}%",
            )
        )
    else:
        rows.append(("train --preset best, 1 epoch", f"failed, exit status {train['exit_code']}"))
    rows.append(("export to StableHLO (exit status)", str(results["export"]["exit_code"])))
    exported = results.get("exported_model")
    if exported is not None:
        rows.append(
            (
                "StableHLO file on the device",
                f"test {100 * exported['accuracy']:.2f}% "
                f"(checkpoint {100 * exported['checkpoint_accuracy']:.2f}%), "
                f"{exported['images_per_s']:,.0f} img/s, "
                f"first call {exported['first_call_s']:.2f} s",
            )
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def failed(results: dict) -> list[str]:
    steps = [name for name in ("tests", "benchmark", "train", "export") if name in results]
    return [name for name in steps if results[name]["exit_code"] != 0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the small version, for a CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-check")))
    parser.add_argument("--data-dir", help="train on this MNIST-format folder instead")
    args = parser.parse_args()
    start = time.perf_counter()
    results = check(args.quick, args.out, args.data_dir)
    results["total_seconds"] = time.perf_counter() - start
    text = table(results) + f"\ntotal: {results['total_seconds']:.0f} s"
    (args.out / "device_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "device_check.txt").write_text(text + "\n")
    print(text)
    if failed(results):
        sys.exit(f"failed: {', '.join(failed(results))} (see {args.out / 'device_check.log'})")


if __name__ == "__main__":
    main()

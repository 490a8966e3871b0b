"""Exported models: file sizes, inference img/s (onnxruntime, the StableHLO file in JAX, and
digitjax's own CPU forward pass for reference) at batch 1 and 256, and the wall time of a cold
one-image `digitjax predict` with a checkpoint and with each exported file.

    python benchmarks/export_speed.py [CHECKPOINT ...]   # default: the bundled model
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import onnxruntime
from PIL import Image

from digitjax.data import EMBEDDED_MNIST, read_idx_split
from digitjax.inference.classifier import BUNDLED_MODEL, CheckpointClassifier
from digitjax.inference.export import export_model

BATCHES = (1, 256)


def images_per_s(run, images: np.ndarray, repeats: int = 5, min_seconds: float = 0.3) -> float:
    """Median over `repeats` of img/s, each timing as many calls as fill `min_seconds`; the
    first call (compilation) is excluded."""
    run(images)
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            run(images)
            calls += 1
        rates.append(calls * len(images) / elapsed)
    return statistics.median(rates)


def cold_predict_s(image: Path, args: list[str], repeats: int) -> float:
    """Median wall time of a fresh `digitjax predict` process on one image (after one
    untimed run, so JAX's persistent compilation cache is warm as for any returning user)."""
    command = ["digitjax", "predict", str(image), "--json", *args]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(checkpoint: Path, folder: Path, image: Path, repeats: int) -> dict:
    folder.mkdir()
    files = {
        fmt: export_model(checkpoint, fmt, folder / f"model.{fmt}") for fmt in ("onnx", "stablehlo")
    }
    session = onnxruntime.InferenceSession(files["onnx"]["path"])
    with zipfile.ZipFile(files["stablehlo"]["path"]) as archive:
        exported = jax.export.deserialize(bytearray(archive.read("model.jax_exported")))
    exported_call = jax.jit(exported.call)
    predictor = CheckpointClassifier(checkpoint)
    runners = {
        "onnxruntime": lambda x: session.run(None, {"images": x}),
        "jax_stablehlo": lambda x: jax.block_until_ready(exported_call(x)),
        # Batches of 1 and 256 are powers of two: in_batches pads nothing.
        "jax_digitjax": predictor.outputs,
    }
    test_images = read_idx_split(EMBEDDED_MNIST, "test")[0].astype(np.float32) / 255
    return {
        "checkpoint": str(checkpoint),
        "config": files["onnx"]["metadata"]["config"],
        "bytes": {fmt: written["bytes"] for fmt, written in files.items()},
        "images_per_s": {
            name: {batch: images_per_s(run, test_images[:batch]) for batch in BATCHES}
            for name, run in runners.items()
        },
        "cold_predict_one_image_s": {
            "checkpoint": cold_predict_s(image, ["--checkpoint", str(checkpoint)], repeats),
            **{
                fmt: cold_predict_s(image, ["--model", written["path"]], repeats)
                for fmt, written in files.items()
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="*", type=Path, default=[BUNDLED_MODEL])
    parser.add_argument("--repeats", type=int, default=5, help="cold predict runs per model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "digit.png"
        Image.fromarray(read_idx_split(EMBEDDED_MNIST, "test")[0][0]).save(image)
        results = [
            measure(checkpoint, Path(tmp) / str(i), image, args.repeats)
            for i, checkpoint in enumerate(args.checkpoints)
        ]
    print(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

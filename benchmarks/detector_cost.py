"""What the bundled model's non-digit detector costs at inference: the forward pass with and
without it, on numpy (a `predict` of up to 1,000 images) and on JAX (`serve`, and larger
predicts), for batches of 1 and 256 MNIST test images; with and without interleaved, medians
and ranges of `--rounds` rounds. numpy's runs come first, all of them: right after a JAX call,
XLA's idle worker threads still spin and slowed numpy's matmuls by up to 40%.

    python benchmarks/detector_cost.py [--rounds 9]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from digitjax.checkpoint import restore_model
from digitjax.data import load_dataset
from digitjax.inference.bundled import NumpyClassifier, bundled_classifier
from digitjax.model import calibrated_outputs, conv_impls_for


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    images = load_dataset("mnist").split("test")[0][:256].astype(np.float32) / 255
    on_numpy = bundled_classifier()
    assert on_numpy is not None and on_numpy.detector is not None
    model = restore_model(on_numpy.source)
    conv_impls = conv_impls_for(jax.default_backend(), False, len(model.config.channels))
    runs = {}
    for name, detector in (("with", model.detector), ("without", None)):
        forward = jax.jit(
            lambda x, d=detector: calibrated_outputs(
                model.graphdef, model.params, x, conv_impls, model.temperature, d
            )
        )
        runs[f"jax, {name}"] = lambda x, f=forward: jax.block_until_ready(f(x))
        numpy_model = NumpyClassifier(
            on_numpy.params, on_numpy.temperature, detector, on_numpy.num_pools,
            on_numpy.info, on_numpy.source,
        )  # fmt: skip
        runs[f"numpy, {name}"] = numpy_model.outputs
    seconds = {(name, batch): [] for name in sorted(runs, reverse=True) for batch in (1, 256)}
    for backend in ("numpy", "jax"):
        timed = {key: values for key, values in seconds.items() if key[0].startswith(backend)}
        for name, batch in timed:
            runs[name](images[:batch])  # compiles
        for _ in range(args.rounds):
            for (name, batch), values in timed.items():
                repeats = 200 if batch == 1 else 10
                started = time.perf_counter()
                for _ in range(repeats):
                    runs[name](images[:batch])
                values.append((time.perf_counter() - started) / repeats * 1000)
    for (name, batch), values in seconds.items():
        median = statistics.median(values)
        print(f"{name:14} batch {batch:3}: {median:7.2f} ms ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()

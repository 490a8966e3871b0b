"""MNIST's training digits plus the non-digit detector's digits drawn as users' images
(`digitjax.detector.fitting_images`: the same 10,000 MNIST training digits, drawn and
preprocessed by `synthetic.drawn_digits`), with their labels, as a folder of the four IDX
files for `digitjax train --data-dir`: a model taught users' look on the digits' own side.
The test split is MNIST's.

    python benchmarks/drawn_digit_data.py OUT_DIR
"""

import argparse
from pathlib import Path

import numpy as np

from digitjax import detector
from digitjax.data import IDX_FILES, load_dataset, write_idx
from digitjax.inference.parallel import available_cores, start_pool
from digitjax.synthetic import drawn_digits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    mnist = load_dataset("mnist")
    images, labels = mnist.split("train")
    # The detector's drawn digits: the first DRAWN_DIGITS of its seed-0 order.
    chosen = np.random.default_rng(0).permutation(len(images))[: detector.DRAWN_DIGITS]
    with start_pool(available_cores()) as pool:
        drawn = list(
            pool.map(drawn_digits.preprocessed, images[chosen], range(len(chosen)), chunksize=64)
        )
    found = np.array([d is not None for d in drawn])
    splits = {
        "train": (
            np.concatenate([images, np.stack([d for d in drawn if d is not None])]),
            np.concatenate([labels, labels[chosen][found]]),
        ),
        "test": mnist.split("test"),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        for name, array in zip(IDX_FILES[split], arrays):
            write_idx(args.out_dir / name, array)
    print(f"{len(splits['train'][0])} training images ({found.sum()} drawn) in {args.out_dir}")


if __name__ == "__main__":
    main()

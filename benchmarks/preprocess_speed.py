"""Milliseconds per image of `to_mnist` (the cleaning after decoding) and of decoding, for a
3000x3000 JPEG photo with a large digit, with a small one, blank, and for a 28x28 MNIST PNG.
Median of the repeats after the first, with min..max.

    python benchmarks/preprocess_speed.py            # this checkout's digitjax
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/preprocess_speed.py   # another version's
"""

import io
import time

import numpy as np
from PIL import Image

from digitjax.data import EMBEDDED_MNIST, read_idx_split
from digitjax.inference.preprocess import load_grayscale, to_mnist
from digitjax.synthetic.user_digits import paper, pen_strokes, photograph, thin_strokes


def jpeg(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    paper_rgb, light = paper(*ink.shape, rng)
    buffer = io.BytesIO()
    photograph(paper_rgb, light, ink, np.array([0.1, 0.1, 0.3]), rng).save(buffer, "JPEG")
    return buffer.getvalue()


def timed(function, argument, repeats: int) -> str:
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        function(argument)
        seconds.append(time.perf_counter() - start)
    ms = 1000 * np.array(seconds[1:])
    return f"{np.median(ms):.1f} ms ({ms.min():.1f}..{ms.max():.1f})"


def main() -> None:
    images, _ = read_idx_split(EMBEDDED_MNIST, "test")
    rng = np.random.default_rng(0)
    large, small = np.zeros((3000, 3000), np.float32), np.zeros((3000, 3000), np.float32)
    large[800:2300, 700:2200] = pen_strokes(images[0], 1500)
    small[1200:1560, 1400:1760] = thin_strokes(images[1], 360, 0.7)
    mnist = io.BytesIO()
    Image.fromarray(images[2]).save(mnist, "PNG")
    cases = {
        "3000x3000 JPEG, digit half its size": jpeg(large, rng),
        "3000x3000 JPEG, thin digit 12% of its height": jpeg(small, rng),
        "3000x3000 JPEG, blank page": jpeg(np.zeros_like(small), rng),
        "28x28 MNIST PNG": mnist.getvalue(),
    }
    print("| image | decoding | to_mnist | digit found |")
    print("| --- | --- | --- | --- |")
    for name, data in cases.items():
        repeats = 50 if name.startswith("28x28") else 5
        gray = load_grayscale(io.BytesIO(data))
        decode = timed(lambda encoded: load_grayscale(io.BytesIO(encoded)), data, repeats)
        found = "yes" if to_mnist(gray) is not None else "no"
        print(f"| {name} | {decode} | {timed(to_mnist, gray, repeats)} | {found} |")


if __name__ == "__main__":
    main()

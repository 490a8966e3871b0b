"""Preprocessing images on every core: `predict` maps `preprocess_one` over its files and
`serve` submits each upload to a long-lived pool of the same workers.

Decoding and the numpy/PIL steps of one image take ~2.5 ms, much of it holding the GIL, so
threads barely reach a second core; worker processes do. They are spawned, not forked: the
parent has usually imported JAX, whose threads make forking unsafe.
"""

import io
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from digitjax.inference.preprocess import (
    MAX_PIXELS,
    NO_DIGIT_FOUND,
    ImageError,
    load_grayscale,
    to_mnist,
)

# The 28x28 digit, or None and why there is none.
Outcome = tuple[np.ndarray | None, str | None]
T = TypeVar("T")
# Below this many images, starting workers (~0.4 s) costs more than the second core saves.
POOL_MIN_IMAGES = 256


def preprocess_one(source: Path | bytes, max_pixels: int = MAX_PIXELS) -> Outcome:
    """One image file or in-memory encoded image, as the model sees it."""
    return preprocess_previewed(source, max_pixels)[0]


def preprocess_previewed(
    source: Path | bytes, max_pixels: int = MAX_PIXELS, preview_side: int = 0
) -> tuple[Outcome, np.ndarray | None]:
    """`preprocess_one`, and where a digit was found and `preview_side` is given, the image
    reduced to at most `preview_side` pixels across in one byte per pixel (what a plot shows
    of it): taken from the one read, since a stream (/dev/stdin) cannot be read again."""
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        gray = load_grayscale(file, max_pixels)
        digit = to_mnist(gray)
    except ImageError as e:
        return (None, str(e)), None
    except MemoryError:  # a shape PIL cannot hold a row of (79,000,000 x 1 pixels: 1.9 GB, 14 s)
        return (None, "too large to preprocess in the memory available"), None
    except Exception as e:  # a decoder's or our own defect on an odd file: its error, not the run's
        return (None, f"unreadable image: {type(e).__name__}: {e}"[:300]), None
    if digit is None:
        return (None, NO_DIGIT_FOUND), None
    if not preview_side:
        return (digit, None), None
    preview = Image.fromarray((gray * 255).round().astype(np.uint8))
    preview.thumbnail((preview_side, preview_side))
    return (digit, None), np.asarray(preview)


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def start_pool(workers: int, niceness: int = 0) -> ProcessPoolExecutor:
    """Spawned worker processes, at a lower CPU priority by `niceness` if given."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(niceness,),
    )


def _worker_init(niceness: int) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what stops, and when. Not
    # SIGTERM: it is how the pool itself ends workers that outlive a broken pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness:
        os.nice(niceness)


def preprocess_many(
    sources: list[Path],
    workers: int | None = None,
    preprocess: Callable[[Path], T] = preprocess_one,
) -> list[T]:
    """`preprocess` (a module's function, or a partial of one: the workers unpickle it) of
    every source, in order, on `workers` processes (default: every core) when there are enough
    images to pay for starting them. The workers are spawned, so a script calling this needs
    the usual `if __name__ == "__main__":` guard."""
    workers = workers or available_cores()
    if workers < 2 or len(sources) < POOL_MIN_IMAGES:
        return [preprocess(source) for source in sources]
    pool = start_pool(workers)
    try:
        chunk = max(1, len(sources) // (8 * workers))
        return list(pool.map(preprocess, sources, chunksize=chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

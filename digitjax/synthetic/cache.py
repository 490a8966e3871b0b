"""Generated training images, made once on every core and cached on disk beside the decoded
datasets: drawing and preprocessing thousands of images takes minutes, reading them back a
blink."""

import io
import sys
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

# Images per task of a worker (~1.5 s of work): a stop signal waits for the tasks begun,
# which took 13-15 s at 256 a task. Each image is made from its own number, whatever its block.
BLOCK = 32


def numbered_blocks(count: int) -> list[range]:
    """Image numbers 0..count-1 in blocks of BLOCK, a worker's task each."""
    return [range(start, min(start + BLOCK, count)) for start in range(0, count, BLOCK)]


def cached_images(
    file_name: str,
    make_block: Callable[[Any], list[np.ndarray | None]],
    blocks: Sequence[Any],
    what: str,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """The images (uint8, (N, 28, 28)) cached under `file_name` and the preprocessing's
    version, or, where there is no such file or it does not read back, those that
    `make_block` (a module-level function, run in worker processes) returns for each of
    `blocks`, None left out, written to the cache whole. `what` names them in messages."""
    from digitjax.config import UserError
    from digitjax.data import DAMAGED, default_cache_dir
    from digitjax.inference import preprocess
    from digitjax.inference.parallel import available_cores, start_pool
    from digitjax.outputs import write_file

    # Named for the preprocessing they went through too: another makes other images.
    cache = (cache_dir or default_cache_dir()) / f"{file_name}-p{preprocess.VERSION}.npy"
    try:
        images = np.load(cache)
        if images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28):
            return images
    except FileNotFoundError:
        pass
    except DAMAGED as e:
        print(
            f"warning: the {what} cache {cache} is damaged ({e}); making it again", file=sys.stderr
        )
    # A worker costs a second or two to start, more than a block's remainder is worth.
    workers = min(available_cores(), max(1, len(blocks) - 1))
    if workers < 2:
        results = [make_block(block) for block in blocks]
    else:
        pool = start_pool(workers)
        try:
            results = list(pool.map(make_block, blocks))
        except BrokenProcessPool:  # a worker killed (the OOM killer, a signal to it alone)
            raise UserError(f"a process making the {what} images died; run again") from None
        finally:  # stopped (Ctrl-C): the blocks not begun are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
    images = np.stack([image for block in results for image in block if image is not None])
    contents = io.BytesIO()
    np.save(contents, images)
    try:
        write_file(cache, contents.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the {what} cache {cache} ({e})") from None
    return images

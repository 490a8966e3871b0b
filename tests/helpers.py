"""Helpers the tests share: real MNIST files, tiny CLI runs, one-line error checks, huge PNGs."""

import json
import random
import re
import shutil
import signal
import struct
import subprocess
import textwrap
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from digitjax.data import EMBEDDED_MNIST, IDX_FILES, read_idx_split, write_idx

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = EMBEDDED_MNIST  # the copy shipped in the package: a fresh clone has everything
# A tiny model and few steps keep a whole CLI run to a few seconds.
TINY_FLAGS = ["--channels", "4,8", "--dense", "16", "--batch-size", "64"]


def tiny_train(data_dir: Path, run_dir: Path, *extra: str, epochs: int) -> list[str]:
    """`digitjax train` arguments for a tiny model on a folder of MNIST IDX files."""
    return ["train", "--data-dir", str(data_dir), *TINY_FLAGS, "--epochs", str(epochs),
            "--out", str(run_dir), *extra]  # fmt: skip


def trained_tiny_run(data_dir: Path, folder: Path, epochs: int) -> Path:
    """A finished tiny run in `folder`, trained through the CLI."""
    from typer.testing import CliRunner

    from digitjax.cli import app

    run_dir = folder / "run"
    result = CliRunner().invoke(app, tiny_train(data_dir, run_dir, epochs=epochs))
    assert result.exit_code == 0, result.output
    return run_dir


def assert_same_outputs(got: np.ndarray, want: np.ndarray) -> None:
    """Two classifiers' (N, 11) outputs for the same images: the probabilities to 1e-5, the
    non-digit scores (whose sum runs over ~600 features) to 1e-3 or NaN in both, and the
    same verdict from every score not within that of the threshold."""
    np.testing.assert_allclose(got[:, :10], want[:, :10], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[:, 10], want[:, 10], atol=1e-3, rtol=1e-5)
    clear = np.abs(want[:, 10]) > 1e-3
    assert ((got[clear, 10] > 0) == (want[clear, 10] > 0)).all()


def fit_small_detectors(monkeypatch: Any, data_dir: Path) -> None:
    """digitjax.detector fits on `data_dir`'s digits, fewer of them and of the non-digits,
    in fewer steps: seconds instead of a minute."""
    from digitjax import detector
    from digitjax.data import load_dataset

    smaller = {
        "FIT_DIGITS": 1500,
        "DRAWN_DIGITS": 60,
        "PRINTED_DIGITS": 20,
        "NON_DIGITS": 300,
        "STEPS": 50,
    }
    for name, value in smaller.items():
        monkeypatch.setattr(detector, name, value)
    monkeypatch.setattr(detector, "load_dataset", lambda name: load_dataset(name, data_dir))


def python_block(doc: str, marker: str) -> str:
    """The one Python code block of a page (README.md, docs/...) that contains `marker`, as a
    user copies it."""
    blocks = re.findall(r"```python\n(.*?)^ *```", (ROOT / doc).read_text(), re.S | re.M)
    [block] = [block for block in blocks if marker in block]
    return textwrap.dedent(block)


def history(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_mnist_subset(folder: Path, num_train: int, num_test: int) -> Path:
    """The first images of real MNIST as a folder of the four IDX files."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        images, labels = read_idx_split(MNIST_DIR, split)
        images_file, labels_file = IDX_FILES[split]
        write_idx(folder / images_file, images[:count])
        write_idx(folder / labels_file, labels[:count])
    return folder


def run_digitjax(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The installed console script, in its own process."""
    return subprocess.run(
        ["digitjax", *args], capture_output=True, text=True, cwd=cwd, timeout=600, **kwargs
    )


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """The failure is explained in exactly one `error:` line, with no traceback and no blank
    line."""
    assert "Traceback" not in stderr, stderr
    assert "" not in stderr.splitlines(), stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], stderr


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, written without ever holding its pixels: a
    20000x20000 one is 49 kB, a decompression bomb (400 million pixels once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows, compressor = b"\0" * (1 + -(-width // 8)) * 500, zlib.compressobj(9)
    pixels = b"".join(compressor.compress(rows) for _ in range(height // 500))
    pixels += compressor.compress(b"\0" * (1 + -(-width // 8)) * (height % 500))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels + compressor.flush())
        + chunk(b"IEND", b"")
    )
    return path


def read_events(run_dir: Path) -> Any:
    """Everything in the run folder's TensorBoard event files, as TensorBoard shows it (its
    own reader, an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def steps_and_values(events: Any, tag: str) -> tuple[list[int], list[float]]:
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


# How a command may end after a signal: -signum where it came before Python started (the
# launcher script), which is a landing too.
SIGNAL_EXIT_CODES = {signal.SIGKILL: {-9}, signal.SIGINT: {130, -2}, signal.SIGTERM: {143, -15}}


def signal_until_each_lands(
    events: list[tuple[signal.Signals, str]],
    start: Callable[[], subprocess.Popen],
    writing: Callable[[], bool],
    run_dir: Path,
    rng: random.Random,
    seconds: tuple[float, float],
) -> None:
    """For each (signal, moment) in turn, starts the run (`start`) and sends the signal at that
    moment: "write", as soon as a checkpoint is being written (`writing`), or "time", after a
    random (seeded) number of seconds in the `seconds` range. Checks that each landed: the
    run ended by it, in one line. A run that finished first starts over with earlier signals."""
    scale, restarts = 1.0, 0
    while events:
        signum, moment = events[0]
        process = start()
        if moment == "write":
            while process.poll() is None and not writing():
                time.sleep(0.0005)
        else:
            time.sleep(scale * rng.uniform(*seconds))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        if process.returncode == 0:
            restarts += 1
            assert restarts <= 3, "the run kept finishing before the signals landed"
            shutil.rmtree(run_dir)
            scale /= 2
            continue
        assert process.returncode in SIGNAL_EXIT_CODES[signum], stderr
        events.pop(0)

"""Datasets: tensorflow-datasets without TensorFlow, plus a decoded uint8 cache.

tfds's stock MNIST builders need TensorFlow to prepare (gzip extraction, PNG encoding, tfrecord
writing). Subclasses whose split generators parse the gzip IDX files with numpy and yield PNG
bytes prepare an `array_record` dataset without it, which `as_data_source` then reads. Decoding
70k PNGs takes seconds, so the decoded arrays are cached beside the prepared dataset as `.npz`.
"""

import contextlib
import dataclasses
import gzip
import io
import os
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from digitjax.config import UserError

SPLITS = ("train", "test")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
EMBEDDED_MNIST = Path(__file__).parent / "assets" / "mnist"
# Folders that hold a dataset's IDX files on machines with no network (the first is shipped
# inside this package; the second comes from `apt-get install dataset-fashion-mnist`).
OFFLINE_DIRS = {
    "mnist": (EMBEDDED_MNIST,),
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
DATASETS = tuple(OFFLINE_DIRS)
DOWNLOAD_TIMEOUT_S = 20


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIGITJAX_DATA_DIR", Path.home() / ".cache" / "digitjax"))


def read_idx(path: Path) -> np.ndarray:
    """Parses one gzip IDX file (magic 0x0000 0x08 ndim, big-endian dims, uint8 data)."""
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (Path(folder) / name for name in IDX_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise UserError(
            f"{folder}: expected 28x28 images with one label each, "
            f"got images {images.shape} and labels {labels.shape}"
        )
    return images, labels.astype(np.int32)


def has_idx_files(folder: Path) -> bool:
    return all((Path(folder) / name).is_file() for pair in IDX_FILES.values() for name in pair)


def load_dataset(
    name: str = "mnist", data_dir: str | Path | None = None, cache_dir: Path | None = None
) -> Dataset:
    """Loads a dataset as uint8 arrays: from `data_dir` (a folder of the four IDX files) when
    given, else through tfds (prepared once, offline where possible) and the decoded cache."""
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset '{name}'; known: {', '.join(DATASETS)} "
            "(or --data-dir DIR for any folder of the four MNIST-format IDX files)"
        )
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UserError(f"data dir {folder} does not exist")
        if not has_idx_files(folder):
            raise UserError(
                f"data dir {folder} lacks the four IDX files "
                f"({', '.join(n for pair in IDX_FILES.values() for n in pair)})"
            )
        (xtr, ytr), (xte, yte) = (read_idx_split(folder, s) for s in SPLITS)
        classes = tuple(str(i) for i in range(int(max(ytr.max(), yte.max())) + 1))
        return Dataset(name, xtr, ytr, xte, yte, classes)
    return _load_cached(name, Path(cache_dir or default_cache_dir()))


def _load_cached(name: str, cache_dir: Path) -> Dataset:
    cache_file = cache_dir / "decoded" / f"{name}.npz"
    if not cache_file.exists():
        builder = make_builder(name, cache_dir / "tfds")
        if not builder.is_prepared():
            # The split generators fetch their own files: tfds's downloader retries forever
            # offline. tfds announces the preparation on stdout, which belongs to --json.
            with contextlib.redirect_stdout(sys.stderr):
                builder.download_and_prepare()
        arrays = decode_data_source(builder)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache_file)
    try:
        with np.load(cache_file) as arrays:
            return Dataset(
                name,
                arrays["train_images"],
                arrays["train_labels"],
                arrays["test_images"],
                arrays["test_labels"],
                tuple(str(c) for c in arrays["class_names"]),
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"data cache {cache_file} is damaged ({e}); delete it to rebuild") from None


def decode_data_source(builder) -> dict[str, np.ndarray]:
    sources = builder.as_data_source()
    arrays = {"class_names": np.array(builder.info.features["label"].names)}
    for split in SPLITS:
        records = sources[split].__getitems__(range(len(sources[split])))
        arrays[f"{split}_images"] = np.stack([r["image"][..., 0] for r in records])
        arrays[f"{split}_labels"] = np.array([r["label"] for r in records], np.int32)
    return arrays


def find_source_dir(name: str, download_dir: Path) -> Path:
    """The IDX files to prepare from: an offline folder if one has them, else a download."""
    for folder in OFFLINE_DIRS[name]:
        if has_idx_files(folder):
            return folder
    if not has_idx_files(download_dir):
        _download_idx(name, download_dir)
    return download_dir


def _download_idx(name: str, folder: Path) -> None:
    from tensorflow_datasets.image_classification import mnist

    base_url = {"mnist": mnist.MNIST.URL, "fashion_mnist": mnist.FashionMNIST.URL}[name]
    folder.mkdir(parents=True, exist_ok=True)
    for filename in (n for pair in IDX_FILES.values() for n in pair):
        try:
            with urllib.request.urlopen(base_url + filename, timeout=DOWNLOAD_TIMEOUT_S) as r:
                payload = r.read()
        except OSError as e:
            hint = {"fashion_mnist": " (offline: apt-get install dataset-fashion-mnist)"}
            raise UserError(
                f"no data reachable for '{name}': cannot download {filename} ({e}); "
                f"use --data-dir DIR with the four IDX files{hint.get(name, '')}"
            ) from None
        tmp = folder / (filename + ".part")
        tmp.write_bytes(payload)
        os.replace(tmp, folder / filename)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_builder(name: str, tfds_dir: Path):
    """A tfds builder for `name` that prepares from IDX files with numpy instead of TensorFlow."""
    import tensorflow_datasets as tfds
    from absl import logging
    from tensorflow_datasets.image_classification import mnist

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.ERROR)  # tfds warns about optional OpenCV on every read
    stock = {"mnist": mnist.MNIST, "fashion_mnist": mnist.FashionMNIST}[name]

    class IdxBuilder(stock, skip_registration=True):
        def _split_generators(self, dl_manager):
            source = find_source_dir(name, tfds_dir / "downloads" / name)
            return {split: self._generate_examples(source, split) for split in SPLITS}

        def _generate_examples(self, source: Path, split: str) -> Iterator:
            images, labels = read_idx_split(source, split)
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": _png(image), "label": int(label)}

    IdxBuilder.name = name
    return IdxBuilder(data_dir=str(tfds_dir), file_format="array_record")

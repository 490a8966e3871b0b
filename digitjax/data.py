"""Datasets: tensorflow-datasets without TensorFlow, plus a decoded uint8 cache.

tfds's stock MNIST builders need TensorFlow to prepare (gzip extraction, PNG encoding, tfrecord
writing). Subclasses whose split generators parse the gzip IDX files with numpy prepare an
`array_record` dataset without it, which `as_data_source` then reads. Each tfds example holds a
block of raw uint8 images with their labels rather than one PNG image: tfds serializes and parses
every example in Python, so per-image examples (and PNG coding) made a first run several times
slower than a later one. The decoded arrays are cached beside the prepared dataset as `.npz`, so
later loads import neither tfds nor array_record. Both are only copies of the IDX files: one that
does not read back is rebuilt.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import io
import math
import os
import shutil
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from digitjax import filelocks
from digitjax.config import UserError
from digitjax.outputs import write_file

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
MAX_IDX_BYTES = 4 << 30  # EMNIST ByClass, the largest MNIST-format set, is 0.5 GiB
# 3.0.1, tfds's own version, was the one-PNG-per-example layout of earlier digitjax versions; a
# new version number gives this layout its own folder, so an old prepared folder is never misread.
TFDS_VERSION = "3.1.0"
IMAGES_PER_EXAMPLE = 1000
# What a damaged cache raises when read: a zip, npy or Riegeli error, a missing file or key,
# unexpected contents (ValueError, also json's), an empty file (EOFError).
DAMAGED = (OSError, EOFError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


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

    def hold_out(self, fraction: float) -> tuple["Dataset", np.ndarray, np.ndarray]:
        """This dataset without `fraction` of its training images, and those images and
        labels. They are drawn by a fixed permutation, not by --seed (every seed trains on the
        same images), and not as the split's end (a folder's files may be sorted by class)."""
        count = round(len(self.train_images) * fraction)
        if count == 0:  # no copy of the training images: 0.1 s of a cold start
            return self, self.train_images[:0], self.train_labels[:0]
        held = np.zeros(len(self.train_images), bool)
        held[np.random.default_rng(0).permutation(len(held))[:count]] = True
        kept = dataclasses.replace(
            self, train_images=self.train_images[~held], train_labels=self.train_labels[~held]
        )
        return kept, self.train_images[held], self.train_labels[held]


def default_cache_dir() -> Path:
    """$DIGITJAX_DATA_DIR, else ~/.cache/digitjax; set but empty is unset, not the current
    folder."""
    return Path(os.environ.get("DIGITJAX_DATA_DIR") or Path.home() / ".cache" / "digitjax")


def read_idx(path: Path) -> np.ndarray:
    """Parses one gzip IDX file (magic 0x0000 0x08 ndim, big-endian dims, uint8 data). The
    payload is read only up to the size the header declares, so a decompression bomb costs no
    more memory than an honest file of that shape."""
    try:
        with gzip.open(path) as f:
            header = f.read(4)
            if len(header) < 4 or header[:3] != b"\0\0\x08":
                raise UserError(f"{path} is not a uint8 IDX file")
            raw_dims = f.read(4 * header[3])
            if len(raw_dims) < 4 * header[3]:
                raise UserError(f"{path} is truncated inside its header")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4"))
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise UserError(f"{path} declares {dims}: over {MAX_IDX_BYTES >> 30} GiB of data")
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(data) != size:
        found = "more" if len(data) > size else f"{len(data)} bytes"
        raise UserError(f"{path} is damaged: header says {dims}, found {found}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) as one gzip IDX file, as `read_idx` reads it."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (Path(folder) / name for name in IDX_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise UserError(
            f"{folder}: expected 28x28 images with one label each, "
            f"got images {images.shape} and labels {labels.shape}"
        )
    if not len(images):
        raise UserError(f"{images_file} holds no images")
    return images, labels.astype(np.int32)


def class_names_of(
    folder: Path, train_labels: np.ndarray, test_labels: np.ndarray
) -> tuple[str, ...]:
    """The classes of a folder of IDX files: labels 0..K-1, each present in the training split,
    so a stray label cannot silently add classes the model never learns."""
    present = np.unique(train_labels)
    if present[-1] != len(present) - 1:
        raise UserError(
            f"labels must be 0..K-1 with every class in the training split; found "
            f"{_spans(present)} in {Path(folder) / IDX_FILES['train'][1]}"
        )
    if test_labels.max() >= len(present):
        raise UserError(
            f"label {int(test_labels.max())} in {Path(folder) / IDX_FILES['test'][1]} is not "
            f"one of the training labels 0..{len(present) - 1}"
        )
    return tuple(str(i) for i in range(len(present)))


def _spans(values: np.ndarray) -> str:
    """Sorted distinct integers as runs: [0 1 2 3 12] -> '0..3, 12'."""
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    runs = np.split(values, breaks)
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


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
        return Dataset(name, xtr, ytr, xte, yte, class_names_of(folder, ytr, yte))
    return _load_cached(name, Path(cache_dir or default_cache_dir()))


def _load_cached(name: str, cache_dir: Path) -> Dataset:
    cache_file = cache_dir / "decoded" / f"{name}.npz"
    try:
        return _read_cache(name, cache_file)
    except FileNotFoundError:
        pass
    except DAMAGED as e:
        _warn(f"the data cache {cache_file} is damaged ({e}); rebuilding it")
    lock = contextlib.ExitStack()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Processes that start on a fresh machine together build the cache once, in turn.
        lock.enter_context(filelocks.locked(cache_file.with_suffix(".lock")))
    except OSError as e:
        raise UserError(
            f"cannot create the data cache folder {cache_file.parent} ({e.strerror}); "
            "set DIGITJAX_DATA_DIR to a writable folder"
        ) from None
    with lock:
        with contextlib.suppress(*DAMAGED):  # built by another process while this one waited
            return _read_cache(name, cache_file)
        dataset = _read_prepared(name, cache_dir / "tfds")
        _write_cache(dataset, cache_file)
    return dataset


def _read_cache(name: str, cache_file: Path) -> Dataset:
    with np.load(cache_file) as arrays:
        return _checked_dataset(name, arrays)


def _checked_dataset(name: str, arrays: Mapping[str, np.ndarray]) -> Dataset:
    """A Dataset from decoded arrays, which must look like what was cached (else ValueError)."""
    class_names = tuple(str(c) for c in arrays["class_names"])
    splits = []
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (28, 28)
            or labels.shape != images.shape[:1]
            or not len(images)
            or labels.min() < 0
            or labels.max() >= len(class_names)
        ):
            raise ValueError(f"unexpected {split} arrays {images.shape} and {labels.shape}")
        splits += [images, labels.astype(np.int32)]
    train_images, train_labels, test_images, test_labels = splits
    return Dataset(name, train_images, train_labels, test_images, test_labels, class_names)


def _write_cache(dataset: Dataset, cache_file: Path) -> None:
    # Renamed into place whole (write_file): readers take no lock, and see the old file or the
    # new one, never half of one.
    arrays = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset)}
    del arrays["name"]
    contents = io.BytesIO()
    np.savez(contents, **arrays)
    try:
        write_file(cache_file, contents.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the data cache {cache_file} ({e})") from None


def _read_prepared(name: str, tfds_dir: Path) -> Dataset:
    """The prepared tfds dataset, prepared first where needed. A prepared folder that does not
    read back is ours to redo: it is deleted and prepared again, once."""
    from google.protobuf import json_format, message  # tfds's metadata and examples

    damaged = (*DAMAGED, json_format.Error, message.Error)
    folder = tfds_dir / name / TFDS_VERSION
    try:
        return _prepare_and_decode(name, tfds_dir)
    except damaged as e:
        if not folder.is_dir():
            raise UserError(f"cannot prepare '{name}' in {tfds_dir} ({e})") from None
        _warn(f"the prepared dataset {folder} is damaged ({e}); preparing it again")
    try:
        shutil.rmtree(folder)
        return _prepare_and_decode(name, tfds_dir)
    except damaged as e:
        raise UserError(f"cannot read the prepared dataset {folder} ({e}); delete it") from None


def _prepare_and_decode(name: str, tfds_dir: Path) -> Dataset:
    builder = make_builder(name, tfds_dir)
    if not builder.is_prepared():
        # The split generators fetch their own files: tfds's downloader retries forever
        # offline. tfds's own notes ("Downloading and preparing dataset Unknown size...") are
        # wrong when nothing is downloaded, and stdout belongs to --json: say it ourselves.
        print(f"preparing {name} for its first use, once", file=sys.stderr)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare()
    return decode_data_source(name, builder)


def decode_data_source(name: str, builder) -> Dataset:
    """All examples of the prepared dataset, read with tfds's batch read."""
    sources = builder.as_data_source()
    arrays = {"class_names": np.array(builder.info.features["labels"].feature.names)}
    for split in SPLITS:
        blocks = sources[split].__getitems__(range(len(sources[split])))
        arrays[f"{split}_images"] = np.concatenate([b["images"] for b in blocks])
        arrays[f"{split}_labels"] = np.concatenate([b["labels"] for b in blocks])
    return _checked_dataset(name, arrays)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


def legacy_order(split: str, count: int) -> list[int]:
    """The order tfds gave one-image examples keyed by their index (md5 of split name and key),
    in which earlier versions cached every split: with it, a seed trains the same model from an
    old cache or a new one, and the recorded runs stay reproducible."""
    return sorted(range(count), key=lambda i: hashlib.md5(f"{split}{i}".encode()).digest())


def make_builder(name: str, tfds_dir: Path):
    """A tfds builder for `name` that prepares from IDX files with numpy instead of TensorFlow."""
    import tensorflow_datasets as tfds
    from absl import logging
    from tensorflow_datasets.image_classification import mnist

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.ERROR)  # tfds warns about optional OpenCV on every read
    stock = {"mnist": mnist.MNIST, "fashion_mnist": mnist.FashionMNIST}[name]

    # tfds's builder metaclass takes skip_registration; its type stubs do not say so.
    class IdxBuilder(stock, skip_registration=True):  # pyright: ignore[reportGeneralTypeIssues, reportCallIssue]
        VERSION = tfds.core.Version(TFDS_VERSION)
        RELEASE_NOTES = {
            TFDS_VERSION: f"Examples are blocks of {IMAGES_PER_EXAMPLE} raw uint8 images with "
            "their labels, in 3.0.1's order; prepared without TensorFlow."
        }

        def _info(self):
            stock_info = super()._info()
            images = tfds.features.Tensor(
                shape=(None, 28, 28), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
            )
            labels = tfds.features.Sequence(stock_info.features["label"])
            return tfds.core.DatasetInfo(
                builder=self,
                description=stock_info.description,
                features=tfds.features.FeaturesDict({"images": images, "labels": labels}),
                homepage=stock_info.homepage,
                citation=stock_info.citation,
                disable_shuffling=True,  # the images are in legacy_order already
            )

        def _split_generators(self, dl_manager):
            source = find_source_dir(name, tfds_dir / "downloads" / name)
            return {split: self._generate_examples(source, split) for split in SPLITS}

        def _generate_examples(self, source: Path, split: str) -> Iterator:
            images, labels = read_idx_split(source, split)
            order = legacy_order(split, len(images))
            images, labels = images[order], labels[order]
            for block, start in enumerate(range(0, len(images), IMAGES_PER_EXAMPLE)):
                end = start + IMAGES_PER_EXAMPLE
                yield block, {"images": images[start:end], "labels": labels[start:end]}

    IdxBuilder.name = name
    return IdxBuilder(data_dir=str(tfds_dir), file_format="array_record")

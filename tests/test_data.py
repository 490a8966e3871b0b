import gzip
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MNIST_DIR, assert_one_line_error, write_idx, write_mnist_subset
from typer.testing import CliRunner

from digitjax import data
from digitjax.cli import app
from digitjax.config import UserError

FASHION_DIR = data.OFFLINE_DIRS["fashion_mnist"][0]


def test_read_idx_parses_real_mnist():
    images, labels = data.read_idx_split(MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits


def test_holding_out_images_keeps_the_others_and_nothing_copies_nothing():
    dataset = data.load_dataset("mnist")
    kept, images, labels = dataset.hold_out(0.05)
    assert len(kept.train_images) == 57000 and images.shape == (3000, 28, 28)
    assert labels.shape == (3000,) and np.bincount(labels).min() > 200  # not one class's end
    # `--preset fast` holds out nothing, inside the benchmark's clock: no copy of the images.
    kept, images, labels = dataset.hold_out(0.0)
    assert kept is dataset
    assert images.shape == (0, 28, 28) and images.dtype == np.uint8 and labels.shape == (0,)


def test_embedded_copy_is_real_mnist():
    # The MD5 sums published for the original, uncompressed MNIST files.
    published = {
        "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    }
    for filename, md5 in published.items():
        content = gzip.decompress((data.EMBEDDED_MNIST / filename).read_bytes())
        assert hashlib.md5(content).hexdigest() == md5, filename


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache prepared from scratch, in this process."""
    cache = tmp_path_factory.mktemp("prepared")
    data.load_dataset("mnist", cache_dir=cache)
    return cache


def test_tfds_prepares_offline_without_tensorflow_and_caches(prepared_cache):
    assert (prepared_cache / "tfds" / "mnist" / data.TFDS_VERSION).is_dir(), "prepared by tfds"
    assert "tensorflow" not in sys.modules
    # The second load reads the decoded cache and does not even import tfds.
    code = (
        f"import sys; from digitjax.data import load_dataset; from pathlib import Path; "
        f"d = load_dataset('mnist', cache_dir=Path({str(prepared_cache)!r})); "
        f"assert 'tensorflow_datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # Both loads give the IDX files' images and labels, in the order every earlier version
    # cached them in (whose first labels these are), so seeds keep training the same models.
    shutil.rmtree(prepared_cache / "decoded")
    from_tfds = data.load_dataset("mnist", cache_dir=prepared_cache)
    from_cache = data.load_dataset("mnist", cache_dir=prepared_cache)
    for split in data.SPLITS:
        expected = data.read_idx_split(MNIST_DIR, split)
        assert _fingerprint(*from_tfds.split(split)) == _fingerprint(*expected)
        for array, cached in zip(from_tfds.split(split), from_cache.split(split)):
            np.testing.assert_array_equal(array, cached)
            assert array.dtype == cached.dtype
    assert from_tfds.train_labels[:12].tolist() == [4, 1, 0, 7, 8, 1, 2, 7, 1, 6, 6, 4]
    assert from_tfds.test_labels[:12].tolist() == [2, 0, 4, 8, 7, 6, 0, 6, 3, 1, 8, 0]
    assert from_tfds.class_names == tuple(str(i) for i in range(10))


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


def test_processes_starting_together_prepare_once(tmp_path):
    code = (
        "import sys; from digitjax.data import load_dataset; "
        "d = load_dataset('mnist', cache_dir=__import__('pathlib').Path(sys.argv[1])); "
        "assert d.train_images.shape == (60000, 28, 28)"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], text=True, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    stderr = "".join(run.communicate(timeout=300)[1] for run in runs)
    assert [run.returncode for run in runs] == [0, 0, 0], stderr
    assert stderr.count("preparing mnist for its first use") == 1, stderr
    assert "warning" not in stderr and "Downloading" not in stderr, stderr  # nothing is


def _copy(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "cache"))


def _assert_loads_real_mnist(cache: Path) -> None:
    dataset = data.load_dataset("mnist", cache_dir=cache)
    expected = data.read_idx_split(MNIST_DIR, "test")
    assert _fingerprint(*dataset.split("test")) == _fingerprint(*expected)
    assert dataset.train_images.shape == (60000, 28, 28)


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not really a zip"])
def test_damaged_decoded_cache_is_rebuilt(prepared_cache, tmp_path, capsys, damage):
    cache = _copy(prepared_cache, tmp_path)
    cache_file = cache / "decoded" / "mnist.npz"
    cache_file.write_bytes(damage)
    _assert_loads_real_mnist(cache)
    assert f"warning: the data cache {cache_file} is damaged" in capsys.readouterr().err
    _assert_loads_real_mnist(cache)
    assert capsys.readouterr().err == "", "the rebuilt cache reads back"


def test_truncated_prepared_dataset_is_prepared_again(prepared_cache, tmp_path, capsys):
    cache = _copy(prepared_cache, tmp_path)
    (cache / "decoded" / "mnist.npz").unlink()
    folder = cache / "tfds" / "mnist" / data.TFDS_VERSION
    records = next(folder.glob("mnist-train.array_record*"))
    records.write_bytes(records.read_bytes()[: records.stat().st_size // 2])
    _assert_loads_real_mnist(cache)
    assert f"warning: the prepared dataset {folder} is damaged" in capsys.readouterr().err


def test_older_prepared_version_is_left_alone(prepared_cache, tmp_path):
    """Earlier versions prepared PNG examples as tfds version 3.0.1; that folder is not read."""
    cache = _copy(prepared_cache, tmp_path)
    (cache / "decoded" / "mnist.npz").unlink()
    old = cache / "tfds" / "mnist" / "3.0.1"
    old.mkdir()
    (old / "dataset_info.json").write_text("{not what this version reads")
    _assert_loads_real_mnist(cache)
    assert (old / "dataset_info.json").read_text() == "{not what this version reads"


def test_uncreatable_cache_dir_names_it_and_the_way_out(tmp_path, monkeypatch):
    home = tmp_path / "a-file"
    home.write_text("")
    with pytest.raises(
        UserError,
        match=f"cannot create the data cache folder {home}/.*"
        "set DIGITJAX_DATA_DIR to a writable folder",
    ):
        data.load_dataset("mnist", cache_dir=home / "cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DIGITJAX_DATA_DIR")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, str(home / ".cache" / "digitjax"), "DIGITJAX_DATA_DIR")
    monkeypatch.setenv("DIGITJAX_DATA_DIR", "")  # as unset, not the current folder
    assert data.default_cache_dir() == home / ".cache" / "digitjax"


@pytest.mark.skipif(not data.has_idx_files(FASHION_DIR), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_from_offline_folder(tmp_path):
    dataset = data.load_dataset("fashion_mnist", cache_dir=tmp_path)
    assert dataset.train_images.shape == (60000, 28, 28)
    assert dataset.class_names[0] == "T-shirt/top"


def test_unreachable_download_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setitem(data.OFFLINE_DIRS, "fashion_mnist", ())
    from tensorflow_datasets.image_classification import mnist

    monkeypatch.setattr(mnist.FashionMNIST, "URL", "http://127.0.0.1:9/")  # nothing listens
    with pytest.raises(UserError, match="no data reachable for 'fashion_mnist'"):
        data.load_dataset("fashion_mnist", cache_dir=tmp_path)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(UserError, match="unknown dataset 'kmnist'; known: mnist, fashion_mnist"):
        data.load_dataset("kmnist")


def test_data_dir_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(UserError, match="lacks the four IDX files"):
        data.load_dataset("mnist", tmp_path)
    _data_dir(tmp_path)
    assert data.load_dataset("mnist", tmp_path).train_images.shape == (20, 28, 28)
    truncated = tmp_path / data.IDX_FILES["test"][0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read IDX file"):
        data.load_dataset("mnist", tmp_path)


def _data_dir(folder: Path, num_train: int = 20, num_test: int = 10) -> Path:
    return write_mnist_subset(folder, num_train, num_test)


def _rewrite(folder: Path, split: str, labels: bool, change) -> Path:
    """Rewrites one IDX file of `folder` as `change` makes its array."""
    path = folder / data.IDX_FILES[split][int(labels)]
    write_idx(path, change(data.read_idx(path).copy()))
    return path


def _set(array: np.ndarray, index: int, value: int) -> np.ndarray:
    array[index] = value
    return array


@pytest.mark.parametrize("split", data.SPLITS)
def test_idx_file_without_images_is_an_error(tmp_path, split):
    folder = _data_dir(tmp_path)
    path = _rewrite(folder, split, False, lambda images: images[:0])
    _rewrite(folder, split, True, lambda labels: labels[:0])
    with pytest.raises(UserError, match=f"{path} holds no images"):
        data.load_dataset("mnist", folder)


def test_corrupt_gzip_is_an_error(tmp_path):
    path = _data_dir(tmp_path) / data.IDX_FILES["train"][0]
    payload = bytearray(path.read_bytes())
    payload[40:80] = bytes(40)
    path.write_bytes(payload)
    with pytest.raises(UserError, match=f"cannot read IDX file {path}"):
        data.load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\0\0\x08\x03", "is truncated inside its header"),
        (
            b"\0\0\x08\x03" + np.array([1 << 20, 1 << 20, 28], ">u4").tobytes(),
            "declares .* over 4 GiB",
        ),
        (b"\0\0\x0d\x01" + np.array([1], ">u4").tobytes() + bytes(4), "is not a uint8 IDX file"),
    ],
    ids=["4 bytes", "decompression bomb", "float32"],
)
def test_malformed_idx_header_is_an_error(tmp_path, header, message):
    path = _data_dir(tmp_path) / data.IDX_FILES["test"][0]
    path.write_bytes(gzip.compress(header))
    with pytest.raises(UserError, match=f"{path} {message}"):
        data.load_dataset("mnist", tmp_path)


def test_labels_must_be_the_classes_of_the_training_split(tmp_path):
    folder = _data_dir(tmp_path / "stray", 200, 10)
    path = _rewrite(folder, "train", True, lambda labels: _set(labels, 5, 12))
    with pytest.raises(UserError, match=f"labels must be 0..K-1 .*found 0..9, 12 in {path}"):
        data.load_dataset("mnist", folder)
    folder = _data_dir(tmp_path / "unseen", 200, 10)
    path = _rewrite(folder, "test", True, lambda labels: _set(labels, 3, 12))
    with pytest.raises(UserError, match=f"label 12 in {path} is not one of the training labels"):
        data.load_dataset("mnist", folder)
    # Fewer classes are fine as long as they are 0..K-1: here the digits 0-4 only.
    folder = _data_dir(tmp_path / "five", 200, 100)
    for split in data.SPLITS:
        keep = data.read_idx_split(folder, split)[1] < 5
        _rewrite(folder, split, False, lambda images, keep=keep: images[keep])
        _rewrite(folder, split, True, lambda labels, keep=keep: labels[keep])
    assert data.load_dataset("mnist", folder).class_names == ("0", "1", "2", "3", "4")


def test_data_dir_errors_reach_the_cli_as_one_line(tmp_path):
    folder = _data_dir(tmp_path / "data")
    path = _rewrite(folder, "train", True, lambda labels: _set(labels, 0, 12))
    result = CliRunner().invoke(
        app, ["train", "--data-dir", str(folder), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"found 0..9, 12 in {path}")

import subprocess
import sys

import numpy as np
import pytest
from conftest import MNIST_DIR, write_idx

from digitjax import data
from digitjax.config import UserError

FASHION_DIR = data.OFFLINE_DIRS["fashion_mnist"][0]


def test_read_idx_parses_real_mnist():
    images, labels = data.read_idx_split(MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits


def test_embedded_copy_is_real_mnist():
    for split in data.SPLITS:
        embedded = data.read_idx_split(data.EMBEDDED_MNIST, split)
        shared = data.read_idx_split(MNIST_DIR, split)
        np.testing.assert_array_equal(embedded[0], shared[0])
        np.testing.assert_array_equal(embedded[1], shared[1])


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))


def test_tfds_prepares_offline_without_tensorflow_and_caches(tmp_path):
    dataset = data.load_dataset("mnist", cache_dir=tmp_path)
    assert (tmp_path / "tfds" / "mnist").is_dir(), "prepared through tensorflow-datasets"
    assert "tensorflow" not in sys.modules
    for split in data.SPLITS:
        images, labels = dataset.split(split)
        assert _fingerprint(images, labels) == _fingerprint(*data.read_idx_split(MNIST_DIR, split))
    assert dataset.class_names == tuple(str(i) for i in range(10))
    # The second load reads the decoded cache and does not even import tfds.
    code = (f"import sys; from digitjax.data import load_dataset; from pathlib import Path; "
            f"d = load_dataset('mnist', cache_dir=Path({str(tmp_path)!r})); "
            f"assert d.train_images.shape == (60000, 28, 28); "
            f"assert 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


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
    images, labels = data.read_idx_split(MNIST_DIR, "test")
    for split in data.SPLITS:
        write_idx(tmp_path / data.IDX_FILES[split][0], images[:10])
        write_idx(tmp_path / data.IDX_FILES[split][1], labels[:10])
    assert data.load_dataset("mnist", tmp_path).train_images.shape == (10, 28, 28)
    truncated = tmp_path / data.IDX_FILES["test"][0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read IDX file"):
        data.load_dataset("mnist", tmp_path)


def test_damaged_cache_is_a_clear_error(tmp_path):
    cache = tmp_path / "decoded" / "mnist.npz"
    cache.parent.mkdir()
    cache.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="data cache .* is damaged"):
        data.load_dataset("mnist", cache_dir=tmp_path)

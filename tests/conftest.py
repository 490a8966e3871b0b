"""Shared fixtures: real MNIST (a small slice of it for speed), an isolated data cache, and the
tiny reference run that several test files read (trained once per session)."""

import os
from pathlib import Path

import pytest
from helpers import trained_tiny_run, write_mnist_subset

from digitjax.synthetic.user_digits import generate


@pytest.fixture(scope="session", autouse=True)
def isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tfds preparation and the decoded cache go to a fresh folder: the prepare path is tested."""
    cache = tmp_path_factory.mktemp("digitjax-cache")
    os.environ["DIGITJAX_DATA_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_subset(tmp_path_factory.mktemp("tiny-mnist"), 2048, 1000)


@pytest.fixture(scope="session")
def tiny_run(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-epoch tiny run, calibrated. Tests that change a run work on a copy."""
    return trained_tiny_run(tiny_mnist, tmp_path_factory.mktemp("tiny-run"), epochs=3)


@pytest.fixture(scope="session")
def user_images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, int, str]]:
    """Realistic user images of known label (photos, canvas drawings, scans, printed...): four
    of each kind, made from MNIST test digits and fonts."""
    return generate(tmp_path_factory.mktemp("user-images"), per_kind=4, seed=0)


@pytest.fixture(scope="session")
def user_image_files(user_images: list[tuple[Path, int, str]]) -> list[Path]:
    return [path for path, _, _ in user_images]

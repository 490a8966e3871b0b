"""The accuracy features: augmentation, the weight average (EMA) and `--preset`."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from helpers import MNIST_DIR, TINY_FLAGS, assert_one_line_error
from typer.testing import CliRunner

from digitjax.augment import (
    augment,
    is_random,
    random_blur,
    random_low_res,
    random_shift,
    random_thickness,
    random_warp,
)
from digitjax.checkpoint import LATEST, restore_model
from digitjax.cli import app
from digitjax.config import Config
from digitjax.data import read_idx_split
from digitjax.model import normalize

runner = CliRunner()


def digits(count: int) -> jax.Array:
    return normalize(jnp.asarray(read_idx_split(MNIST_DIR, "test")[0][:count]))


def test_warp_with_nothing_to_do_is_the_identity():
    images = digits(8)
    same = random_warp(jax.random.key(0), images, 0, 0, 0)
    np.testing.assert_allclose(same, images, atol=1e-6)


def test_warp_moves_ink_but_keeps_the_digit():
    images = digits(64)
    moved = random_warp(jax.random.key(1), images, 2, 10, 0.1)
    assert moved.shape == images.shape
    assert np.abs(moved - images).mean(axis=(1, 2)).min() > 0.01  # every image changed
    ink, moved_ink = images.sum(axis=(1, 2)), moved.sum(axis=(1, 2))
    # Scaling by at most 10% changes the ink by at most ~21%; nothing is cut off at the edge.
    assert np.all(np.abs(moved_ink / ink - 1) < 0.25)
    np.testing.assert_array_equal(moved, random_warp(jax.random.key(1), images, 2, 10, 0.1))


def test_pure_rotation_turns_the_ink_about_the_centre():
    image = jnp.zeros((1, 28, 28)).at[0, 13:15, 20:24].set(1.0)  # a bar right of centre
    turned = random_warp(jax.random.key(2), image, 0, 90, 0)
    rows, cols = np.nonzero(np.asarray(turned[0]) > 0.5)
    # Wherever the bar went, it stayed at the same distance from the centre (13.5, 13.5).
    distance = np.hypot(rows - 13.5, cols - 13.5)
    assert np.all((distance > 5) & (distance < 11)), (rows, cols)


def ink(images: jax.Array) -> np.ndarray:
    return np.asarray(images).sum(axis=(1, 2))


def test_elastic_distortion_bends_strokes_locally_and_keeps_the_ink():
    images = digits(64)
    bent = random_warp(jax.random.key(3), images, 0, 0, 0, 1.5)
    change = np.abs(bent - images).mean(axis=(1, 2))
    assert change.min() > 0.005  # every image bent
    assert np.all(np.abs(ink(bent) / ink(images) - 1) < 0.2)
    # Local: the digit's centre of mass barely moves (a shift would move it).
    rows = np.arange(28)[None, :, None]
    centre = (np.asarray(images) * rows).sum(axis=(1, 2)) / ink(images)
    bent_centre = (np.asarray(bent) * rows).sum(axis=(1, 2)) / ink(bent)
    assert np.abs(bent_centre - centre).max() < 1.5


def test_thickness_makes_strokes_both_thicker_and_thinner():
    images = digits(64)
    changed = random_thickness(jax.random.key(4), images, 1.0)
    ratio = ink(changed) / ink(images)
    assert ratio.max() > 1.3 and ratio.min() < 0.8
    assert float(changed.min()) >= 0 and float(changed.max()) <= 1
    np.testing.assert_allclose(random_thickness(jax.random.key(4), images, 0.0), images)


def test_blur_spreads_ink_without_adding_or_losing_it():
    images = digits(64)
    blurred = random_blur(jax.random.key(5), images, 1.5)
    np.testing.assert_allclose(random_blur(jax.random.key(5), images, 0.0), images, atol=1e-6)
    # MNIST digits keep a margin, so a blur of this size loses little ink over the edge.
    np.testing.assert_allclose(ink(blurred), ink(images), rtol=0.02)
    assert np.all(
        np.asarray(blurred).max(axis=(1, 2)) <= np.asarray(images).max(axis=(1, 2)) + 1e-6
    )
    assert np.asarray(blurred).max(axis=(1, 2)).min() < 0.99  # some image lost its peak


def test_low_res_round_trip_keeps_the_digit_in_sixteen_grey_levels():
    images = digits(64)
    np.testing.assert_array_equal(random_low_res(jax.random.key(6), images, 0.0), images)
    coarse = np.asarray(random_low_res(jax.random.key(6), images, 1.0))
    np.testing.assert_allclose(coarse * 15, np.round(coarse * 15), atol=1e-4)
    assert not np.allclose(coarse, images, atol=0.1)
    for original, round_trip in zip(np.asarray(images), coarse):
        assert np.corrcoef(original.ravel(), round_trip.ravel())[0, 1] > 0.6
    some = np.asarray(random_low_res(jax.random.key(6), images, 0.5))
    changed = np.abs(some - np.asarray(images)).max(axis=(1, 2)) > 0
    assert 16 < changed.sum() < 48


def test_augment_keeps_the_random_numbers_of_earlier_settings():
    """Runs of earlier versions resume with the same augmentation they started with."""
    images, key = digits(16), jax.random.key(7)
    shifted = augment(key, images, Config(augment_shift=2))
    np.testing.assert_array_equal(shifted, random_shift(key, images, 2))
    warped = augment(key, images, Config(augment_shift=2, augment_rotate=15, augment_scale=0.1))
    np.testing.assert_array_equal(warped, random_warp(key, images, 2, 15, 0.1))
    unchanged = Config(augment_shift=0, augment_rotate=0.0, augment_scale=0.0)
    np.testing.assert_array_equal(augment(key, images, unchanged), images)


# One value that changes the images for each augmentation setting.
SOME_AUGMENTATION = {
    "augment_shift": 2,
    "augment_rotate": 15.0,
    "augment_scale": 0.1,
    "augment_elastic": 2.0,
    "augment_thickness": 0.5,
    "augment_blur": 1.0,
    "augment_low_res": 1.0,
}


def test_is_random_says_whether_augment_changes_the_images():
    """The training chunk draws no random keys where `is_random` is False: each setting
    (every Config field of the augmentation) must make it True."""
    assert set(SOME_AUGMENTATION) == {
        field.name for field in dataclasses.fields(Config) if field.name.startswith("augment_")
    }
    images, key = digits(16), jax.random.key(3)
    # Each setting at its type's zero: 0 for the shift, 0.0 for the others.
    nothing = Config(**{name: type(value)() for name, value in SOME_AUGMENTATION.items()})
    assert not is_random(nothing)
    np.testing.assert_array_equal(augment(key, images, nothing), images)
    for name, value in SOME_AUGMENTATION.items():
        config = dataclasses.replace(nothing, **{name: value})
        assert is_random(config), name
        assert not np.array_equal(augment(key, images, config), images), name


def test_ema_run_evaluates_and_saves_the_average(tiny_mnist: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    flags = ["train", "--data-dir", str(tiny_mnist), *TINY_FLAGS, "--epochs", "2"]
    result = runner.invoke(app, [*flags, "--ema-decay", "0.9", "--out", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["config"]["ema_decay"] == 0.9
    assert summary["last"]["test_accuracy"] > 0.5

    model = restore_model(run_dir, LATEST)
    manager = ocp.CheckpointManager(run_dir.resolve() / LATEST)
    state = manager.restore(manager.latest_step())["state"]
    manager.close()
    kernel = model.params["hidden"]["kernel"]
    np.testing.assert_array_equal(kernel, state["ema_params"]["hidden"]["kernel"])
    raw = restore_model(run_dir, LATEST, average=False)
    raw_kernel = raw.params["hidden"]["kernel"]
    np.testing.assert_array_equal(raw_kernel, state["params"]["hidden"]["kernel"])
    assert np.abs(kernel - raw_kernel).max() > 1e-4
    # `evaluate` scores the same weights the training loop did: the average.
    evaluated = runner.invoke(app, ["evaluate", str(run_dir), "--latest", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == summary["last"]["test_accuracy"]


def test_preset_best_sets_its_recipe_and_flags_override_it(tiny_mnist: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--preset", "best", "--data-dir", str(tiny_mnist), *TINY_FLAGS]
        + ["--epochs", "1", "--out", str(run_dir), "--json"],
    )
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert (config["augment_rotate"], config["augment_scale"], config["ema_decay"]) == (
        15.0,
        0.15,
        0.999,
    )
    assert config["channels"] == [4, 8] and config["epochs"] == 1  # the flags won


def test_unknown_preset_is_one_line_error(tmp_path: Path):
    result = runner.invoke(app, ["train", "--preset", "turbo", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "unknown preset 'turbo'; known: fast, best, robust")

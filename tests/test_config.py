import dataclasses
from pathlib import Path

import pytest

from digitjax.config import ADDED_LATER, PRESET_PURPOSES, PRESETS, Config, UserError, uses_ema


def test_from_dict_gives_older_checkpoints_the_values_they_were_trained_with():
    saved = Config().to_dict()
    for name in ADDED_LATER:
        del saved[name]
    saved["channels"] = [16, 32, 64]  # JSON has lists, not tuples
    config = Config.from_dict(saved)
    assert (config.augment_rotate, config.augment_scale, config.ema_decay) == (0.0, 0.0, 0.0)
    assert config.channels == (16, 32, 64) and not uses_ema(config)


def test_from_dict_round_trips_and_accepts_whole_floats_as_ints():
    config = Config(learning_rate=1e-3, channels=(4, 8))
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict({**config.to_dict(), "weight_decay": 0}).weight_decay == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"epochs": "5"}, "config field epochs = '5' has the wrong type"),
        ({"channels": [4, "8"]}, "config field channels"),
        ({"seed": True}, "config field seed"),
        ({"data_dir": 3}, "config field data_dir"),
        ({"init_from": ["run"]}, "config field init_from"),
        ({"colour": "red"}, "unknown fields ['colour']"),
        ({"epochs": 0}, "--epochs must be in [1, 100000], got 0"),
    ],
)
def test_from_dict_refuses_what_digitjax_never_wrote(raw, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Config.from_dict({**Config().to_dict(), **raw})


def test_from_flags_applies_the_preset_then_the_flags_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = {"epochs": 3, "seed": None, "data_dir": "mnist-files", "init_from": "runs/a"}
    config = Config.from_flags(flags, "best")
    assert config.channels == PRESETS["best"]["channels"] and config.epochs == 3
    assert config.seed == Config().seed
    assert config.data_dir == str(tmp_path / "mnist-files")  # resolved where it was given
    assert config.init_from == str(tmp_path / "runs" / "a")
    assert Config.from_flags({}) == Config()
    with pytest.raises(UserError, match="unknown preset 'turbo'; known: fast, best, robust"):
        Config.from_flags({}, "turbo")


def test_every_field_a_user_sets_has_help_and_a_panel():
    for field in dataclasses.fields(Config):
        if field.name != "chunks_per_epoch":
            assert field.metadata["help"].endswith(".") and field.metadata["panel"]


def test_data_dir_path_objects_are_stored_as_text():
    config = Config.from_flags({"data_dir": Path("/tmp")})
    assert config.data_dir == "/tmp"


def test_presets_are_the_recipes_benchmarks_measured():
    """README and benchmarks/README.md give each recipe's accuracy and time: a change here
    must come with new figures there."""
    default = Config()
    assert (default.channels, default.dense, default.batch_size) == ((8, 16, 32), 128, 64)
    assert (default.epochs, default.warmup_epochs, default.augment_shift) == (8, 0.5, 2)
    assert (default.learning_rate, default.ema_decay, default.calibration_fraction) == (
        5e-3,
        0.99,
        0.05,
    )
    assert default.adam_beta2 == 0.999 and not default.adam_nesterov  # optax's
    fast = Config.from_flags({}, "fast")
    assert fast == Config(
        epochs=2,
        learning_rate=7e-3,
        adam_beta2=0.95,
        adam_nesterov=True,
        warmup_epochs=0.1,
        augment_shift=0,
        dense=64,
        calibration_fraction=0.0,
        quick_compile=True,
    )
    best, robust = Config.from_flags({}, "best"), Config.from_flags({}, "robust")
    assert (best.channels, best.dense, best.epochs) == ((32, 64, 128), 256, 20)
    assert (best.augment_rotate, best.augment_scale, best.augment_elastic) == (15.0, 0.15, 0.0)
    # The bundled model's recipe: best's, with a narrower dense layer, longer, the user-image
    # augmentations and non-digit images.
    assert (
        dataclasses.replace(
            robust,
            dense=best.dense,
            epochs=best.epochs,
            augment_elastic=0.0,
            augment_thickness=0.0,
            augment_blur=0.0,
            augment_low_res=0.0,
            non_digit_fraction=0.0,
        )
        == best
    )
    # Refusing non-digits is not part of any preset yet (benchmarks/README.md, Non-digit
    # rejection: it costs user digits more than the bundled model may lose).
    assert robust.non_digit_fraction == 0 and best.non_digit_fraction == 0
    assert min(robust.augment_elastic, robust.augment_thickness, robust.augment_blur) > 0
    assert set(PRESET_PURPOSES) == set(PRESETS)

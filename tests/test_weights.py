"""What a checkpoint's weights must be, known without JAX: the shapes Flax gives the CNN, and
the checksum that `checkpoint.state_checksums` writes."""

import jax
import numpy as np
import pytest

from digitjax.checkpoint import leaves_by_path, state_checksums
from digitjax.config import PRESETS, Config
from digitjax.model import abstract_model, create_model
from digitjax.weights import checksum, parameter_shapes


@pytest.mark.parametrize("preset", [None, *PRESETS])
@pytest.mark.parametrize("num_classes", [10, 3])
def test_parameter_shapes_are_the_flax_models(preset, num_classes):
    config = Config.from_flags({}, preset)
    _, params = abstract_model(config, num_classes)
    flax_shapes = {path: leaf.shape for path, leaf in leaves_by_path(params).items()}
    assert parameter_shapes(config.channels, config.dense, num_classes) == flax_shapes


@pytest.mark.parametrize("channels", [(4,), (4, 8, 8, 8)])
def test_parameter_shapes_of_fewer_and_more_layers_than_pools(channels):
    config = Config(channels=channels, dense=16)
    _, params = abstract_model(config)
    flax_shapes = {path: leaf.shape for path, leaf in leaves_by_path(params).items()}
    assert parameter_shapes(channels, 16, 10) == flax_shapes


def test_checksum_of_numpy_leaves_is_that_of_the_saved_device_arrays():
    _, params = create_model(Config(channels=(4, 8), dense=16))
    on_device = jax.device_put(params)
    on_host = {path: np.asarray(leaf) for path, leaf in leaves_by_path(params).items()}
    assert state_checksums({"params": on_device})["params"] == checksum(on_host)
    on_host["logits/bias"] = on_host["logits/bias"] + 1
    assert state_checksums({"params": on_device})["params"] != checksum(on_host)

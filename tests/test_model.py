import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import MNIST_DIR

from digitjax.config import Config
from digitjax.data import read_idx_split
from digitjax.model import (
    CNN,
    abstract_model,
    apply,
    create_model,
    max_over,
    max_pool_2x2,
    normalize,
)


@pytest.mark.parametrize(
    "conv_impls", [("window", "im2col", "im2col"), ("window", "lax", "lax"), ("im2col",) * 3]
)
def test_layer_implementations_agree_with_lax_forward_and_backward(conv_impls):
    """The same arithmetic in float32: GPUs would otherwise run these matmuls and convolutions
    in TF32, whose rounding differs between the forms by ~1e-3."""
    with jax.default_matmul_precision("float32"):
        check_layer_implementations(conv_impls)


def check_layer_implementations(conv_impls: tuple[str, ...]) -> None:
    config = Config(channels=(8, 16, 16), dense=32)
    graphdef, params = create_model(config)
    images = normalize(jnp.asarray(read_idx_split(MNIST_DIR, "test")[0][:16]))

    def loss(params, conv_impls):
        return jnp.sum(apply(graphdef, params, images, conv_impls) ** 2)

    np.testing.assert_allclose(
        apply(graphdef, params, images, conv_impls),
        apply(graphdef, params, images),
        rtol=1e-4,
        atol=1e-4,
    )
    grads = jax.grad(loss)(params, conv_impls)
    grads_lax = jax.grad(loss)(params, None)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_lax), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_model_shape_follows_config():
    graphdef, params = create_model(Config(channels=(4,), dense=8), num_classes=7)
    logits = apply(graphdef, params, jnp.zeros((3, 28, 28)))
    assert logits.shape == (3, 7)
    assert params["convs"][0]["kernel"].shape == (3, 3, 1, 4)
    assert params["hidden"]["kernel"].shape == (14 * 14 * 4, 8)


def test_abstract_model_is_the_model_flax_initializes():
    """`abstract_model` traces zero kernels, which is quicker: its graph and shapes must be
    those of the model as Flax's own initializers make it."""
    config = Config(channels=(4, 8), dense=16)
    graphdef, shapes = abstract_model(config, num_classes=7)
    flax_graphdef, flax_params = nnx.split(CNN((4, 8), 16, 7, nnx.Rngs(0)), nnx.Param)
    assert graphdef == flax_graphdef
    flax_shapes = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), nnx.to_pure_dict(flax_params)
    )
    assert shapes == flax_shapes


def test_max_over_sends_the_gradient_to_the_first_maximum_only():
    x = jnp.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [0.0, -1.0, 4.0, 4.0]])
    np.testing.assert_array_equal(max_over(x, 1), [3.0, 5.0, 4.0])
    grad = jax.grad(lambda x: jnp.sum(max_over(x, 1) * jnp.array([1.0, 2.0, 3.0])))(x)
    np.testing.assert_array_equal(grad, [[0, 1, 0, 0], [2, 0, 0, 0], [0, 0, 3, 0]])


def test_max_pool_gradient_goes_to_the_first_maximum_in_raster_order():
    window = jnp.array([[2.0, 2.0], [2.0, 1.0]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda x: max_pool_2x2(x).sum())(window)
    np.testing.assert_array_equal(grad.reshape(2, 2), [[1, 0], [0, 0]])

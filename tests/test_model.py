import jax
import jax.numpy as jnp
import numpy as np
from conftest import MNIST_DIR

from digitjax.config import Config
from digitjax.data import read_idx_split
from digitjax.model import apply, create_model, normalize


def test_im2col_and_lax_convolutions_agree_forward_and_backward():
    config = Config(channels=(8, 16, 16), dense=32)
    graphdef, params = create_model(config)
    images = normalize(jnp.asarray(read_idx_split(MNIST_DIR, "test")[0][:16]))

    def loss(params, conv_impl):
        return jnp.sum(apply(graphdef, params, images, conv_impl) ** 2)

    np.testing.assert_allclose(apply(graphdef, params, images, "im2col"),
                               apply(graphdef, params, images, "lax"), rtol=1e-4, atol=1e-4)
    grads_im2col = jax.grad(loss)(params, "im2col")
    grads_lax = jax.grad(loss)(params, "lax")
    for a, b in zip(jax.tree.leaves(grads_im2col), jax.tree.leaves(grads_lax)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_model_shape_follows_config():
    graphdef, params = create_model(Config(channels=(4,), dense=8), num_classes=7)
    logits = apply(graphdef, params, jnp.zeros((3, 28, 28)))
    assert logits.shape == (3, 7)
    assert params["convs"][0]["kernel"].shape == (3, 3, 1, 4)
    assert params["hidden"]["kernel"].shape == (14 * 14 * 4, 8)

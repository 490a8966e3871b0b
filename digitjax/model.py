"""The CNN: 3x3 convolutions with ReLU and 2x2 max-pooling, then two dense layers.

One model definition, three implementations of a convolution layer, all with the same
parameters, chosen per layer and backend by `conv_impls_for`:
- "lax": `lax.conv`, the reference, used off CPU;
- "im2col": patches and one matmul; XLA:CPU runs the backward pass of `lax.conv` far slower;
- "window": conv, ReLU and 2x2 pooling as one matmul over 4x4 windows, for the first layer on
  CPU (one input channel, so K = 9 for im2col): faster than im2col in training and than
  `lax.conv` in inference.
The measured speed-ups of each form are in README.md ("Why it is fast on a CPU").
"""

import functools
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.linear import default_kernel_init
from flax.typing import Initializer

from digitjax.config import Config
from digitjax.weights import (
    NUM_POOLS,
    NonDigitDetector,
    conv_statistics,
    detector_features,
    parameter_shapes,
)


def conv_impls_for(backend: str, training: bool, num_layers: int) -> tuple[str, ...]:
    if backend != "cpu":
        return ("lax",) * num_layers
    return ("window",) + ("im2col" if training else "lax",) * (num_layers - 1)


def im2col_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A stride-1 'SAME' convolution as one matmul over the stacked shifted inputs."""
    batch, height, width, channels = x.shape
    kh, kw, _, features = kernel.shape
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    out = matmul(patches.reshape(-1, kh * kw * channels), kernel.reshape(-1, features))
    return out.reshape(batch, height, width, features) + bias


@jax.custom_vjp
def matmul(x: jax.Array, weights: jax.Array) -> jax.Array:
    """`x @ weights`, (M, K) x (K, N) with M >> K, N as in the im2col layers, with its weight
    gradient in the form XLA:CPU runs fastest."""
    return x @ weights


def _matmul_fwd(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, tuple]:
    return x @ weights, (x, weights)


def _matmul_bwd(residuals: tuple, grad: jax.Array) -> tuple:
    x, weights = residuals
    # The weight gradient as (N, M) @ (M, K), transposed after, not autodiff's (K, M) @ (M, N):
    # a 5% faster training step with jax 0.10.2, where XLA:CPU runs both as Eigen products
    # (earlier versions sent this form to YNNPACK). The barrier stops XLA from folding the
    # transpose back into the product.
    weights_grad = jax.lax.optimization_barrier(grad.T @ x).T
    return grad @ weights.T, weights_grad


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _window_taps() -> np.ndarray:
    """taps[a, b, p, q, u, v] = 1 where 3x3 tap (u, v) of the conv output at pooling position
    (p, q) reads pixel (a, b) of the 4x4 input window that covers the 2x2 pooling window."""
    taps = np.zeros((4, 4, 2, 2, 3, 3), np.float32)
    for p, q, u, v in np.ndindex(2, 2, 3, 3):
        taps[p + u, q + v, p, q, u, v] = 1
    return taps


def conv_relu_pool_2x2(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`max_pool_2x2(relu(conv(x)))` for a 3x3 'SAME' conv, as one matmul of the 4x4 input
    windows at stride 2 with a (16 * channels, 4 * features) kernel that holds the 3x3 kernel
    once per pooling position, then a max over those four."""
    batch, height, width, channels = x.shape
    features = kernel.shape[-1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # The window at (i, j) is the 2x2 blocks (i..i+1, j..j+1) of the padded input: four block
    # slices and one transpose: the layer's forward pass runs 22-30% faster than with sixteen
    # strided pixel slices.
    blocks = padded.reshape(batch, height // 2 + 1, 2, width // 2 + 1, 2, channels)
    rows, cols = height // 2, width // 2
    shifted = jnp.stack(
        [jnp.stack([blocks[:, i : i + rows, :, j : j + cols] for j in (0, 1)]) for i in (0, 1)]
    )  # (block row, block col, batch, row, pixel row, col, pixel col, channel)
    windows = shifted.transpose(2, 3, 5, 0, 4, 1, 6, 7)  # pixel (a, b) = 2 * block + pixel
    window_kernel = jnp.einsum("abpquv,uvcf->abcpqf", _window_taps(), kernel)
    # 2-D operands: with the 4-D windows XLA:CPU transposes the gradient slowly. Plain `@`:
    # with `matmul`'s weight gradient this layer measured slower in training.
    pre_pool = windows.reshape(-1, 16 * channels) @ window_kernel.reshape(16 * channels, -1)
    # custom_vjp hides the return type from type checkers: it is max_over's, an Array.
    pooled = cast(
        jax.Array, max_over(pre_pool.reshape(batch, height // 2, width // 2, 4, features), 3)
    )
    return jax.nn.relu(pooled + bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_over(x: jax.Array, axis: int) -> jax.Array:
    """`x.max(axis)` over a few candidates, with the gradient going to the first maximal one,
    as in XLA's and PyTorch's max-pooling. JAX's own gradient splits it among ties with
    reductions that XLA:CPU runs as several unfused passes over `x`; this compares and
    selects, which makes the whole training step markedly faster."""
    return x.max(axis)


def _max_over_fwd(x: jax.Array, axis: int) -> tuple[jax.Array, tuple]:
    maximum = x.max(axis)
    return maximum, (x, maximum)


def _max_over_bwd(axis: int, residuals: tuple, grad: jax.Array) -> tuple:
    x, maximum = residuals
    # Ties are common (blank and saturated regions), so only the first maximum may take it.
    # One candidate at a time: as one select over shifted masks the window layer's gradient
    # ran slower.
    taken = jnp.zeros(maximum.shape, bool)
    grads = []
    for i in range(x.shape[axis]):
        is_first_max = (jax.lax.index_in_dim(x, i, axis, keepdims=False) == maximum) & ~taken
        taken = taken | is_first_max
        grads.append(jnp.where(is_first_max, grad, 0))
    return (jnp.stack(grads, axis),)


max_over.defvjp(_max_over_fwd, _max_over_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    # A reshape and max is much faster on CPU than reduce_window, forward and backward.
    batch, height, width, channels = x.shape
    # Along rows, then columns: the gradient goes to the first maximum in raster order.
    return max_over(max_over(x.reshape(batch, height // 2, 2, width // 2, 2, channels), 4), 2)


class CNN(nnx.Module):
    def __init__(
        self,
        channels: tuple[int, ...],
        dense: int,
        num_classes: int,
        rngs: nnx.Rngs,
        kernel_init: Initializer = default_kernel_init,  # Flax's own: LeCun normal
    ):
        shapes = parameter_shapes(channels, dense, num_classes)
        self.convs = nnx.List()
        for i in range(len(channels)):
            *kernel_size, in_channels, out_channels = shapes[f"convs/{i}/kernel"]
            conv = nnx.Conv(
                in_channels, out_channels, tuple(kernel_size), kernel_init=kernel_init, rngs=rngs
            )
            self.convs.append(conv)
        self.hidden = nnx.Linear(*shapes["hidden/kernel"], kernel_init=kernel_init, rngs=rngs)
        self.logits = nnx.Linear(*shapes["logits/kernel"], kernel_init=kernel_init, rngs=rngs)

    def __call__(self, images: jax.Array, conv_impls: tuple[str, ...] | None = None) -> jax.Array:
        """images: (B, 28, 28) floats in [0, 1]; returns (B, num_classes) logits.
        conv_impls: one per conv layer (see the module docstring); default all "lax"."""
        return self.logits(self.activations(images, conv_impls)[0])

    def activations(
        self, images: jax.Array, conv_impls: tuple[str, ...] | None = None
    ) -> tuple[jax.Array, list[jax.Array]]:
        """The hidden layer's activations, and each conv layer's output after its ReLU and
        pooling (what the non-digit detector reads; unused, XLA computes nothing more)."""
        x = images[..., None]
        conv_impls = conv_impls or ("lax",) * len(self.convs)
        conv_outputs = []
        for i, (conv, impl) in enumerate(zip(self.convs, conv_impls, strict=True)):
            if impl == "window":
                x = conv_relu_pool_2x2(x, conv.kernel[...], conv.bias[...])
            else:
                x = conv(x) if impl == "lax" else im2col_conv(x, conv.kernel[...], conv.bias[...])
                x = jax.nn.relu(x)
                if i < NUM_POOLS:
                    x = max_pool_2x2(x)
            conv_outputs.append(x)
        return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))), conv_outputs


def create_model(config: Config, num_classes: int = 10) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """The model's static structure and freshly initialized parameters (`initial_params`)."""
    graphdef, shapes = abstract_model(config, num_classes)
    return graphdef, initial_params(shapes, config.seed)


def initial_params(shapes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Parameters of the shapes `abstract_model` gives, as a plain nested dict of numpy
    arrays: Flax's defaults for `Conv` and `Linear` (LeCun-normal kernels truncated at two
    standard deviations, zero biases), drawn on the host from `seed`. Drawing them with
    `jax.random` meant compiling a program for it at the start of every run."""
    rng = np.random.default_rng(seed)

    def initial_value(path: tuple, shape: jax.ShapeDtypeStruct) -> np.ndarray:
        if path[-1].key == "bias":
            return np.zeros(shape.shape, shape.dtype)
        values = rng.standard_normal(shape.shape)
        while (outside := np.abs(values) > 2).any():
            values[outside] = rng.standard_normal(outside.sum())
        fan_in = math.prod(shape.shape[:-1])
        # 0.8796...: the standard deviation of a unit normal truncated at +-2.
        return (values * math.sqrt(1 / fan_in) / 0.87962566103423978).astype(shape.dtype)

    return jax.tree_util.tree_map_with_path(initial_value, shapes)


def abstract_model(config: Config, num_classes: int = 10) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """As `create_model`, with shapes in place of parameters."""
    # Zero kernels: only the shapes are kept, and these trace in a sixth of the time of
    # Flax's random ones (0.02 against 0.13 s at a process's start, inside the benchmark's
    # clock); `initial_params` draws the values.
    zeros = nnx.initializers.zeros_init()
    model = nnx.eval_shape(
        lambda: CNN(config.channels, config.dense, num_classes, nnx.Rngs(0), zeros)
    )
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def apply(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    images: jax.Array,
    conv_impls: tuple[str, ...] | None = None,
) -> jax.Array:
    return nnx.merge(graphdef, params)(images, conv_impls)


def calibrated_outputs(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    images: jax.Array,
    conv_impls: tuple[str, ...] | None = None,
    temperature: float | None = None,
    detector: NonDigitDetector | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Class probabilities: the softmax of the logits divided by the checkpoint's temperature,
    which calibrates them (None, a checkpoint without one: the plain softmax); and the
    non-digit detector's (B,) scores, positive for what does not look like a digit (None
    without a detector)."""
    cnn = nnx.merge(graphdef, params)
    hidden, conv_outputs = cnn.activations(images, conv_impls)
    logits = cnn.logits(hidden)
    if temperature is not None:
        logits = logits / temperature
    if detector is None:
        return jax.nn.softmax(logits), None
    # The barrier keeps XLA:CPU from fusing the detector's reductions into the layers' fused
    # program: 256 images took 47 ms with them fused in, 37 ms with it, 25 ms without any
    # detector (benchmarks/README.md, "Non-digit rejection").
    conv_outputs = jax.lax.optimization_barrier(conv_outputs)
    conv_stats = [conv_statistics(jnp, x) for x in conv_outputs]
    features = detector_features(jnp, hidden, logits, conv_stats)
    return jax.nn.softmax(logits), detector.scores(features)


def normalize(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 255.0

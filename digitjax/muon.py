"""Muon for the interior layers' kernels (`--optimizer muon`): their momentum, orthogonalized.

Muon (Jordan et al., 2024) steps each weight matrix along its momentum with every singular
value set to about one, found by a few Newton-Schulz iterations, X <- (a + bA + cA^2) X with
A = X X^T. `optax.contrib.muon` runs those on X itself; here X is a short, wide matrix (the
hidden layer's is 64 x 1568), so they run on its small Gram matrix A instead, as products of
polynomials of A, and only two products touch the long side: a third of the arithmetic for
three iterations (benchmarks/README.md, "Muon").
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Jordan's quintic, as in optax.contrib.muon: it raises small singular values quickly rather
# than bringing them all exactly to 1 (three steps leave a random 1568 x 64 matrix's at
# 0.68-0.90), which trains as well.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NEWTON_SCHULZ_STEPS = 3  # 2 to 5 crossed 99% alike (--preset fast, eight seeds)
MOMENTUM = 0.95


def orthogonalize(update: jax.Array, steps: int = NEWTON_SCHULZ_STEPS) -> jax.Array:
    """`update` (a kernel's gradient or momentum: (..., fan_in, fan_out), every axis but the
    last read as fan-in) with its singular values brought near one, then scaled by
    sqrt(max(1, fan_out / fan_in)) as in Muon, so that wide outputs step alike."""
    fan_out = update.shape[-1]
    matrix = update.reshape(-1, fan_out)
    transposed = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if transposed else matrix  # the short side first: the Gram matrix is small
    x = x / (jnp.linalg.norm(x) + 1e-7)  # every singular value <= 1, where the iteration works
    gram = x @ x.T
    identity = jnp.eye(gram.shape[0], dtype=x.dtype)
    product = identity
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    for _ in range(steps):
        # One iteration multiplies X by P = a + bA + cA^2 on the left; P is a polynomial of A,
        # so it commutes with A and the new Gram matrix is P A P.
        step = a * identity + b * gram + c * gram @ gram
        product = step @ product
        gram = step @ gram @ step
    x = product @ x
    scale = math.sqrt(max(1.0, fan_out / matrix.shape[0]))
    return (scale * (x.T if transposed else x)).reshape(update.shape)


def muon(learning_rate: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    """Nesterov momentum, orthogonalized, with AdamW's decoupled weight decay. optax.trace's
    momentum is a sum rather than an average; the two differ by a constant factor, which the
    orthogonalization's normalization removes."""
    return optax.chain(
        optax.trace(decay=MOMENTUM, nesterov=True),
        optax.stateless(lambda updates, _: jax.tree.map(orthogonalize, updates)),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def interior_kernels(params: Any) -> Any:
    """The labels of `optax.partition`: "muon" for the kernels of every convolution but the
    first and of the hidden dense layer, "adamw" for the rest. Muon is meant for the matrices
    between layers; the input layer's (9 x 8 here) and the output layer's, and the biases,
    keep AdamW, as in Muon's own recipes."""

    def label(path: tuple[Any, ...], _: Any) -> str:
        names = [getattr(key, "key", None) for key in path]
        conv_after_first = names[0] == "convs" and names[1] != 0
        interior = names[-1] == "kernel" and (conv_after_first or names[0] == "hidden")
        return "muon" if interior else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)

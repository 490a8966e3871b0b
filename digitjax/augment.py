"""Data augmentation on device: random shifts, or rotations, scaling and shifts together,
applied to each training batch inside the compiled training chunk."""

import jax
import jax.numpy as jnp

from digitjax.config import Config


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by up to `max_shift` pixels in each direction, filling with 0."""
    size = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda image, offset: jax.lax.dynamic_slice(image, offset, size))(
        padded, offsets
    )


def random_affine(
    key: jax.Array, images: jax.Array, max_shift: float, max_rotate: float, max_scale: float
) -> jax.Array:
    """Rotates each image by up to `max_rotate` degrees, scales it by up to `max_scale` and
    translates it by up to `max_shift` pixels, about its centre, bilinear, filling with 0."""
    count, height, width = images.shape
    angle_key, scale_key, shift_key = jax.random.split(key, 3)
    angle = jnp.deg2rad(jax.random.uniform(angle_key, (count, 1, 1), minval=-1, maxval=1))
    angle = angle * max_rotate
    scale = 1 + max_scale * jax.random.uniform(scale_key, (count, 1, 1), minval=-1, maxval=1)
    shift = max_shift * jax.random.uniform(shift_key, (2, count, 1, 1), minval=-1, maxval=1)
    center_y, center_x = (height - 1) / 2, (width - 1) / 2
    out_y, out_x = jnp.meshgrid(
        jnp.arange(height) - center_y, jnp.arange(width) - center_x, indexing="ij"
    )
    # Each output pixel reads the input where the inverse transform takes it.
    y, x = out_y - shift[0], out_x - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source_y = (cos * y + sin * x) / scale + center_y
    source_x = (cos * x - sin * y) / scale + center_x
    return jax.vmap(
        lambda image, sy, sx: jax.scipy.ndimage.map_coordinates(image, [sy, sx], order=1, cval=0)
    )(images, source_y, source_x)


def augment(key: jax.Array, images: jax.Array, config: Config) -> jax.Array:
    if config.augment_rotate or config.augment_scale:
        return random_affine(
            key, images, config.augment_shift, config.augment_rotate, config.augment_scale
        )
    if config.augment_shift:
        return random_shift(key, images, config.augment_shift)
    return images

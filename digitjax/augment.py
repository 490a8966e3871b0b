"""Data augmentation on device, applied to each training batch inside the compiled training
chunk: random shifts alone (cheap), or a random geometric transform (rotation, scaling,
shifts, elastic distortion) followed by random changes of how the digit was written and
captured (stroke thickness, blur, a low-resolution round trip).

The second kind teaches the model what users' own images look like after preprocessing:
marker and pencil strokes, blurry photos, and tiny scans scaled up to MNIST's 20 px box."""

import jax
import jax.numpy as jnp

from digitjax.config import Config

ELASTIC_GRID = 4  # control points per side of the displacement field: a smooth, local warp
LOW_RES = (6.0, 16.0)  # pixels across the digit's 20 px box before it was scaled up
GRAY_LEVELS = 16  # what cheap scanners and 4-bit images keep


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image by up to `max_shift` pixels in each direction, filling with 0."""
    size = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda image, offset: jax.lax.dynamic_slice(image, offset, size))(
        padded, offsets
    )


def _uniform(key: jax.Array, shape: tuple[int, ...], limit: float) -> jax.Array:
    return limit * jax.random.uniform(key, shape, minval=-1, maxval=1)


def random_warp(
    key: jax.Array,
    images: jax.Array,
    max_shift: float,
    max_rotate: float,
    max_scale: float,
    max_elastic: float = 0.0,
) -> jax.Array:
    """Rotates each image by up to `max_rotate` degrees, scales it by up to `max_scale` and
    translates it by up to `max_shift` pixels, about its centre, then displaces each pixel by
    a smooth random field of up to `max_elastic` pixels (elastic distortion: the same digit
    written by another hand); one bilinear resampling, filling with 0."""
    count, height, width = images.shape
    angle_key, scale_key, shift_key = jax.random.split(key, 3)
    angle = jnp.deg2rad(_uniform(angle_key, (count, 1, 1), max_rotate))
    scale = 1 + _uniform(scale_key, (count, 1, 1), max_scale)
    shift = _uniform(shift_key, (2, count, 1, 1), max_shift)
    center_y, center_x = (height - 1) / 2, (width - 1) / 2
    out_y, out_x = jnp.meshgrid(
        jnp.arange(height) - center_y, jnp.arange(width) - center_x, indexing="ij"
    )
    # Each output pixel reads the input where the inverse transform takes it.
    y, x = out_y - shift[0], out_x - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source_y = (cos * y + sin * x) / scale + center_y
    source_x = (cos * x - sin * y) / scale + center_x
    if max_elastic:
        # Random displacements at a coarse grid of points, interpolated smoothly in between.
        grid = _uniform(
            jax.random.fold_in(key, 1), (count, ELASTIC_GRID, ELASTIC_GRID, 2), max_elastic
        )
        field = jax.image.resize(grid, (count, height, width, 2), "cubic")
        source_y, source_x = source_y + field[..., 0], source_x + field[..., 1]
    return jax.vmap(
        lambda image, sy, sx: jax.scipy.ndimage.map_coordinates(image, [sy, sx], order=1, cval=0)
    )(images, source_y, source_x)


def _neighbours(images: jax.Array) -> jax.Array:
    """The 3x3 neighbourhood of every pixel, stacked on a new first axis (0 outside)."""
    height, width = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)))
    return jnp.stack([padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)])


def random_thickness(key: jax.Array, images: jax.Array, max_change: float) -> jax.Array:
    """Thicker strokes (a marker) or thinner ones (a fine pen): each image moves by up to
    `max_change` of the way toward its 3x3 grey dilation or erosion."""
    amount = _uniform(key, (images.shape[0], 1, 1), max_change)
    neighbours = _neighbours(images)
    target = jnp.where(amount > 0, neighbours.max(0), neighbours.min(0))
    return images + jnp.abs(amount) * (target - images)


# Blurring and resampling act on rows and columns alike, so each is one (size, size) matrix per
# image, applied as `matrix @ image @ matrix.T`: small batched matmuls, fast on any backend.


def _separable(matrices: jax.Array, images: jax.Array) -> jax.Array:
    return matrices @ images @ matrices.transpose(0, 2, 1)


def _blur_matrices(sigma: jax.Array, size: int) -> jax.Array:
    """(N, size, size) Gaussian blurs, one `sigma` (N,) per image, zero outside the image."""
    offsets = jnp.arange(-(size - 1), size, dtype=sigma.dtype)
    kernel = jnp.exp(-(offsets**2) / (2 * jnp.maximum(sigma, 1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(-1, keepdims=True)
    positions = jnp.arange(size)
    return kernel[:, positions[None, :] - positions[:, None] + size - 1]


def _bilinear_rows(positions: jax.Array, size: int) -> jax.Array:
    """(N, size, size): row y reads the image at `positions[:, y]`, linearly between the two
    nearest pixels (0 outside)."""
    below = jnp.floor(positions)
    fraction = (positions - below)[..., None]
    below = below.astype(jnp.int32)
    return (1 - fraction) * jax.nn.one_hot(below, size) + fraction * jax.nn.one_hot(below + 1, size)


def random_blur(key: jax.Array, images: jax.Array, max_sigma: float) -> jax.Array:
    """An out-of-focus photo: a Gaussian blur of up to `max_sigma` pixels."""
    sigma = max_sigma * jax.random.uniform(key, images.shape[:1])
    return _separable(_blur_matrices(sigma, images.shape[1]), images)


def random_low_res(key: jax.Array, images: jax.Array, probability: float) -> jax.Array:
    """With `probability`, an image goes through what a tiny scan does on its way to
    preprocessing: its 20 px digit box at 6-16 px (each coarse pixel the average around its
    centre), 16 grey levels, then scaled back up bilinearly."""
    count, size, _ = images.shape
    chosen_key, size_key = jax.random.split(key)
    chosen = jax.random.uniform(chosen_key, (count, 1, 1)) < probability
    factor = 20 / jax.random.uniform(size_key, (count,), minval=LOW_RES[0], maxval=LOW_RES[1])
    center = (size - 1) / 2
    # Where each output pixel falls on the coarse grid, whose pixel centres lie at
    # (k + 0.5) * factor from the centre; it interpolates between the two nearest.
    cell = (jnp.arange(size) - center) / factor[:, None] - 0.5
    below = jnp.floor(cell)
    weight = (cell - below)[..., None]
    upscale = (1 - weight) * _bilinear_rows((below + 0.5) * factor[:, None] + center, size)
    upscale += weight * _bilinear_rows((below + 1.5) * factor[:, None] + center, size)
    # Averaging over a coarse pixel: about a Gaussian of a 2.5th of its width.
    round_trip = _separable(upscale @ _blur_matrices(factor / 2.5, size), images)
    levels = GRAY_LEVELS - 1
    round_trip = jnp.round(jnp.clip(round_trip, 0, 1) * levels) / levels
    return jnp.where(chosen, round_trip, images)


def is_random(config: Config) -> bool:
    """Whether `augment` changes anything, so draws random numbers, with these settings."""
    return any(
        (
            config.augment_shift,
            config.augment_rotate,
            config.augment_scale,
            config.augment_elastic,
            config.augment_thickness,
            config.augment_blur,
            config.augment_low_res,
        )
    )


def augment(key: jax.Array, images: jax.Array, config: Config) -> jax.Array:
    """One batch's augmentation, as `config` asks (`key` differs per batch). Settings that
    earlier versions had draw the same random numbers as they did."""
    if config.augment_rotate or config.augment_scale or config.augment_elastic:
        images = random_warp(
            key,
            images,
            config.augment_shift,
            config.augment_rotate,
            config.augment_scale,
            config.augment_elastic,
        )
    elif config.augment_shift:
        images = random_shift(key, images, config.augment_shift)
    thickness_key, blur_key, low_res_key = (jax.random.fold_in(key, 2 + i) for i in range(3))
    if config.augment_thickness:
        images = random_thickness(thickness_key, images, config.augment_thickness)
    if config.augment_blur:
        images = random_blur(blur_key, images, config.augment_blur)
    if config.augment_low_res:
        images = random_low_res(low_res_key, images, config.augment_low_res)
    return images

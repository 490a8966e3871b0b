"""MNIST training digits drawn into image files the way `non_digits` draws its marks (ink on
paper or a canvas, scanned or photographed), thicker or thinner, faint, cropped tight or
scanned tiny, then preprocessed like any user's image: digits as the non-digit detector
(`digitjax.detector`) meets them once they went through `predict`'s path.

Fitted against raw MNIST digits alone, the detector learns that the look preprocessing gives
(normalised, hard-edged strokes) is not a digit's, since every non-digit it sees has it; it
then flags users' digits for how they were written or scanned, not for what they show.
benchmarks/README.md ("Non-digit rejection") has the figures with and without them.

For the same reason the detector also sees digits printed exactly as `non_digits` prints
letters (`printed_set`): with printed letters alone on the non-digit side, a font's glyph
looks like a non-digit whatever it shows.

Deterministic: digit n of a set is drawn (or printed) by its own random generator, seeded by
DRAWING_SEED (PRINTING_SEED) and n.
"""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from digitjax.synthetic.cache import cached_images, numbered_blocks
from digitjax.synthetic.non_digits import as_seen, fonts, maybe_photo, paper_and_ink, printed

DRAWING_SEED, PRINTING_SEED = 2_000_003, 2_000_029
# Bump when the drawings change: the cached sets of older ones are then not used.
GENERATOR_VERSION = 1
TIGHT_CROP, FAINT, TINY_SCAN = 0.25, 0.25, 0.25  # the share of digits drawn so
TINY_SCAN_SIZE = (8, 20)  # pixels across MNIST's 28 px frame in a tiny scan, before enlarging


def draw(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An MNIST digit (28x28 uint8, white on black) as a user's image of it."""
    size = int(rng.integers(40, 400))
    ink = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    # Thicker strokes (a marker) or thinner ones, by up to about a stroke's width.
    change = rng.uniform(-1, 1)
    radius = min(8, round(abs(change) * size / 28 * 1.2))
    if radius:
        grow = ImageFilter.MaxFilter if change > 0 else ImageFilter.MinFilter
        ink = ink.filter(grow(2 * radius + 1))
    alpha = np.asarray(ink, np.float32) / 255
    # Margins of up to 60% of the frame on each side; or a tight crop, one to four sides
    # cutting up to 20% of the frame (MNIST's own margin is 14%), into the ink.
    sides = (rng.uniform(0, 0.6, 4) * size).astype(int)
    if rng.random() < TIGHT_CROP:
        cut = rng.choice(4, int(rng.integers(1, 5)), replace=False)
        sides[cut] = -(rng.uniform(0.1, 0.2, len(cut)) * size).astype(int)
    top, bottom, left, right = sides
    alpha = np.pad(alpha, ((max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))
    alpha = alpha[max(-top, 0) : alpha.shape[0] - max(-bottom, 0)]
    alpha = alpha[:, max(-left, 0) : alpha.shape[1] - max(-right, 0)]
    paper, ink_level = paper_and_ink(rng)
    if rng.random() < FAINT:  # pencil, a light pen
        ink_level = paper + (ink_level - paper) * rng.uniform(0.25, 0.6)
    gray = paper + (ink_level - paper) * alpha
    image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    if rng.random() < TINY_SCAN:
        scale = rng.uniform(*TINY_SCAN_SIZE) / size
        tiny = (max(2, round(image.width * scale)), max(2, round(image.height * scale)))
        image = image.resize(tiny, Image.Resampling.BOX)
        if rng.random() < 0.5:
            image = image.quantize(16).convert("RGB")
        enlarge = rng.uniform(4, 12)
        image = image.resize(
            (round(image.width * enlarge), round(image.height * enlarge)),
            (Image.Resampling.NEAREST, Image.Resampling.BILINEAR)[int(rng.integers(2))],
        )
    return maybe_photo(image, rng)


def preprocessed(digit: np.ndarray, number: int) -> np.ndarray | None:
    """Digit `number` of a set drawn, saved as PNG or JPEG and preprocessed (28x28 uint8;
    None where preprocessing finds no digit)."""
    rng = np.random.default_rng([DRAWING_SEED, number])
    suffix = (".png", ".jpg")[int(rng.integers(2))]
    return as_seen(draw(digit, rng), suffix, rng)


def _drawn_block(task: tuple[int, np.ndarray]) -> list[np.ndarray | None]:
    start, digits = task
    return [preprocessed(digit, start + n) for n, digit in enumerate(digits)]


def printed_digit(number: int, font_files: list[Path]) -> np.ndarray | None:
    """Printed digit `number` of a set (the digit number % 10), saved as PNG or JPEG and
    preprocessed (28x28 uint8; None where preprocessing finds no digit)."""
    rng = np.random.default_rng([PRINTING_SEED, number])
    suffix = (".png", ".jpg")[int(rng.integers(2))]
    return as_seen(printed(str(number % 10), rng, font_files, 40, 160), suffix, rng)


def _printed_block(numbers: range) -> list[np.ndarray | None]:
    font_files = fonts()
    return [printed_digit(number, font_files) for number in numbers]


def printed_set(count: int, cache_dir: Path | None = None) -> np.ndarray:
    """`count` printed digits, preprocessed, those in which no digit is found left out;
    made once on every core and cached on disk."""
    return cached_images(
        f"printed_digits-v{GENERATOR_VERSION}-{count}-{PRINTING_SEED}",
        _printed_block,
        numbered_blocks(count),
        "printed-digit",
        cache_dir,
    )


def training_set(digits: np.ndarray, cache_dir: Path | None = None) -> np.ndarray:
    """`digits` (uint8 (N, 28, 28) MNIST digits) drawn and preprocessed, those in which no
    digit is found left out; made once on every core and cached on disk, under a name that
    says which digits they are."""
    which = hashlib.sha256(np.ascontiguousarray(digits, np.uint8).tobytes()).hexdigest()[:16]
    return cached_images(
        f"drawn_digits-v{GENERATOR_VERSION}-{len(digits)}-{which}",
        _drawn_block,
        [(block.start, digits[block.start : block.stop]) for block in numbered_blocks(len(digits))],
        "drawn-digit",
        cache_dir,
    )

"""Generates images that hold no digit: what users might point `digitjax predict` at instead of
a digit (faces, photos of objects and scenes, text, letters, symbols, shapes, silhouettes,
scribbles, grids and textures, partial strokes, blank paper...). Drawn with pillow and numpy
alone, text in the DejaVu fonts matplotlib ships (the same files on every machine); nothing is
downloaded. Deterministic per seed: every image has its own random generator, seeded by the
seed, its kind and its number, so images do not depend on which others were made, or where.

The kinds are split in two. `TRAINING_KINDS` may be trained on (`training_set`, the images of
`Config.non_digit_fraction`, preprocessed like users' images and cached on disk);
`HELD_OUT_KINDS` never are, so that how often a model flags them estimates how it does on
non-digits nobody generated for it (`benchmarks/uncertain_rate.py`).

    python -m digitjax.synthetic.non_digits OUT_DIR --per-kind 100 --seed 0
"""

import argparse
import csv
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digitjax.inference.parallel import preprocess_one
from digitjax.synthetic.cache import cached_images, numbered_blocks
from digitjax.synthetic.user_digits import encode, matplotlib_dejavu

# Letters that are written like digits (O 0, l 1, S 5, Z 2, B 8, g 9...): a model that reads
# them as digits is right to be sure, so they are left out of the single letters and words.
DIGIT_LIKE_LETTERS = set("OoDIlijSsZzBbGgqT")
LETTERS = [c for c in string.ascii_letters if c not in DIGIT_LIKE_LETTERS]
# Greek and Cyrillic letters, without those shaped like digits (θ 0, δ 8, σ 6, З 3, Б 6, Ч 4...).
OTHER_LETTERS = "αβγεηκλμνξπρτφχψωΓΔΛΞΠΣΦΨΩЖФЯДЛИШЩЫЮЦГПЙКМНХжфядлишщыюкмнхцгпй"
SYMBOLS = "+=%&@#?!*€£¥©®~^<>←→↑↓↔⇒✓✗★☆♥♦♣♠☺☹☀☁☂☃♪♫∞√∑∫≠≈±÷×∆∇☎✈☯⚓⚡☘✂✉✎⌂♀♂☠☢☮⚙"
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven cats watch from the window "
    "pack my box with five dozen liquor jugs how vexingly quick daft zebras jump"
).split()


# --- Helpers -----------------------------------------------------------------------------


def _level(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high))


def paper_and_ink(rng: np.random.Generator) -> tuple[int, int]:
    """Gray levels of the background and the marks: mostly dark on light, sometimes a canvas."""
    paper, ink = _level(rng, 190, 256), _level(rng, 0, 70)
    return (paper, ink) if rng.random() < 0.75 else (ink, paper)


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _noise_photo(rgb: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Sensor noise and a slight blur, as in a phone photo."""
    rgb = rgb + rng.normal(0, rng.uniform(0.01, 0.04), rgb.shape)
    return _to_image(rgb).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))


def maybe_photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A drawing as scanned (unchanged) or photographed (tinted, unevenly lit, noisy)."""
    if rng.random() < 0.5:
        return image
    gray = np.asarray(image.convert("L"), np.float32) / 255
    height, width = gray.shape
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.85 + 0.15 * (np.cos(angle) * rows + np.sin(angle) * cols) * rng.uniform(-1, 1)
    tint = rng.uniform(0.8, 1.0, 3)
    return _noise_photo(gray[..., None] * tint * light[..., None], rng)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 3):
    """A natural-looking field in [0, 1]: random values on coarse grids, upsampled smoothly
    and summed, each finer grid weaker (clouds, terrain, mottled surfaces)."""
    field = np.zeros((height, width), np.float32)
    cells = int(rng.integers(2, 6))
    for octave in range(octaves):
        coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
        layer = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        field += np.asarray(layer, np.float32) / 255 / 2**octave
        cells *= 2
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _lit_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A wall, table or sky: a colour under a light gradient, mottled by smooth noise."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * rows + np.sin(angle) * cols) / max(height, width)
    light = 0.75 + 0.25 * gradient * rng.uniform(-1, 1)
    mottle = 1 + rng.uniform(0, 0.25) * (_smooth_noise(rng, height, width) - 0.5)
    return rng.uniform(0.15, 0.95, 3) * (light * mottle)[..., None]


def _font(
    fonts: list[Path], rng: np.random.Generator, low: int, high: int
) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), _level(rng, low, high))


def printed(
    characters: str, rng: np.random.Generator, fonts: list[Path], low: int, high: int
) -> Image.Image:
    """`characters` printed in a random font and size, off-centre, slightly turned (letters
    here; digits for the detector's digit side, `drawn_digits.printed_set`)."""
    font = _font(fonts, rng, low, high)
    left, top, right, bottom = font.getbbox(characters)
    pad_x, pad_y = _level(rng, 10, 200), _level(rng, 10, 200)
    paper, ink = paper_and_ink(rng)
    image = Image.new("L", (int(right - left) + pad_x, int(bottom - top) + pad_y), paper)
    position = (_level(rng, 0, pad_x + 1) - left, _level(rng, 0, pad_y + 1) - top)
    ImageDraw.Draw(image).text(position, characters, fill=ink, font=font)
    image = image.rotate(rng.uniform(-6, 6), Image.Resampling.BICUBIC, fillcolor=paper)
    return maybe_photo(image, rng)


def _polygon(kind: int, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """The corners of a triangle, square, pentagon, hexagon, star, diamond, cross or arrow in
    the box (x, y, w, h). No circles or ellipses: an empty ring is a 0."""
    if kind < 4:  # regular polygons of 3 to 6 sides
        angles = np.linspace(0, 2 * np.pi, kind + 4)[:-1] + np.pi / 2
        return [(x + w / 2 * (1 + np.cos(a)), y + h / 2 * (1 - np.sin(a))) for a in angles]
    if kind == 4:
        return [
            (x + w / 2 * (1 + r * np.sin(a)), y + h / 2 * (1 - r * np.cos(a)))
            for a, r in zip(np.linspace(0, 2 * np.pi, 11)[:-1], [1, 0.4] * 5)
        ]
    if kind == 5:
        return [(x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2)]
    if kind == 6:
        a, b = 0.35, 0.65
        corners = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b)]
        corners += [(0, b), (0, a), (a, a)]
    else:
        corners = [(0, 0.35), (0.6, 0.35), (0.6, 0.1), (1, 0.5), (0.6, 0.9), (0.6, 0.65)]
        corners += [(0, 0.65)]
    return [(x + u * w, y + v * h) for u, v in corners]


# --- The kinds ---------------------------------------------------------------------------


def face(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A head with shaded skin, hair, eyes, brows, a nose and a mouth on a lit background."""
    height, width = _level(rng, 240, 640), _level(rng, 240, 640)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = _lit_background(rng, height, width)
    cy, cx = height * rng.uniform(0.45, 0.6), width * rng.uniform(0.4, 0.6)
    ry, rx = height * rng.uniform(0.28, 0.4), width * rng.uniform(0.2, 0.3)
    inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
    skin = np.array([0.95, 0.78, 0.65]) * rng.uniform(0.45, 1.0)
    # Lit from one side: darker towards the other edge of the face.
    side = rng.choice([-1, 1])
    shade = np.clip(1 - 0.35 * (side * (cols - cx) / rx + 1) / 2, 0.5, 1)
    head = inside <= 1
    rgb[head] = (skin * shade[..., None])[head]
    hair_colour = rng.uniform(0.05, 0.5) * np.array([1.0, 0.8, 0.6])
    hair = (inside <= 1.25) & (rows < cy - ry * rng.uniform(0.35, 0.6))
    rgb[hair] = hair_colour
    image = _to_image(rgb)
    draw = ImageDraw.Draw(image)
    eye_y, eye_dx = cy - ry * 0.15, rx * rng.uniform(0.3, 0.45)
    eye_r = max(2.0, rx * rng.uniform(0.07, 0.12))
    for x in (cx - eye_dx, cx + eye_dx):
        draw.ellipse((x - 1.6 * eye_r, eye_y - eye_r, x + 1.6 * eye_r, eye_y + eye_r), "white")
        iris = tuple(int(v) for v in rng.integers(20, 120, 3))
        draw.ellipse((x - eye_r, eye_y - eye_r, x + eye_r, eye_y + eye_r), iris)
        brow = eye_y - 2.2 * eye_r
        draw.line(
            (x - 2 * eye_r, brow, x + 2 * eye_r, brow - eye_r * rng.uniform(-0.5, 0.5)),
            tuple(int(255 * v) for v in hair_colour),
            max(2, int(eye_r / 2)),
        )
    nose = [(cx, cy), (cx - rx * 0.1, cy + ry * 0.2), (cx + rx * 0.05, cy + ry * 0.22)]
    draw.line(nose, (120, 70, 60), max(1, int(rx / 40)))
    mouth_y, mouth_w = cy + ry * 0.5, rx * rng.uniform(0.3, 0.5)
    draw.arc(
        (cx - mouth_w, mouth_y - ry * 0.12, cx + mouth_w, mouth_y + ry * 0.12),
        10,
        170,
        (150, 40, 50),
        max(2, int(rx / 25)),
    )
    return _noise_photo(np.asarray(image, np.float32) / 255, rng)


def text(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A few lines of printed words, dark on light paper, sometimes photographed."""
    font = _font(fonts, rng, 14, 48)
    lines = [" ".join(rng.choice(WORDS, _level(rng, 1, 6))) for _ in range(rng.integers(1, 6))]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    box = probe.multiline_textbbox((0, 0), "\n".join(lines), font=font)
    pad = _level(rng, 10, 80)
    paper = _level(rng, 200, 256)
    image = Image.new("L", (int(box[2]) + 2 * pad, int(box[3]) + 2 * pad), paper)
    ImageDraw.Draw(image).multiline_text((pad, pad), "\n".join(lines), _level(rng, 0, 60), font)
    image = image.rotate(rng.uniform(-4, 4), Image.Resampling.BICUBIC, fillcolor=paper)
    return maybe_photo(image, rng)


def letter(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """One printed letter that is not shaped like a digit, as `user_digits.printed` draws
    digits."""
    return printed(LETTERS[int(rng.integers(len(LETTERS)))], rng, fonts, 40, 160)


def word(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """One short word, or a few letters, large: a label, a sign, initials."""
    if rng.random() < 0.5:
        characters = str(rng.choice([w for w in WORDS if len(w) <= 6]))
        characters = characters.upper() if rng.random() < 0.3 else characters
    else:
        characters = "".join(rng.choice(LETTERS, _level(rng, 2, 5)))
    return printed(characters, rng, fonts, 30, 120)


def other_letter(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A Greek or Cyrillic letter not shaped like a digit."""
    return printed(OTHER_LETTERS[int(rng.integers(len(OTHER_LETTERS)))], rng, fonts, 40, 160)


def symbol(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A printed symbol: punctuation, currency, arrows, maths, card suits, weather, music."""
    sans = [
        path for path in fonts if path.name.startswith("DejaVuSans-") or path.stem == "DejaVuSans"
    ]
    return printed(SYMBOLS[int(rng.integers(len(SYMBOLS)))], rng, sans, 40, 160)


def texture(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """Noise, stripes, a checkerboard, wood, fabric or a gradient, tinted."""
    size = _level(rng, 64, 512)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pattern = ("noise", "stripes", "checkerboard", "wood", "fabric", "gradient")[
        int(rng.integers(6))
    ]
    if pattern == "noise":
        gray = _smooth_noise(rng, size, size, octaves=int(rng.integers(1, 5)))
    elif pattern == "stripes":
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 30)
        gray = 0.5 + 0.5 * np.sin(
            2 * np.pi * frequency * (np.cos(angle) * cols + np.sin(angle) * rows)
        )
    elif pattern == "checkerboard":
        squares = int(rng.integers(2, 16))
        gray = ((np.floor(rows * squares) + np.floor(cols * squares)) % 2).astype(np.float32)
    elif pattern == "wood":
        cy, cx = rng.uniform(-1, 2, 2)
        radius = np.sqrt((rows - cy) ** 2 + 0.1 * (cols - cx) ** 2)
        grain = rng.normal(0, 0.02, (size, size)).cumsum(axis=1) / np.sqrt(size)
        gray = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(8, 30) * (radius + grain))
    elif pattern == "fabric":
        threads = rng.uniform(20, 60)
        warp, weft = np.sin(2 * np.pi * threads * cols), np.sin(2 * np.pi * threads * rows)
        over = (np.floor(rows * threads) + np.floor(cols * threads)) % 2
        gray = 0.5 + 0.25 * np.where(over > 0, warp, weft) + rng.normal(0, 0.05, (size, size))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        gray = np.cos(angle) * cols + np.sin(angle) * rows
        gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)
    low, high = rng.uniform(0, 0.4, 3), rng.uniform(0.6, 1, 3)
    return _noise_photo(low + (high - low) * np.clip(gray, 0, 1)[..., None], rng)


def grid(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """Regular patterns drawn or printed: graph paper, ruled lines, a checkerboard, stripes,
    a grid of dots, tiles."""
    height, width = _level(rng, 96, 512), _level(rng, 96, 512)
    paper, ink = paper_and_ink(rng)
    image = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    step = rng.uniform(8, max(height, width) / 5)  # several lines: one alone is a 1
    line = max(1, int(step * rng.uniform(0.03, 0.3)))
    pattern = int(rng.integers(5))
    ys, xs = (
        np.arange(rng.uniform(0, step), height, step),
        np.arange(rng.uniform(0, step), width, step),
    )
    if pattern == 0:  # graph paper
        for y in ys:
            draw.line((0, y, width, y), ink, line)
        for x in xs:
            draw.line((x, 0, x, height), ink, line)
    elif pattern == 1:  # ruled or striped, horizontal or vertical
        vertical = rng.random() < 0.5
        for position in xs if vertical else ys:
            box = (position, 0, position, height) if vertical else (0, position, width, position)
            draw.line(box, ink, line if rng.random() < 0.5 else max(1, int(step / 2)))
    elif pattern == 2:  # checkerboard
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step, y + step), ink)
    elif pattern == 3:  # dots
        radius = max(1.0, step * rng.uniform(0.08, 0.3))
        for y in ys:
            for x in xs:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), ink)
    else:  # tiles with grout
        for y in ys:
            for x in xs:
                draw.rectangle((x, y, x + step - line, y + step - line), outline=ink, width=line)
    image = image.rotate(rng.uniform(-20, 20), Image.Resampling.BICUBIC, fillcolor=paper)
    return maybe_photo(image, rng)


def _page(
    rng: np.random.Generator, low: int, high: int
) -> tuple[int, int, int, Image.Image, ImageDraw.ImageDraw]:
    """A square grey page of a random size in [low, high), its paper and ink levels, and a pen."""
    size = _level(rng, low, high)
    paper, ink = paper_and_ink(rng)
    image = Image.new("L", (size, size), paper)
    return size, paper, ink, image, ImageDraw.Draw(image)


def scribble(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """Random pen scribbles: wandering lines, on paper or a canvas."""
    size, paper, ink, image, draw = _page(rng, 100, 500)
    width = max(1, int(size * rng.uniform(0.01, 0.04)))
    for _ in range(rng.integers(1, 4)):
        steps = rng.normal(0, size * 0.08, (_level(rng, 15, 60), 2)).cumsum(axis=0)
        points = np.clip(steps + rng.uniform(0.2, 0.8, 2) * size, 0, size - 1)
        draw.line([tuple(p) for p in points], ink, width, joint="curve")
    return maybe_photo(image, rng)


def cursive(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A line of handwriting-like loops and waves, as a signature or a scrawled word."""
    width, height = _level(rng, 200, 600), _level(rng, 80, 300)
    paper, ink = paper_and_ink(rng)
    image = Image.new("L", (width, height), paper)
    t = np.linspace(0, 1, 400)
    loops = rng.uniform(3, 10)
    x = width * (0.1 + 0.8 * t) + rng.uniform(3, 12) * np.sin(2 * np.pi * loops * t)
    y = height * (0.5 + rng.uniform(0.1, 0.3) * np.cos(2 * np.pi * loops * t + rng.uniform(0, 6)))
    y += np.cumsum(rng.normal(0, 0.6, t.shape))
    pen = max(1, int(height * rng.uniform(0.01, 0.05)))
    ImageDraw.Draw(image).line(list(zip(x, y)), ink, pen, joint="curve")
    return maybe_photo(image, rng)


def hatching(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """Pen hatching, cross-hatching or zigzags filling part of the page, as in a sketch."""
    size, paper, ink, image, draw = _page(rng, 120, 500)
    left, top = rng.uniform(0, 0.4, 2) * size
    span = rng.uniform(0.4, 0.95) * size - max(left, top) * 0.5
    pen = max(1, int(size * rng.uniform(0.005, 0.02)))
    gap = rng.uniform(0.03, 0.12) * span
    if rng.random() < 0.3:  # one zigzag line
        ys = np.arange(top, top + span, gap)
        points = [(left + (i % 2) * span, y) for i, y in enumerate(ys)]
        draw.line(points, ink, pen, joint="curve")
    else:
        for angle in rng.uniform(0, np.pi, 1 if rng.random() < 0.5 else 2):
            direction = np.array([np.cos(angle), np.sin(angle)])
            normal = np.array([-direction[1], direction[0]])
            centre = np.array([left, top]) + span / 2
            for offset in np.arange(-span / 2, span / 2, gap):
                wobble = rng.normal(0, gap * 0.1, 2)
                start = centre + normal * offset - direction * span / 2 + wobble
                end = centre + normal * offset + direction * span / 2 + wobble
                draw.line((*start, *end), ink, pen)
    return maybe_photo(image, rng)


def shape(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """One to four geometric shapes (polygons, stars, crosses, arrows), outlined or filled."""
    size, paper, ink, image, draw = _page(rng, 100, 500)
    width = max(1, int(size * rng.uniform(0.01, 0.05)))
    count = int(rng.integers(1, 5))
    for _ in range(count):
        w, h = rng.uniform(0.25, 0.9 if count == 1 else 0.5, 2) * size
        x, y = rng.uniform(0, 1, 2) * (size - np.array([w, h]))
        fill = ink if rng.random() < 0.4 else None
        draw.polygon(_polygon(int(rng.integers(8)), x, y, w, h), fill, ink, width)
    return maybe_photo(image, rng)


def smiley(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A drawn smiley or emoji: a round face with eyes and a smile, frown or open mouth."""
    size = _level(rng, 100, 500)
    paper, ink = paper_and_ink(rng)
    filled = rng.random() < 0.4  # a yellow emoji rather than a pen drawing
    image = Image.new("RGB", (size, size), (paper,) * 3)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.3, 0.48)
    cx, cy = rng.uniform(radius, size - radius, 2)
    pen = max(1, int(size * rng.uniform(0.01, 0.04)))
    face_fill = (
        tuple(int(v) for v in rng.uniform([200, 160, 0], [255, 220, 80])) if filled else None
    )
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), face_fill, (ink,) * 3, pen)
    eye = radius * rng.uniform(0.07, 0.15)
    for side in (-1, 1):
        x, y = cx + side * radius * 0.35, cy - radius * 0.25
        draw.ellipse((x - eye, y - eye * 1.4, x + eye, y + eye * 1.4), (ink,) * 3)
    mouth = radius * rng.uniform(0.35, 0.6)
    style = int(rng.integers(3))
    box = (cx - mouth, cy - mouth * 0.6, cx + mouth, cy + mouth)
    if style == 0:
        draw.arc(box, 20, 160, (ink,) * 3, pen)
    elif style == 1:
        draw.arc(
            (cx - mouth, cy + mouth * 0.3, cx + mouth, cy + mouth * 1.2), 200, 340, (ink,) * 3, pen
        )
    else:
        draw.chord(box, 0, 180, (ink,) * 3)
    return maybe_photo(image, rng)


def silhouette(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """An animal or object drawn from primitives: a cat, a house, a tree, a car, a person, a
    fish, a cup or a flower, filled or outlined, on paper or a lit background."""
    size = _level(rng, 120, 500)
    s = size / 10  # the drawings below are on a 10x10 grid
    if rng.random() < 0.5:
        paper, ink = paper_and_ink(rng)
        image, colour = Image.new("L", (size, size), paper), ink
    else:
        image = _to_image(_lit_background(rng, size, size))
        colour = tuple(int(v) for v in rng.integers(0, 120, 3))
        paper = image.getpixel((0, 0))
    draw = ImageDraw.Draw(image)
    fill = colour if rng.random() < 0.6 else None
    pen = max(1, int(size * 0.02))

    def box(*points: float) -> tuple[float, ...]:
        return tuple(p * s for p in points)

    thing = int(rng.integers(8))
    if thing == 0:  # cat
        draw.ellipse(box(2, 5, 8, 9), fill, colour, pen)
        draw.ellipse(box(5.5, 2.5, 8.5, 5.5), fill, colour, pen)
        draw.polygon([box(5.7, 3.2), box(6, 1.8), box(6.7, 2.7)], fill, colour, pen)
        draw.polygon([box(7.3, 2.7), box(8, 1.8), box(8.3, 3.2)], fill, colour, pen)
        draw.line([box(2.2, 7), box(1, 5.5), box(1.2, 4)], colour, pen * 2, joint="curve")
    elif thing == 1:  # house
        draw.rectangle(box(2, 5, 8, 9), fill, colour, pen)
        draw.polygon([box(1.5, 5), box(5, 2), box(8.5, 5)], fill, colour, pen)
        draw.rectangle(box(4.3, 6.5, 5.7, 9), paper if fill else None, colour, pen)
    elif thing == 2:  # tree
        draw.rectangle(box(4.4, 6, 5.6, 9.5), fill, colour, pen)
        for top in (1, 2.7, 4.2):
            draw.polygon([box(5, top), box(2, top + 3), box(8, top + 3)], fill, colour, pen)
    elif thing == 3:  # car
        draw.rectangle(box(1, 5, 9, 7.5), fill, colour, pen)
        draw.polygon([box(2.5, 5), box(3.5, 3.2), box(6.5, 3.2), box(7.5, 5)], fill, colour, pen)
        for x in (2.8, 7.2):
            draw.ellipse(box(x - 1, 6.6, x + 1, 8.6), colour)
    elif thing == 4:  # person
        draw.ellipse(box(4, 0.8, 6, 2.8), fill, colour, pen)
        draw.line([box(5, 2.8), box(5, 6.5)], colour, pen * 2)
        draw.line([box(2.8, 4.5), box(5, 3.5), box(7.2, 4.5)], colour, pen * 2)
        draw.line([box(3.5, 9.3), box(5, 6.5), box(6.5, 9.3)], colour, pen * 2)
    elif thing == 5:  # fish
        draw.ellipse(box(1.5, 3.5, 7, 6.5), fill, colour, pen)
        draw.polygon([box(6.5, 5), box(9, 3.3), box(9, 6.7)], fill, colour, pen)
    elif thing == 6:  # cup
        draw.polygon([box(2.5, 3), box(7, 3), box(6.5, 8.5), box(3, 8.5)], fill, colour, pen)
        draw.arc(box(5.8, 4, 8.6, 7), 270, 90, colour, pen * 2)
    else:  # flower
        draw.line([box(5, 5), box(5, 9.5)], colour, pen * 2)
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(5, 9)), endpoint=False):
            x, y = 5 + 1.6 * np.cos(angle), 3.5 + 1.6 * np.sin(angle)
            draw.ellipse(box(x - 1, y - 1, x + 1, y + 1), fill, colour, pen)
    image = image.rotate(
        rng.uniform(-15, 15), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )
    return maybe_photo(image, rng)


def object_photo(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A photo of a few plain objects on a table: shaded balls, boxes and cans, with soft
    shadows, on a lit background."""
    height, width = _level(rng, 160, 640), _level(rng, 160, 640)
    rgb = _lit_background(rng, height, width)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    light = rng.normal(0, 1, 2)
    light /= np.linalg.norm(light)
    for _ in range(rng.integers(1, 4)):
        colour = rng.uniform(0.05, 1, 3)
        r = min(height, width) * rng.uniform(0.12, 0.35)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        dy, dx = (rows - cy) / r, (cols - cx) / r
        shadow = np.exp(-(((dy - 0.9) / 0.35) ** 2 + ((dx - 0.3) / 1.1) ** 2))
        rgb *= 1 - 0.5 * shadow[..., None]
        if rng.random() < 0.5:  # a ball, lit from one side
            inside = dy**2 + dx**2 <= 1
            z = np.sqrt(np.clip(1 - dy**2 - dx**2, 0, 1))
            shade = np.clip(0.25 + 0.75 * (-light[0] * dy - light[1] * dx + z) / 1.6, 0.1, 1)
        else:  # a box or a can: flat faces, one lit, one in shade
            aspect = rng.uniform(0.5, 1.6)
            inside = (np.abs(dy) <= aspect) & (np.abs(dx) <= 1)
            shade = np.where(dx * light[1] < 0, 0.95, 0.55) - 0.1 * dy
        rgb[inside] = (colour * shade[..., None])[inside]
    return _noise_photo(rgb, rng)


def scene(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A landscape photo: a sky with clouds, hills or sea from a smooth noise field, a sun."""
    height, width = _level(rng, 160, 640), _level(rng, 200, 800)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    sky_top, sky_low = rng.uniform([0.1, 0.3, 0.6], [0.4, 0.6, 1.0]), rng.uniform(0.6, 1.0, 3)
    t = (rows / height)[..., None]
    rgb = sky_top * (1 - t) + sky_low * t
    clouds = _smooth_noise(rng, height, width, octaves=4)
    rgb += rng.uniform(0, 0.5) * np.clip(clouds - 0.5, 0, 1)[..., None]
    if rng.random() < 0.4:
        sun = rng.uniform([0, 0], [0.4 * height, width])
        glow = np.exp(-((rows - sun[0]) ** 2 + (cols - sun[1]) ** 2) / (0.05 * height) ** 2)
        rgb += glow[..., None] * np.array([1.0, 0.9, 0.6])
    horizon = height * rng.uniform(0.35, 0.75)
    for layer in range(int(rng.integers(1, 4))):
        ridge = _smooth_noise(rng, 1, width, octaves=3)[0]
        top = horizon + layer * height * 0.1 - ridge * height * rng.uniform(0.05, 0.35)
        ground = rng.uniform(0.05, 0.5, 3) * (1 - 0.2 * layer)
        texture = 0.8 + 0.4 * _smooth_noise(rng, height, width, octaves=4)
        below = rows >= top[None, :]
        rgb[below] = (ground * texture[..., None])[below]
    return _noise_photo(rgb, rng)


def clutter(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A cluttered desk or shelf: many overlapping coloured shapes, lines and blobs."""
    height, width = _level(rng, 160, 600), _level(rng, 160, 600)
    image = _to_image(_lit_background(rng, height, width))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(6, 30)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.35) * width, rng.uniform(0.05, 0.35) * height
        what = int(rng.integers(4))
        if what == 0:
            draw.rectangle((x, y, x + w, y + h), colour)
        elif what == 1:
            draw.ellipse((x, y, x + w, y + h), colour)
        elif what == 2:
            draw.line((x, y, x + w, y + h), colour, max(1, int(rng.uniform(1, 12))))
        else:
            draw.polygon(_polygon(int(rng.integers(8)), x, y, w, h), colour)
    return _noise_photo(np.asarray(image, np.float32) / 255, rng)


def barcode(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A barcode or a QR-like square of modules."""
    paper, ink = 255 - _level(rng, 0, 40), _level(rng, 0, 50)
    if rng.random() < 0.5:
        bars = rng.integers(1, 4, int(rng.integers(20, 60)))
        unit = int(rng.integers(2, 6))
        width = int(bars.sum()) * unit + 40
        height = int(width * rng.uniform(0.3, 0.7))
        image = Image.new("L", (width, height), paper)
        draw, x = ImageDraw.Draw(image), 20
        for i, bar in enumerate(bars):
            if i % 2 == 0:
                draw.rectangle((x, 20, x + bar * unit - 1, height - 20), ink)
            x += bar * unit
    else:
        modules, unit = int(rng.integers(15, 35)), int(rng.integers(3, 10))
        cells = rng.random((modules, modules)) < 0.5
        for y, x in ((0, 0), (0, modules - 7), (modules - 7, 0)):  # the three finder squares
            cells[y : y + 7, x : x + 7] = np.pad(np.ones((3, 3)), 2, constant_values=1)
            cells[y + 1 : y + 6, x + 1 : x + 6] &= np.pad(np.ones((3, 3), bool), 1)
        gray = np.where(np.kron(cells, np.ones((unit, unit))) > 0, ink, paper)
        image = Image.fromarray(np.pad(gray, 4 * unit, constant_values=paper).astype(np.uint8))
    image = image.rotate(
        rng.uniform(-10, 10), Image.Resampling.BICUBIC, expand=True, fillcolor=paper
    )
    return maybe_photo(image, rng)


def partial_stroke(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A single pen stroke that is no digit: an L, a lone arc, an angle, a horizontal line, a
    wave, or the slanted stroke and bar of a 4 without its stem. (No lone upright line, a 1,
    nor a bar with a stroke down from its end, a 7.)"""
    size, paper, ink, image, draw = _page(rng, 100, 400)
    pen = max(2, int(size * rng.uniform(0.03, 0.1)))
    a, b = rng.uniform(0.15, 0.35) * size, rng.uniform(0.65, 0.85) * size
    kind = int(rng.integers(6))
    if kind == 0:  # L
        points = [(a, a), (a, b), (b, b)]
    elif kind == 1:  # arc of at most half a turn: no 0, no 6
        start = rng.uniform(0, 360)
        draw.arc((a, a, b, b), start, start + rng.uniform(60, 180), ink, pen)
        points = []
    elif kind == 2:  # an angle, < or >
        points = [(b, a), (a, (a + b) / 2), (b, b)][:: 1 if rng.random() < 0.5 else -1]
        if rng.random() < 0.5:
            points = [(size - x, y) for x, y in points]
    elif kind == 3:  # a horizontal line
        y = rng.uniform(a, b)
        points = [(a, y), (b, y + rng.uniform(-0.1, 0.1) * size)]
    elif kind == 4:  # a wave
        xs = np.linspace(a, b, 40)
        ys = size / 2 + (b - a) * 0.2 * np.sin((xs - a) / (b - a) * 2 * np.pi * rng.uniform(1, 2))
        points = list(zip(xs, ys))
    else:  # the slanted stroke and bar of a 4
        points = [((a + b) / 2 + (b - a) * 0.2, a), (a, (a + 2 * b) / 3), (b, (a + 2 * b) / 3)]
    if points:
        jitter = rng.normal(0, size * 0.01, (len(points), 2))
        draw.line([tuple(p) for p in np.array(points) + jitter], ink, pen, joint="curve")
    image = image.rotate(rng.uniform(-20, 20), Image.Resampling.BICUBIC, fillcolor=paper)
    return maybe_photo(image, rng)


def blank_paper(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """Paper with nothing written on it: grain, dust specks, a shadow. Preprocessing finds no
    digit in most; the rest are the ones to refuse. (No fold: a lone line is a 1.)"""
    height, width = _level(rng, 200, 800), _level(rng, 200, 800)
    paper = rng.uniform(0.7, 1.0, 3)
    gray = 1 - rng.uniform(0.02, 0.12) * _smooth_noise(rng, height, width, octaves=4)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.5:  # a soft shadow from one edge
        gray *= 1 - rng.uniform(0.1, 0.4) * np.clip(
            1 - cols / (width * rng.uniform(0.1, 0.5)), 0, 1
        )
    for _ in range(rng.integers(0, 30)):  # dust and specks
        y, x = rng.integers(0, height), rng.integers(0, width)
        r = rng.uniform(0.5, 4)
        gray -= rng.uniform(0.2, 0.8) * np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / r**2)
    return _noise_photo(gray[..., None] * paper, rng)


DRAW = {
    "face": face,
    "text": text,
    "letter": letter,
    "word": word,
    "other_letter": other_letter,
    "symbol": symbol,
    "texture": texture,
    "grid": grid,
    "scribble": scribble,
    "cursive": cursive,
    "hatching": hatching,
    "shape": shape,
    "smiley": smiley,
    "silhouette": silhouette,
    "object_photo": object_photo,
    "scene": scene,
    "clutter": clutter,
    "barcode": barcode,
    "partial_stroke": partial_stroke,
    "blank_paper": blank_paper,
}
KINDS = tuple(DRAW)
# Kinds never trained on: how often a model flags them estimates how it does on non-digits
# nobody generated for it. Each has no close twin among the training kinds (the nearest:
# text ~ word, face ~ smiley, texture ~ grid), and between them they span photos (face,
# scene), print (text, symbol), drawings (silhouette) and patterns (texture).
HELD_OUT_KINDS = ("face", "text", "symbol", "texture", "silhouette", "scene")
TRAINING_KINDS = tuple(kind for kind in KINDS if kind not in HELD_OUT_KINDS)
# Files of each kind in the formats users have (photos as JPEG).
SUFFIXES = {kind: (".png", ".jpg") for kind in KINDS} | {
    kind: (".jpg",) for kind in ("face", "object_photo", "scene", "clutter", "texture")
}


def fonts() -> list[Path]:
    """The DejaVu fonts matplotlib ships: the same files on every machine."""
    return matplotlib_dejavu()


def draw(kind: str, seed: int, number: int, font_files: list[Path]) -> Image.Image:
    """Image `number` of `kind` for `seed`, made by its own random generator."""
    return DRAW[kind](np.random.default_rng([seed, KINDS.index(kind), number]), font_files)


def generate(
    out_dir: Path, per_kind: int, seed: int = 0, kinds: tuple[str, ...] = KINDS
) -> list[tuple[Path, str]]:
    """Writes `per_kind` image files of each of `kinds`; returns (path, kind) for each."""
    font_files = fonts()
    samples = []
    for kind in kinds:
        folder = Path(out_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_kind):
            image = draw(kind, seed, n, font_files)
            suffix = SUFFIXES[kind][n % len(SUFFIXES[kind])]
            path = folder / f"{kind}_{n:04d}{suffix}"
            path.write_bytes(encode(image, suffix, np.random.default_rng([seed, n])))
            samples.append((path, kind))
    return samples


# The seed of the images trained on. The benchmarks' seeds are small numbers, so they
# measure images no model was trained on, of the training kinds too.
TRAINING_SEED = 1_000_003
# Bump when the drawings change: the cached training sets of older ones are then not used.
GENERATOR_VERSION = 1
# Ink narrower than this many columns of the 28 (a 20 px high digit box) is an upright bar.
ONE_WIDTH = 8


def preprocessed(kind: str, seed: int, number: int, font_files: list[Path]) -> np.ndarray | None:
    """Image `number` of `kind` as the model sees it when a user gives it: encoded to the
    kind's file format and preprocessed like any user image (28x28 uint8; None when
    preprocessing finds no digit in it, which `predict` reports as such)."""
    suffixes = SUFFIXES[kind]
    suffix = suffixes[number % len(suffixes)]
    rng = np.random.default_rng([seed, number])
    return as_seen(draw(kind, seed, number, font_files), suffix, rng)


def as_seen(image: Image.Image, suffix: str, rng: np.random.Generator) -> np.ndarray | None:
    """`image` saved as a `suffix` file and preprocessed like any user image, as the model
    sees it: 28x28 uint8, or None where preprocessing finds no digit."""
    digit, _ = preprocess_one(encode(image, suffix, rng))
    return None if digit is None else np.round(digit * 255).astype(np.uint8)


def looks_like_a_one(digit: np.ndarray) -> bool:
    """Whether preprocessing made a lone upright bar of the image (a grid's stripe, a shadow's
    edge): that is a 1 to the model, whatever it came from, so it is not trained as a
    non-digit."""
    columns = np.flatnonzero((digit > 127).any(axis=0))
    return len(columns) > 0 and columns[-1] - columns[0] < ONE_WIDTH


def _training_block(numbers: range) -> list[np.ndarray | None]:
    """`training_set`'s images `numbers`, in one worker: image n is the n // len(kinds)-th of
    TRAINING_KINDS[n % len(kinds)], so every kind has the same share."""
    font_files = fonts()
    kinds = TRAINING_KINDS
    images = [preprocessed(kinds[n % len(kinds)], TRAINING_SEED, n // len(kinds), font_files)
              for n in numbers]  # fmt: skip
    return [image if image is None or not looks_like_a_one(image) else None for image in images]


def training_set(count: int, cache_dir: Path | None = None) -> np.ndarray:
    """`count` images of TRAINING_KINDS, preprocessed (uint8, (N, 28, 28), N <= count: those
    with no digit found, or that look like a 1, are left out), made once on every core and
    cached on disk beside the decoded datasets (`cache.cached_images`)."""
    return cached_images(
        f"non_digits-v{GENERATOR_VERSION}-{count}-{TRAINING_SEED}",
        _training_block,
        numbered_blocks(count),
        "non-digit",
        cache_dir,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = generate(args.out_dir, args.per_kind, args.seed)
    with (args.out_dir / "kinds.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "kind"])
        writer.writerows((str(path), kind) for path, kind in samples)
    print(f"wrote {len(samples)} images to {args.out_dir}")


if __name__ == "__main__":
    main()

"""Generates images that hold no digit, to see how `digitjax predict` answers them: face-like
photos, printed text, single letters, textures, and scribbles and shapes. Drawn with pillow
and numpy alone (text in the machine's fonts, as `user_digits.py` finds them); nothing is
downloaded. Deterministic per seed and font set.

    python -m digitjax.synthetic.non_digits OUT_DIR --per-kind 100 --seed 0
"""

import argparse
import csv
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digitjax.synthetic.user_digits import digit_fonts, encode

KINDS = ("face", "text", "letter", "texture", "scribble")
# Letters that are written like digits (O 0, l 1, S 5, Z 2, B 8, g 9...): a model that reads
# them as digits is right to be sure, so they are left out of the single letters.
DIGIT_LIKE_LETTERS = set("OoDIlijSsZzBbGgqT")
LETTERS = [c for c in string.ascii_letters if c not in DIGIT_LIKE_LETTERS]
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven cats watch from the window "
    "pack my box with five dozen liquor jugs how vexingly quick daft zebras jump"
).split()


def _noise_photo(rgb: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Sensor noise and a slight blur, as in a phone photo."""
    rgb = rgb + rng.normal(0, rng.uniform(0.01, 0.04), rgb.shape)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))


def face(rng: np.random.Generator) -> Image.Image:
    """A head with shaded skin, hair, eyes, brows, a nose and a mouth on a lit background."""
    height, width = int(rng.integers(240, 640)), int(rng.integers(240, 640))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    background = rng.uniform(0.2, 0.9, 3)
    light = 0.8 + 0.2 * cols / width if rng.random() < 0.5 else 0.8 + 0.2 * rows / height
    rgb = background * light[..., None]
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
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
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


def latin_fonts() -> list[Path]:
    """The fonts among `digit_fonts()` that draw Latin letters (many scripts' fonts draw only
    an empty box for them)."""

    def drawn(font: ImageFont.FreeTypeFont, characters: str) -> bytes:
        return bytes(font.getmask(characters))

    fonts = []
    for path in digit_fonts():
        font = ImageFont.truetype(str(path), 24)
        if drawn(font, "ab") != drawn(font, "\U0010fffd\U0010fffd"):
            fonts.append(path)
    return fonts


def _font(fonts: list[Path], rng: np.random.Generator, low: int, high: int) -> ImageFont:
    return ImageFont.truetype(
        str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(low, high))
    )


def text(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A few lines of printed words, dark on light paper, sometimes photographed."""
    font = _font(fonts, rng, 14, 48)
    lines = [
        " ".join(rng.choice(WORDS, int(rng.integers(1, 6)))) for _ in range(rng.integers(1, 6))
    ]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    box = probe.multiline_textbbox((0, 0), "\n".join(lines), font=font)
    pad = int(rng.integers(10, 80))
    image = Image.new("L", (box[2] + 2 * pad, box[3] + 2 * pad), int(rng.integers(200, 256)))
    ImageDraw.Draw(image).multiline_text(
        (pad, pad), "\n".join(lines), int(rng.integers(0, 60)), font=font
    )
    image = image.rotate(
        rng.uniform(-4, 4), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )
    if rng.random() < 0.5:
        return _noise_photo(np.asarray(image.convert("RGB"), np.float32) / 255, rng)
    return image


def letter(rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """One printed letter that is not shaped like a digit, as `user_digits.printed` draws digits."""
    character = LETTERS[int(rng.integers(len(LETTERS)))]
    font = _font(fonts, rng, 40, 160)
    left, top, right, bottom = font.getbbox(character)
    pad_x, pad_y = int(rng.integers(10, 200)), int(rng.integers(10, 200))
    image = Image.new(
        "L", (right - left + pad_x, bottom - top + pad_y), int(rng.integers(200, 256))
    )
    position = (int(rng.integers(0, pad_x + 1)) - left, int(rng.integers(0, pad_y + 1)) - top)
    ImageDraw.Draw(image).text(position, character, fill=int(rng.integers(0, 60)), font=font)
    return image.rotate(
        rng.uniform(-5, 5), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )


def texture(rng: np.random.Generator) -> Image.Image:
    """Noise, stripes, a checkerboard, wood, fabric or a gradient, tinted."""
    size = int(rng.integers(64, 512))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pattern = ("noise", "stripes", "checkerboard", "wood", "fabric", "gradient")[
        int(rng.integers(6))
    ]
    if pattern == "noise":
        coarse = rng.random((int(rng.integers(4, 64)),) * 2)
        gray = (
            np.asarray(
                Image.fromarray((coarse * 255).astype(np.uint8)).resize(
                    (size, size), Image.Resampling.BICUBIC
                ),
                np.float32,
            )
            / 255
        )
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
    rgb = low + (high - low) * np.clip(gray, 0, 1)[..., None]
    return _noise_photo(rgb, rng)


def scribble(rng: np.random.Generator) -> Image.Image:
    """Random pen scribbles, or several outlined and filled shapes, on paper or a canvas."""
    size = int(rng.integers(100, 500))
    dark_on_light = rng.random() < 0.5
    paper, ink = (int(rng.integers(200, 256)), int(rng.integers(0, 60)))[
        :: 1 if dark_on_light else -1
    ]
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    width = max(1, int(size * rng.uniform(0.01, 0.04)))
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 4)):
            steps = rng.normal(0, size * 0.08, (int(rng.integers(15, 60)), 2)).cumsum(axis=0)
            points = np.clip(steps + rng.uniform(0.2, 0.8, 2) * size, 0, size - 1)
            draw.line([tuple(p) for p in points], ink, width, joint="curve")
    else:
        for _ in range(rng.integers(2, 7)):
            x, y = rng.uniform(0, 0.8, 2) * size
            w, h = rng.uniform(0.1, 0.4, 2) * size
            fill = ink if rng.random() < 0.3 else None
            shape = int(rng.integers(3))
            if shape == 0:
                draw.rectangle((x, y, x + w, y + h), fill, ink, width)
            elif shape == 1:
                draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill, ink, width)
            else:
                star = [
                    (x + w / 2 + r * w / 2 * np.sin(a), y + h / 2 - r * h / 2 * np.cos(a))
                    for a, r in zip(np.linspace(0, 2 * np.pi, 11)[:-1], [1, 0.4] * 5)
                ]
                draw.polygon(star, fill, ink, width)
    return image


def generate(out_dir: Path, per_kind: int, seed: int = 0) -> list[tuple[Path, str]]:
    """Writes `per_kind` images of every kind; returns (path, kind) for each."""
    rng = np.random.default_rng(seed)
    fonts = latin_fonts()
    samples = []
    for kind in KINDS:
        folder = Path(out_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_kind):
            if kind == "face":
                image, suffix = face(rng), ".jpg"
            elif kind == "text":
                image, suffix = text(rng, fonts), (".png", ".jpg")[n % 2]
            elif kind == "letter":
                image, suffix = letter(rng, fonts), (".png", ".jpg", ".webp")[n % 3]
            elif kind == "texture":
                image, suffix = texture(rng), (".jpg", ".png")[n % 2]
            else:
                image, suffix = scribble(rng), ".png"
            path = folder / f"{kind}_{n:04d}{suffix}"
            path.write_bytes(encode(image, suffix, rng))
            samples.append((path, kind))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

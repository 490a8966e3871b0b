"""Generates images that look like what users feed `digitjax predict`, with known labels.

Handwritten kinds come from the MNIST *test* digits shipped in the package (the bundled model
never saw them); the printed kind renders digits with the fonts installed on the machine, or
with the DejaVu fonts matplotlib ships where none are. Deterministic per seed and font set.

    python benchmarks/user_digits.py OUT_DIR --per-kind 200 --seed 0
"""

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digitjax.data import EMBEDDED_MNIST, read_idx_split

FONT_DIR = Path("/usr/share/fonts")
KINDS = ("paper_photo", "canvas", "scan_small", "printed")


def pen_strokes(digit: np.ndarray, size: int) -> np.ndarray:
    """An MNIST digit upscaled smoothly, so strokes look drawn rather than pixelated."""
    image = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    image = image.filter(ImageFilter.GaussianBlur(size / 100))
    return np.asarray(image, np.float32) / 255


def paper_photo(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Dark pen on tinted, unevenly lit paper; large, off-centre, slightly rotated, JPEG'd."""
    height, width = int(rng.integers(300, 800)), int(rng.integers(300, 800))
    size = int(min(height, width) * rng.uniform(0.45, 0.8))
    ink = Image.fromarray((pen_strokes(digit, size) * 255).astype(np.uint8))
    ink = np.asarray(ink.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC), np.float32) / 255
    mask = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    mask[top : top + size, left : left + size] = ink
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.85 + 0.15 * (np.cos(angle) * rows + np.sin(angle) * cols) * rng.uniform(-1, 1)
    paper = np.array([0.96, 0.94, 0.88]) * rng.uniform(0.85, 1.0, 3)
    pen = np.array([0.1, 0.12, 0.35]) if rng.random() < 0.5 else np.array([0.12, 0.1, 0.1])
    rgb = (paper * (1 - mask[..., None]) + pen * mask[..., None]) * light[..., None]
    rgb += rng.normal(0, 0.02, rgb.shape)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))


def canvas(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Thick white strokes on a 280x280 black canvas, not centred; sometimes RGBA with a
    transparent background, as canvas exports are."""
    size = int(280 * rng.uniform(0.4, 0.7))
    strokes = Image.fromarray((pen_strokes(digit, size) * 255).astype(np.uint8))
    strokes = strokes.filter(ImageFilter.MaxFilter(3))  # brush thicker than MNIST's pen
    board = Image.new("L", (280, 280), 0)
    board.paste(strokes, (int(rng.integers(0, 281 - size)), int(rng.integers(0, 281 - size))))
    if rng.random() < 0.3:
        rgba = Image.new("RGBA", board.size, (255, 255, 255, 0))
        rgba.putalpha(board)
        return rgba
    return board.convert("RGB")


def scan_small(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A tiny low-resolution scan: dark on light grey, noisy."""
    size = int(rng.integers(20, 41))
    ink = pen_strokes(digit, 112)
    paper = rng.uniform(0.75, 0.95)
    gray = paper - ink * rng.uniform(0.5, 0.7)
    image = Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8))
    small = np.asarray(image.resize((size, size), Image.Resampling.BOX), np.float32) / 255
    small += rng.normal(0, 0.02, small.shape)
    return Image.fromarray((np.clip(small, 0, 1) * 255).astype(np.uint8))


def digit_fonts() -> list[Path]:
    """The machine's TrueType fonts; a fresh machine may have none, so matplotlib's are next."""
    installed = sorted(p for p in FONT_DIR.rglob("*.ttf") if "Symbol" not in p.name)
    if installed:
        return installed
    import matplotlib

    shipped = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in shipped.glob("DejaVu*.ttf") if "Display" not in p.name)  # no digits


def printed(label: int, rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A printed digit in a random font, dark on light, off-centre, slightly turned."""
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(40, 160)))
    left, top, right, bottom = font.getbbox(str(label))
    width, height = right - left, bottom - top
    pad_x, pad_y = int(rng.integers(10, 200)), int(rng.integers(10, 200))
    image = Image.new("L", (width + pad_x, height + pad_y), int(rng.integers(200, 256)))
    position = (int(rng.integers(0, pad_x + 1)) - left, int(rng.integers(0, pad_y + 1)) - top)
    ImageDraw.Draw(image).text(position, str(label), fill=int(rng.integers(0, 60)), font=font)
    return image.rotate(
        rng.uniform(-5, 5), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )


def save(image: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """Saves in the formats users have: JPEG for photos, else PNG, BMP or WebP."""
    if path.suffix == ".jpg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(60, 85)))
        path.write_bytes(buffer.getvalue())
    else:
        image.save(path)
    return path


def generate(
    out_dir: Path, per_kind: int, seed: int = 0, mnist_dir: Path = EMBEDDED_MNIST
) -> list[tuple[Path, int, str]]:
    """Writes `per_kind` images of every kind; returns (path, label, kind) for each."""
    rng = np.random.default_rng(seed)
    images, labels = read_idx_split(mnist_dir, "test")
    fonts = digit_fonts()
    samples = []
    for kind in KINDS:
        folder = Path(out_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(rng.choice(len(images), per_kind, replace=False)):
            label = int(labels[index]) if kind != "printed" else int(rng.integers(10))
            if kind == "paper_photo":
                image, suffix = paper_photo(images[index], rng), ".jpg"
            elif kind == "canvas":
                image, suffix = canvas(images[index], rng), ".png"
            elif kind == "scan_small":
                image, suffix = scan_small(images[index], rng), (".png", ".bmp")[n % 2]
            else:
                image, suffix = printed(label, rng, fonts), (".png", ".jpg", ".webp")[n % 3]
            path = save(image, folder / f"{kind}_{n:04d}_label{label}{suffix}", rng)
            samples.append((path, label, kind))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist-dir", type=Path, default=EMBEDDED_MNIST)
    args = parser.parse_args()
    samples = generate(args.out_dir, args.per_kind, args.seed, args.mnist_dir)
    with (args.out_dir / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "kind"])
        writer.writerows((str(path), label, kind) for path, label, kind in samples)
    print(f"wrote {len(samples)} images to {args.out_dir}")


if __name__ == "__main__":
    main()

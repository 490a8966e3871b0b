"""Generates images that look like what users feed `digitjax predict`, with known labels.

Handwritten kinds come from the MNIST *test* digits shipped in the package (the bundled model
never saw them); printed kinds render random digits with fonts. `printed` uses the DejaVu fonts
(installed, else the ones matplotlib ships), as when its figures were first measured;
`printed_fonts` uses every other Latin font installed, which on Debian/Ubuntu come from

    apt-get install fonts-liberation fonts-freefont-ttf fonts-urw-base35 fonts-noto-core

(without them it falls back to DejaVu). Deterministic per seed and font set: the fonts used are
listed in OUT_DIR/fonts.txt and each `printed_fonts` file name ends with its font. The first
four kinds draw from the random generator first, so their images are the same as before the
later kinds were added.

    python -m digitjax.synthetic.user_digits OUT_DIR --per-kind 200 --seed 0
"""

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digitjax.data import EMBEDDED_MNIST, read_idx_split

FONT_DIR = Path("/usr/share/fonts")
KINDS = (
    "paper_photo",
    "canvas",
    "scan_small",
    "printed",
    "scan_lowres",
    "printed_fonts",
    "marker",
    "pencil",
    "small_in_large",
    "border",
    "on_desk",
)
PRINTED = {"printed", "printed_fonts"}  # random labels; the others' are their MNIST digit's


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
    """The DejaVu fonts: installed, else the ones matplotlib ships."""
    return sorted(FONT_DIR.rglob("DejaVu*.ttf")) or matplotlib_dejavu()


def matplotlib_dejavu() -> list[Path]:
    """The DejaVu fonts matplotlib ships: the same files on every machine."""
    import matplotlib

    shipped = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in shipped.glob("DejaVu*.ttf") if "Display" not in p.name)  # no digits


def more_fonts() -> list[Path]:
    """Every installed Latin text font other than DejaVu (serif, mono, narrow, bold, light,
    italic...): symbol and dingbat fonts, and Noto's fonts for other scripts, are left out."""
    fonts = [p for p in FONT_DIR.rglob("*") if p.suffix in (".ttf", ".otf")]
    fonts = [
        p
        for p in fonts
        if not p.name.startswith(("DejaVu", "D050000L", "StandardSymbols"))
        and (not p.name.startswith("Noto") or p.name.startswith(("NotoSans-", "NotoSerif-")))
    ]
    return sorted(fonts, key=lambda p: p.name) or digit_fonts()


def printed(label: int, rng: np.random.Generator, fonts: list[Path]) -> Image.Image:
    """A printed digit in a random font, dark on light, off-centre, slightly turned."""
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(40, 160)))
    left, top, right, bottom = font.getbbox(str(label))
    width, height = right - left, bottom - top
    pad_x, pad_y = int(rng.integers(10, 200)), int(rng.integers(10, 200))
    image = Image.new("L", (int(width) + pad_x, int(height) + pad_y), int(rng.integers(200, 256)))
    position = (int(rng.integers(0, pad_x + 1)) - left, int(rng.integers(0, pad_y + 1)) - top)
    ImageDraw.Draw(image).text(position, str(label), fill=int(rng.integers(0, 60)), font=font)
    return image.rotate(
        rng.uniform(-5, 5), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )


def paper(
    height: int, width: int, rng: np.random.Generator, grain: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Tinted paper under uneven light, as (RGB paper colour per pixel, light per pixel);
    `grain` adds a texture coarser than sensor noise (pencil paper, recycled paper)."""
    rows = np.linspace(0, height / max(height, width), height, dtype=np.float32)[:, None]
    cols = np.linspace(0, width / max(height, width), width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.85 + 0.15 * (np.cos(angle) * rows + np.sin(angle) * cols) * rng.uniform(-1, 1)
    tint = (np.array([0.96, 0.94, 0.88]) * rng.uniform(0.85, 1.0, 3)).astype(np.float32)
    base = np.ones((height, width), np.float32)
    if grain:
        coarse = rng.standard_normal((height // 3 + 1, width // 3 + 1), np.float32)
        texture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        base -= grain * np.abs(np.asarray(texture))
    return base[..., None] * tint, light


def photograph(
    paper_rgb: np.ndarray, light: np.ndarray, mask: np.ndarray, pen: np.ndarray, rng
) -> Image.Image:
    """Ink `mask` (0..1) in colour `pen` on the paper, photographed (`exposed`)."""
    rgb = paper_rgb * (1 - mask[..., None]) + pen.astype(np.float32) * mask[..., None]
    return exposed(rgb, light, rng)


def exposed(rgb: np.ndarray, light: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A scene (RGB in [0, 1]) as a camera saves it: lit, with sensor noise and a little blur."""
    rgb = (rgb * light[..., None]).astype(np.float32)
    rgb += rng.standard_normal(rgb.shape, np.float32) * np.float32(rng.uniform(0.01, 0.03))
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def thin_strokes(digit: np.ndarray, size: int, core: float) -> np.ndarray:
    """An MNIST digit with thinner strokes: only the part of each stroke brighter than `core`
    (0.5: MNIST-like; 0.85: about a third as wide), smooth at the edges."""
    smooth = pen_strokes(digit, size)
    return np.clip((smooth - core) / (1.05 - core), 0, 1)


def ink_crop(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(ink > 0.1)
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def scan_lowres(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A very low-resolution scan: the digit at 8x8 to 16x16 pixels in 16 gray levels (like
    old OCR data sets), enlarged by a viewer or tool (nearest or bilinear) to 64-448 px."""
    size = int(rng.integers(8, 17))
    ink = ink_crop(pen_strokes(digit, 112))
    side = max(ink.shape)
    square = np.zeros((side, side), np.float32)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    margin = int(rng.integers(0, 2))  # 0 or 1 pixel of paper around the digit
    small = Image.fromarray(square).resize(
        (size - 2 * margin, size - 2 * margin), Image.Resampling.BOX
    )
    scan = np.zeros((size, size), np.float32)
    scan[margin : size - margin, margin : size - margin] = np.asarray(small)
    scan = np.clip(scan / max(scan.max(), 1e-6) + rng.normal(0, 0.03, scan.shape), 0, 1)
    if rng.random() < 0.7:  # dark on light paper; else shown as light on dark
        scan = rng.uniform(0.85, 1.0) - scan * rng.uniform(0.6, 0.85)
    levels = np.round(np.clip(scan, 0, 1) * 15) / 15  # 4 bits per pixel
    image = Image.fromarray((levels * 255).astype(np.uint8))
    scale = int(rng.integers(64, 449)) // size
    resample = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR)[int(rng.integers(2))]
    return image.resize((size * scale, size * scale), resample)


def printed_fonts(label: int, rng: np.random.Generator, font: Path) -> Image.Image:
    """A printed digit in `font`, sometimes heavier (a stroked outline), slanted or condensed;
    mostly dark on light, sometimes light on dark (a screenshot); off-centre, slightly turned."""
    size = int(rng.integers(40, 160))
    font_face = ImageFont.truetype(str(font), size)
    weight = int(rng.integers(1, max(2, size // 18))) if rng.random() < 0.3 else 0
    left, top, right, bottom = font_face.getbbox(str(label), stroke_width=weight)
    glyph = Image.new("L", (int(right - left) + 8, int(bottom - top) + 8), 0)
    ImageDraw.Draw(glyph).text(
        (4 - left, 4 - top),
        str(label),
        fill=255,
        font=font_face,
        stroke_width=weight,
        stroke_fill=255,
    )
    shear = rng.uniform(0.15, 0.3) if rng.random() < 0.2 else 0.0  # synthetic italic
    squeeze = rng.uniform(0.6, 0.85) if rng.random() < 0.2 else 1.0  # synthetic condensed
    width, height = glyph.size
    new_width = int(width * squeeze + shear * height) + 1
    glyph = glyph.transform(
        (new_width, height),
        Image.Transform.AFFINE,
        (1 / squeeze, shear / squeeze, -shear * height / squeeze, 0, 1, 0),
        Image.Resampling.BICUBIC,
    )
    pad_x, pad_y = int(rng.integers(10, 200)), int(rng.integers(10, 200))
    ink = np.zeros((height + pad_y, new_width + pad_x), np.float32)
    top, left = int(rng.integers(0, pad_y + 1)), int(rng.integers(0, pad_x + 1))
    ink[top : top + height, left : left + new_width] = np.asarray(glyph, np.float32) / 255
    paper_level, ink_level = rng.uniform(0.78, 1.0), rng.uniform(0.0, 0.25)
    if rng.random() < 0.15:
        paper_level, ink_level = 1 - paper_level, 1 - ink_level
    gray = paper_level + (ink_level - paper_level) * ink
    image = Image.fromarray((np.clip(gray, 0, 1) * 255).astype(np.uint8))
    return image.rotate(
        rng.uniform(-5, 5), Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0))
    )


def marker(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Thick felt-tip marker (strokes 2-3x MNIST's) in black or a colour on white paper."""
    height, width = int(rng.integers(200, 700)), int(rng.integers(200, 700))
    size = int(min(height, width) * rng.uniform(0.5, 0.85))
    strokes = Image.fromarray((pen_strokes(digit, 112) * 255).astype(np.uint8))
    strokes = strokes.filter(ImageFilter.MaxFilter((7, 9, 11)[int(rng.integers(3))]))
    ink = np.asarray(strokes.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    mask = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    mask[top : top + size, left : left + size] = np.clip(ink * 1.2, 0, 1)
    pens = ([0.05, 0.05, 0.05], [0.1, 0.2, 0.7], [0.75, 0.1, 0.1], [0.1, 0.5, 0.2])
    paper_rgb, light = paper(height, width, rng)
    return photograph(paper_rgb, light, mask, np.array(pens[int(rng.integers(4))]), rng)


def pencil_mark(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Thin, light, uneven graphite strokes of an MNIST digit at `size` px."""
    ink = thin_strokes(digit, size, rng.uniform(0.6, 0.8))
    streaks = rng.uniform(0.55, 1.0, ink.shape).astype(np.float32)  # graphite skips on grain
    return ink * streaks * np.float32(rng.uniform(0.3, 0.55))


def pencil(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Thin, light pencil strokes on grainy paper, photographed."""
    height, width = int(rng.integers(300, 900)), int(rng.integers(300, 900))
    size = int(min(height, width) * rng.uniform(0.4, 0.75))
    mask = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    mask[top : top + size, left : left + size] = pencil_mark(digit, size, rng)
    paper_rgb, light = paper(height, width, rng, grain=rng.uniform(0.02, 0.06))
    return photograph(paper_rgb, light, mask, np.array([0.2, 0.2, 0.22]), rng)


def small_in_large(
    digit: np.ndarray, label: int, rng: np.random.Generator, fonts: list[Path]
) -> Image.Image:
    """A photo of a mostly empty page (1000-3000 px high) with one small digit (8-15% of its
    height): the MNIST digit in a thin pen stroke or light pencil, or its label printed."""
    height = int(rng.integers(1000, 3001))
    width = int(height * rng.uniform(0.7, 1.4))
    size = int(height * rng.uniform(0.08, 0.15))
    style = ("pen", "pencil", "printed")[int(rng.integers(3))]
    if style == "pen":
        ink = thin_strokes(digit, size, rng.uniform(0.5, 0.8))
    elif style == "pencil":
        ink = pencil_mark(digit, size, rng)
    else:
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
        left, top, right, bottom = font.getbbox(str(label))
        glyph = Image.new("L", (int(right - left), int(bottom - top)), 0)
        ImageDraw.Draw(glyph).text((-left, -top), str(label), fill=255, font=font)
        ink = np.asarray(glyph, np.float32) / 255 * np.float32(rng.uniform(0.6, 1.0))
    mask = np.zeros((height, width), np.float32)
    top = int(rng.integers(0, height - ink.shape[0] + 1))
    left = int(rng.integers(0, width - ink.shape[1] + 1))
    mask[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    paper_rgb, light = paper(height, width, rng, grain=rng.uniform(0.0, 0.04))
    pen = np.array([0.2, 0.2, 0.22]) if style == "pencil" else np.array([0.08, 0.08, 0.2])
    return photograph(paper_rgb, light, mask, pen, rng)


def border(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A digit cropped tightly: its ink touches the image's edge on one to four sides, or
    runs past it by up to 6% of its size (a careless crop); pen on paper or a canvas."""
    size = int(rng.integers(100, 400))
    ink = ink_crop(pen_strokes(digit, size))
    height, width = ink.shape
    # How far the crop reaches beyond the ink on each side (negative: it cuts the digit).
    sides = rng.uniform(0.0, 0.08, 4)
    touching = rng.choice(4, int(rng.integers(1, 5)), replace=False)
    sides[touching] = rng.uniform(-0.06, 0.0, len(touching))
    top, bottom, left, right = (np.round(sides * [height, height, width, width])).astype(int)
    framed = np.pad(ink, ((max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))
    framed = framed[max(-top, 0) : framed.shape[0] - max(-bottom, 0)]
    framed = framed[:, max(-left, 0) : framed.shape[1] - max(-right, 0)]
    if rng.random() < 0.3:  # drawn on a canvas, white on black
        return Image.fromarray((framed * 255).astype(np.uint8)).convert("RGB")
    paper_rgb, light = paper(framed.shape[0], framed.shape[1], rng)
    return photograph(paper_rgb, light, framed, np.array([0.1, 0.12, 0.35]), rng)


def on_desk(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A sheet of paper with a digit on it, photographed on a darker desk (wood, grey or
    black) that shows around it: the sheet spans 45-90% of the frame each way, turned a
    little, half the time seen at an angle (a side 5-25% shorter), with a soft shadow on the
    desk; a fifth of the time it runs off the frame."""
    height, width = int(rng.integers(400, 1000)), int(rng.integers(400, 1000))
    sheet_h, sheet_w = (int(n * rng.uniform(0.45, 0.9)) for n in (height, width))
    size = int(min(sheet_h, sheet_w) * rng.uniform(0.35, 0.7))
    mask = np.zeros((sheet_h, sheet_w), np.float32)
    # People write away from a sheet's edges: a tenth of it stays clear on each side.
    top = int(rng.integers(sheet_h // 10, sheet_h * 9 // 10 - size + 1))
    left = int(rng.integers(sheet_w // 10, sheet_w * 9 // 10 - size + 1))
    mask[top : top + size, left : left + size] = pen_strokes(digit, size)
    paper_rgb, _ = paper(sheet_h, sheet_w, rng)
    pen = np.array([0.1, 0.12, 0.35]) if rng.random() < 0.5 else np.array([0.12, 0.1, 0.1])
    sheet_rgb = paper_rgb * (1 - mask[..., None]) + pen * mask[..., None]
    sheet = Image.fromarray((np.clip(sheet_rgb, 0, 1) * 255).astype(np.uint8)).convert("RGBA")
    if rng.random() < 0.5:  # photographed at an angle: one side of the sheet farther away
        sheet = keystone(sheet, rng.uniform(0.05, 0.25), int(rng.integers(4)))
    sheet = sheet.rotate(rng.uniform(-8, 8), Image.Resampling.BICUBIC, expand=True)
    desks = ([0.45, 0.3, 0.18], [0.35, 0.35, 0.37], [0.12, 0.12, 0.13], [0.55, 0.42, 0.3])
    desk_rgb = np.array(desks[int(rng.integers(4))]) * rng.uniform(0.7, 1.1)
    grain = rng.standard_normal((height // 40 + 1, width // 2 + 1), np.float32)  # like wood
    streaks = np.asarray(Image.fromarray(grain).resize((width, height), Image.Resampling.BICUBIC))
    desk = np.clip(desk_rgb * (1 + 0.12 * streaks[..., None]), 0, 1)
    photo = Image.fromarray((desk * 255).astype(np.uint8))
    # Running off the frame by less than the clear margin: the digit stays in the picture.
    overhang = (sheet.height // 12, sheet.width // 12) if rng.random() < 0.2 else (0, 0)
    y, x = (
        int(rng.integers(min(0, slack) - reach, max(0, slack) + reach + 1))
        for slack, reach in zip((height - sheet.height, width - sheet.width), overhang)
    )
    shadow = sheet.getchannel("A").filter(ImageFilter.GaussianBlur(rng.uniform(3, 12)))
    offset = int(rng.integers(2, 12))
    photo.paste(
        (0, 0, 0), (x + offset, y + offset), shadow.point([level // 2 for level in range(256)])
    )
    photo.paste(sheet, (x, y), sheet)
    _, light = paper(height, width, rng)
    return exposed(np.asarray(photo, np.float32) / 255, light, rng)


def keystone(image: Image.Image, squeeze: float, side: int) -> Image.Image:
    """`image` seen at an angle: its side `side` (0 top, 1 right, 2 bottom, 3 left) shorter
    by `squeeze` of its length, shrunk toward its middle (a perspective transform)."""
    width, height = image.size
    corners = [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)]  # clockwise
    moved = list(corners)
    (xa, ya), (xb, yb) = corners[side], corners[(side + 1) % 4]
    dx, dy = (xb - xa) * squeeze / 2, (yb - ya) * squeeze / 2
    moved[side], moved[(side + 1) % 4] = (xa + dx, ya + dy), (xb - dx, yb - dy)
    # PIL maps each output pixel back to the input: from the moved corners to the original.
    rows = []
    for (x, y), (u, v) in zip(moved, corners):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
    coefficients = np.linalg.solve(np.array(rows), np.array(corners).ravel())
    return image.transform(
        image.size, Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC
    )


def encode(image: Image.Image, suffix: str, rng: np.random.Generator) -> bytes:
    """The file's bytes in the formats users have: JPEG for photos, else PNG, BMP or WebP."""
    buffer = io.BytesIO()
    if suffix == ".jpg":
        image.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(60, 85)))
    else:
        image.save(buffer, Image.registered_extensions()[suffix])
    return buffer.getvalue()


def generate(
    out_dir: Path,
    per_kind: int,
    seed: int = 0,
    mnist_dir: Path = EMBEDDED_MNIST,
    kinds: tuple[str, ...] = KINDS,
) -> list[tuple[Path, int, str]]:
    """Writes `per_kind` images of each of `kinds` and OUT_DIR/fonts.txt; returns (path,
    label, kind) for each."""
    rng = np.random.default_rng(seed)
    images, labels = read_idx_split(mnist_dir, "test")
    fonts, extra_fonts = digit_fonts(), more_fonts()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = [f"printed: {p}" for p in fonts] + [f"printed_fonts: {p}" for p in extra_fonts]
    (out_dir / "fonts.txt").write_text("\n".join(listing) + "\n")
    samples = []
    for kind in KINDS:
        if kind not in KINDS[:4]:
            if kind not in kinds:
                continue
            # Each later kind has its own generator, so adding kinds changed no image of the
            # first four, which share one as they always did.
            rng = np.random.default_rng([seed, KINDS.index(kind)])
        folder = out_dir / kind
        if kind in kinds:
            folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(rng.choice(len(images), per_kind, replace=False)):
            label = int(rng.integers(10)) if kind in PRINTED else int(labels[index])
            name = f"{kind}_{n:04d}_label{label}"
            digit = images[index]
            if kind == "paper_photo":
                image, suffix = paper_photo(digit, rng), ".jpg"
            elif kind == "canvas":
                image, suffix = canvas(digit, rng), ".png"
            elif kind == "scan_small":
                image, suffix = scan_small(digit, rng), (".png", ".bmp")[n % 2]
            elif kind == "printed":
                image, suffix = printed(label, rng, fonts), (".png", ".jpg", ".webp")[n % 3]
            elif kind == "scan_lowres":
                image, suffix = scan_lowres(digit, rng), ".png"
            elif kind == "printed_fonts":
                font = extra_fonts[int(rng.integers(len(extra_fonts)))]
                image, suffix = printed_fonts(label, rng, font), (".png", ".jpg")[n % 2]
                name += f"_{font.stem}"
            elif kind == "marker":
                image, suffix = marker(digit, rng), ".jpg"
            elif kind == "pencil":
                image, suffix = pencil(digit, rng), (".jpg", ".png")[n % 2]
            elif kind == "small_in_large":
                image, suffix = small_in_large(digit, label, rng, extra_fonts), ".jpg"
            elif kind == "border":
                image, suffix = border(digit, rng), (".jpg", ".png")[n % 2]
            else:
                image, suffix = on_desk(digit, rng), ".jpg"
            data = encode(image, suffix, rng)
            if kind in kinds:  # the first four are made in any case: they share `rng`
                path = folder / f"{name}{suffix}"
                path.write_bytes(data)
                samples.append((path, label, kind))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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

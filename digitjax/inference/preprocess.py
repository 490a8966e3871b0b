"""Turning a user's image into what MNIST looks like (numpy and pillow only: this is on the
fast `predict` path).

MNIST digits are white strokes on black, anti-aliased, scaled so the longer side of the ink's
bounding box is 20 px, and placed in a 28x28 frame with the ink's centre of mass at the centre.
A classifier trained on MNIST fails on raw photos mostly because they break those conventions
(polarity, margins, position, stroke width), so each step below restores one of them.
"""

import math
import re
import warnings
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

MNIST_SIZE, DIGIT_BOX = 28, 20
WORK_SIZE = 128  # images are reduced to this before cleaning: enough detail, little work
MIN_CONTRAST = 0.12  # ink must differ from the paper by this much (of full range) to count
# Fainter ink (light pencil on grey paper: 0.05-0.12) counts where it stands out from what
# removing the paper's level leaves elsewhere (its 90th percentile) by this factor: a
# lighting gradient or a texture leaves residue over much of the image, a digit does not.
# Around a small digit found on a large page, the page's own noise is that measure instead.
FAINT_CONTRAST, FAINT_RATIO = 0.05, 3.0
# A digit spanning less of the image than this (or not seen at WORK_SIZE at all: a small pencil
# digit on a large page fades into the paper when reduced) is looked for again at FIND_SIZE,
# and the part of the full image around it is then cleaned like a whole image.
SMALL_DIGIT, FIND_SIZE = 0.3, 512
# Pieces of ink above SOLID_INK (of its peak) under STROKE_SHARE of the largest piece are
# specks (paper grain, dust), not strokes: the smallest piece of a digit seen, the detached
# tip of a 3 written small on a page, was 4.7% of its largest.
SOLID_INK, STROKE_SHARE = 0.35, 0.03
# Where the image's median and its outer ring's median put the paper on opposite sides of the
# levels, the ring's is taken if this share of the ring lies nearer to it (`_paper_level`).
PAPER_RING = 0.8
# A shadow falling from a side of the image lies along SIDE_SPAN of it or more and, at half its
# reach, has faded under RAMP_MIDDLE of its level at the side (`_without_edge_shading`).
SIDE_SPAN, RAMP_MIDDLE = 0.8, 0.75
# A sheet of paper photographed on a desk (`_sheet`): the desk lies SHEET_CONTRAST or more
# below the paper, and the sheet spans SHEET_SPAN of the image each way and differs from a
# quadrilateral by under SHEET_MISMATCH of its area (`_is_sheet_shaped`; generated sheets:
# 0.01-0.06; light glyphs on dark with their holes filled: 0.25-0.42).
SHEET_CONTRAST, SHEET_SPAN, SHEET_MISMATCH = 0.2, 0.4, 0.15
SHEET_MIN_SIDE = 32  # px at WORK_SIZE: smaller images are not photos of a desk
# Bump when preprocessing makes something else of an image: the generated training images
# cached after going through it (synthetic/cache.py) are then made again.
VERSION = 7  # 2: faint ink (FAINT_CONTRAST); 3: specks dropped (_strokes); 4: small and faint;
# 5: a shadow's ramp along a side is not ink (_without_edge_shading), and an image enlarged
# by repeating its pixels is enlarged smoothly instead (_unzoomed); 6: the paper's level from
# the image's outer ring where the median is ink (_paper_level); 7: a sheet on a desk is read
# inside the sheet (_sheet)
# Larger images are refused from their header, before decoding (decompression bombs declare a
# huge size in a small file). 80 megapixels is above what cameras save by default (phones
# 12-50, full-frame 61) and below PIL's own bomb limit (89.5), so PIL never warns about an
# image that passes; README.md gives the memory and time one at the limit takes.
MAX_PIXELS = 80_000_000
# The formats photos, scans and drawings are saved in, which PIL decodes itself once their
# header is read. Not the others it opens: EPS runs Ghostscript on the file (PostScript from
# anyone who uploads one), and ICO decodes the PNG inside it before its size can be checked.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "PPM")
# A JPEG is decoded once per scan, and a file may repeat one small scan thousands of times: 4 MB
# of them kept a decoder busy 8 s on a 4-megapixel image. Encoders write 1 scan, or 6-10 for a
# progressive JPEG; more than this many is refused before decoding.
MAX_JPEG_SCANS = 100
NO_DIGIT_FOUND = "no digit found"  # the answer for an image in which `to_mnist` finds none


class ImageError(Exception):
    """A file that cannot be read as an image; the message is the reason."""


def load_grayscale(path: Path | BinaryIO, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image as float32 gray levels in [0, 1], upright as its EXIF orientation says.
    An image of over `max_pixels` is refused from its header, before anything is decoded."""
    try:
        # PIL's warnings (a bomb above its own limit, corrupt EXIF...) would only add noise to
        # the one-line verdict each file gets; above twice its limit PIL raises instead.
        with warnings.catch_warnings(action="ignore"):
            with Image.open(path, formats=FORMATS) as image:  # reads the header only
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"image too large: {width}x{height} pixels, limit {max_pixels:,}"
                    )
                if image.format == "JPEG" and (scans := _jpeg_scans(image)) > MAX_JPEG_SCANS:
                    raise ImageError(
                        f"image too costly to decode: a JPEG of {scans:,} scans, "
                        f"limit {MAX_JPEG_SCANS}"
                    )
                image.load()  # decode now: truncated files fail here, not later
                image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        # PIL refuses before telling the size; its message holds the pixel count.
        told = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(told.group(1)):,}" if told else f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}"
        raise ImageError(f"image too large: {size} pixels, limit {max_pixels:,}") from None
    except UnidentifiedImageError:
        if isinstance(path, Path) and _is_empty(path):
            raise ImageError("the file is empty") from None
        raise ImageError(f"not an image in a known format ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"unreadable image: {e}") from None
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"), np.float32) / 255
        if alpha.min() < 0.9:
            # Transparent background (a canvas export): the strokes are the opaque pixels,
            # whatever their colour.
            return alpha
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, np.float32)
        finite = values[np.isfinite(values)]  # a float TIFF may hold NaN and infinities
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        # Into [-1, 1] first: between float32's own extremes (+-3.4e38) a difference overflows.
        scale = max(abs(low), abs(high), 1.0)
        values, low, high = values / np.float32(scale), low / scale, high / scale
        # NaN as the lowest level, an infinity one past the finite levels on its side.
        beyond = max(high - low, 1.0)
        values = np.nan_to_num(values, nan=low, posinf=high + beyond, neginf=low - beyond)
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.asarray(image.convert("L"), np.float32) / 255


def _jpeg_scans(image: ImageFile.ImageFile) -> int:
    """The scans in a JPEG file, counted by their start marker, which the format never lets
    appear inside a scan's data (a thumbnail in its EXIF adds its own)."""
    file = cast(BinaryIO, image.fp)
    position = file.tell()
    file.seek(0)
    scans = file.read().count(b"\xff\xda")
    file.seek(position)
    return scans


def _is_empty(path: Path) -> bool:
    """Whether reading `path` gives nothing: a device (/dev/zero) or a file of /proc has size
    0 but gives bytes."""
    try:
        with path.open("rb") as file:
            return file.read(1) == b""
    except OSError:
        return False


def to_mnist(gray: np.ndarray) -> np.ndarray | None:
    """A 28x28 float32 white-on-black digit in [0, 1], or None when no digit is found."""
    gray = _unzoomed(gray)
    # Reduced once for every look (large photos cost the most): FIND_SIZE for a small digit,
    # WORK_SIZE for the sheet and the digit (_locate's own reduction leaves it as it is).
    finer = _reduce(gray, FIND_SIZE)
    sheet = _sheet(work := _reduce(finer), gray.shape)
    if sheet is not None:
        gray = gray[sheet]
        finer = _reduce(gray, FIND_SIZE)
        work = _reduce(finer)
    found = _locate(work)
    if max(gray.shape) > WORK_SIZE and (found is None or _spans(*found) < SMALL_DIGIT):
        around = _find_small(finer, max(gray.shape) / max(finer.shape))
        closer = _locate(gray[around], stands_out=True) if around is not None else None
        found = closer or found
    if found is None:
        return None
    ink, (top, bottom, left, right) = found
    return _center_by_mass(_fit_box(ink[top:bottom, left:right]))


def preprocess_file(path: Path | BinaryIO, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    return to_mnist(load_grayscale(path, max_pixels))


def png_bytes(image: np.ndarray) -> bytes:
    """A [0, 1] grey image as a PNG file's bytes (what the model saw, for people to look at)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _unzoomed(gray: np.ndarray) -> np.ndarray:
    """An image enlarged by repeating each of its pixels k times (a viewer's or a screenshot's
    "nearest" zoom of a small scan) as a smooth zoom would have shown it, at most FIND_SIZE
    across: shrunk to 20 px from the blocks, the digit stays a mosaic of them. Rows and
    columns sampled across the image give k (the common divisor of where their levels
    change), taken only if the whole image is its k-th pixels repeated."""
    height, width = gray.shape
    rows, columns = gray[:: max(1, height // 8)], gray[:, :: max(1, width // 8)]
    across = np.flatnonzero(np.any(rows[:, 1:] != rows[:, :-1], axis=0)) + 1
    down = np.flatnonzero(np.any(columns[1:] != columns[:-1], axis=1)) + 1
    if not across.size or not down.size:
        return gray  # one level along the samples: nothing to smooth
    k = math.gcd(math.gcd(width, *across.tolist()), math.gcd(height, *down.tolist()))
    if k < 2:
        return gray
    # Compared a k-th at a time: a copy of the whole image would double what a large one holds.
    rows = gray[::k]
    if not all(np.array_equal(gray[i::k], rows) for i in range(1, k)):
        return gray
    small = rows[:, ::k]
    if not all(np.array_equal(rows[:, j::k], small) for j in range(1, k)):
        return gray
    scale = min(1.0, FIND_SIZE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    smooth = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    return np.clip(np.asarray(smooth, np.float32), 0, 1)


def _sheet(small: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice] | None:
    """Where a sheet of paper lies in a photo of it on a darker desk, given the photo reduced
    to WORK_SIZE: the slices of the full image (of `shape`) inside the sheet, or None. The
    desk around a sheet would otherwise be taken for ink: a frame around the digit. Where the
    outer ring's median lies SHEET_CONTRAST or more below the image's 90th percentile and 40%
    or more of the ring is nearer it (the desk shows around), a sheet is the largest piece of
    the levels nearer the 90th percentile, its holes (the ink) filled in, if it spans
    SHEET_SPAN or more of the image each way but not all of it, and is shaped like a sheet
    (`_is_sheet_shaped`)."""
    height, width = small.shape
    if min(height, width) < SHEET_MIN_SIDE:
        return None
    ring = _outer_ring(small)
    desk, light = float(np.median(ring)), float(np.percentile(small, 90))
    if light - desk < SHEET_CONTRAST or (ring > (desk + light) / 2).mean() > 0.6:
        return None
    bright = small > (desk + light) / 2
    pieces = _components(bright)
    sizes = np.bincount(pieces[bright], minlength=small.size + 1)
    on_sheet = pieces == sizes.argmax()
    outside = _components(~on_sheet)
    on_sheet |= ~np.isin(outside, _outer_ring(outside))
    rows, cols = np.flatnonzero(on_sheet.any(axis=1)), np.flatnonzero(on_sheet.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (
        min((bottom - top) / height, (right - left) / width) < SHEET_SPAN
        or (bottom - top, right - left) == (height, width)
        or not _is_sheet_shaped(on_sheet)
    ):
        return None
    # The largest box inside the sheet, shrunk a side at a time (the side with the most desk
    # along it), then a pixel more: the sheet's edge is blurred into the desk's shadow.
    box = [top, bottom, left, right]
    while box[1] - box[0] > 2 and box[3] - box[2] > 2:
        top, bottom, left, right = box
        desk_along = [
            1 - on_sheet[top, left:right].mean(),
            1 - on_sheet[bottom - 1, left:right].mean(),
            1 - on_sheet[top:bottom, left].mean(),
            1 - on_sheet[top:bottom, right - 1].mean(),
        ]
        side = int(np.argmax(desk_along))
        if desk_along[side] <= 0.02:
            break
        box[side] += 1 if side in (0, 2) else -1
    top, bottom, left, right = box
    scale_y, scale_x = shape[0] / height, shape[1] / width
    return (
        slice(int((top + 1) * scale_y), int((bottom - 1) * scale_y)),
        slice(int((left + 1) * scale_x), int((right - 1) * scale_x)),
    )


def _is_sheet_shaped(piece: np.ndarray) -> bool:
    """Whether `piece` (a mask) is a quadrilateral, as a sheet is however it is turned or seen
    at an angle: it and the quadrilateral through its extreme points along the diagonals (a
    sheet's corners, or where the image's edges cut it) differ by under SHEET_MISMATCH of its
    area. A bold rounded glyph, light on dark with its holes filled, differs by far more: the
    quadrilateral through an ellipse's diagonal extremes misses 36% of it."""
    ys, xs = np.nonzero(piece)
    diagonals = ((-1, -1), (-1, 1), (1, 1), (1, -1))  # corners clockwise from the top left
    ends = [int(np.argmax(down * ys + right * xs)) for down, right in diagonals]
    corners = [(xs[i], ys[i]) for i in ends]
    rows, cols = np.indices(piece.shape)
    inside = np.ones(piece.shape, bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        # On the inner side of each edge, with a pixel's slack for the edge's own pixels.
        inside &= (x1 - x0) * (rows - y0) - (y1 - y0) * (cols - x0) >= -abs(x1 - x0) - abs(y1 - y0)
    return bool((inside ^ piece).sum() < SHEET_MISMATCH * piece.sum())


def _locate(
    gray: np.ndarray, stands_out: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """The cleaned ink of the image reduced to WORK_SIZE, and the digit's box in it."""
    ink = _ink_map(_reduce(gray), stands_out)
    box = _ink_box(ink) if ink is not None else None
    return (ink, box) if ink is not None and box is not None else None


def _spans(ink: np.ndarray, box: tuple[int, int, int, int]) -> float:
    top, bottom, left, right = box
    return max(bottom - top, right - left) / max(ink.shape)


def _reduce(gray: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """Large photos are shrunk (anti-aliased) so cleaning costs the same for any size."""
    height, width = gray.shape
    scale = size / max(height, width)
    if scale >= 1:
        return gray
    reduced = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(gray).resize(reduced, Image.Resampling.BOX), np.float32)


def _ink_map(gray: np.ndarray, stands_out: bool = False) -> np.ndarray | None:
    """Ink strength in [0, 1] with the background removed, or None for a blank image.
    `stands_out`: the image is the part of a page around ink that stood out of the whole
    page's noise (`_find_small`), so faint ink counts without standing out of the rest of
    this part, which a small digit's strokes may fill."""
    height, width = gray.shape
    # The ink is the tail of the levels that lies farther from the paper's: darker ink on
    # light paper, or light strokes on a dark canvas.
    low, median, high = np.percentile(gray, [0.5, 50, 99.5])
    paper = _paper_level(gray, low, median, high)
    flat = paper in (low, high)  # the paper is one level: drawn, not photographed
    tail = max(high - paper, paper - low)  # how far the ink reaches from the paper
    if paper - low > high - paper:
        gray, paper = 1 - gray, 1 - paper
    if flat:
        # A canvas or a rendering has no lighting or noise to remove; the block minima below
        # would also hollow out strokes thicker than a block.
        ink = np.clip(gray - paper, 0, None)
    else:
        # Uneven lighting: subtract the paper's own level, leaving ink on a flat black floor.
        # The blocks must be over twice as wide as the strokes, or a marker's strokes (or a
        # pen's, in a close crop) would come out hollow.
        stroke = _stroke_width(gray - paper > 0.5 * max(tail, MIN_CONTRAST))
        block = 2 * max(3, min(height, width) // 16, int(np.ceil(stroke))) + 1
        background = _background(gray, block)
        ink = np.clip(gray - np.minimum(background, gray), 0, None)
        if min(height, width) >= 48:  # photo noise; tiny scans have no pixels to spare
            ink = _filtered(ink, ImageFilter.MedianFilter(3))
        ink = _without_edge_shading(ink)
    peak, residue = (float(level) for level in np.percentile(ink, [99.5, 90]))
    faint = peak < FAINT_CONTRAST or (not stands_out and peak < FAINT_RATIO * residue)
    if peak < MIN_CONTRAST and faint:
        return None
    # Normalise so that the strokes' core is full white, and drop weak residue (noise, paper
    # texture) and specks that would otherwise widen the bounding box.
    ink = np.clip(ink / peak, 0, 1)
    ink[ink < 0.25] = 0
    return _strokes(ink)


def _paper_level(gray: np.ndarray, low: float, median: float, high: float) -> float:
    """The paper's gray level. Most pixels are paper, so it is the median; but a bold digit
    cropped tight may cover most of the image, and then the median is ink and the digit came
    out inverted. The image's outer ring is paper even then (strokes cross it here and
    there), so where its median puts the paper on the other side of the range, it is taken
    if PAPER_RING of the ring lies nearer to it than to the range's other end."""
    ring = _outer_ring(gray)
    edge = float(np.median(ring))
    if (median - low > high - median) == (edge - low > high - edge):
        return median
    nearer = np.abs(ring - edge) < np.abs(ring - (low + high - edge))
    return edge if nearer.mean() >= PAPER_RING else median


def _outer_ring(image: np.ndarray) -> np.ndarray:
    """The pixels along the image's four sides, each once."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])


def _without_edge_shading(ink: np.ndarray) -> np.ndarray:
    """The ink less a shadow falling from a side of the image. The block minima of
    `_background` lag behind a shadow's ramp, leaving a band along the side that was cropped
    into a bar and read as a "1". Such a band covers SIDE_SPAN of the side and fades away from
    it (at half its reach, under RAMP_MIDDLE of its level at the side), where a stroke along a
    side keeps its level across its width: its level, the median along the side at each
    distance from it, is taken off up to where it fades out, leaving any stroke drawn over it."""
    level = np.percentile(ink, 99.5)
    ink = ink.copy()
    for turns in range(4):
        side = np.rot90(ink, turns)  # a view, the side under test on the left
        if np.quantile(side[:, 0], 1 - SIDE_SPAN) <= 0.25 * level:
            continue
        profile = np.median(side, axis=0)
        half = int(np.argmax(profile < 0.25 * profile[0])) // 2
        if half < 1 or profile[half] >= RAMP_MIDDLE * profile[0]:
            continue
        reach = int(np.argmax(profile <= 0.05 * profile[0])) or profile.size
        side[:, :reach] = np.clip(side[:, :reach] - profile[:reach], 0, None)
    return ink


def _background(gray: np.ndarray, block: int) -> np.ndarray:
    """The paper's level everywhere: minima over blocks wider than any stroke, interpolated
    smoothly (a sliding minimum filter gives the same picture, far slower)."""
    height, width = gray.shape
    padded = np.pad(gray, ((0, -height % block), (0, -width % block)), mode="edge")
    rows, cols = padded.shape[0] // block, padded.shape[1] // block
    minima = padded.reshape(rows, block, cols, block).min(axis=(1, 3))
    smooth = Image.fromarray(minima).resize((cols * block, rows * block), Image.Resampling.BILINEAR)
    return np.asarray(smooth, np.float32)[:height, :width]


def _find_small(small: np.ndarray, scale: float) -> tuple[slice, slice] | None:
    """Where a small digit lies in a large, mostly empty image, given the image reduced to
    FIND_SIZE (`scale` times smaller): the slices of the full image around it, with a margin, or
    None. There is no median filter here (a thin stroke may be one pixel wide), and the ink's
    level comes from the paper's noise, not from a share of the pixels (the digit may hold
    under 0.1% of them): ink counts from FAINT_CONTRAST up where it lies six times that noise
    from the paper (a small pencil digit on clean paper is ~0.1 darker than it, which
    MIN_CONTRAST missed)."""
    height, width = small.shape
    # The statistics come from a quarter of the pixels (they cost the most here): the tails
    # from 2x2 means, so that a one-pixel stroke still counts; the noise from every other pixel.
    halved = np.asarray(Image.fromarray(small).reduce(2))
    low, median, high = np.percentile(halved, [0.05, 50, 99.95])
    if median - low > high - median:
        small = 1 - small
    ink = small - np.minimum(_background(small, 2 * max(3, min(height, width) // 16) + 1), small)
    ink -= np.median(ink[::2, ::2])
    noise = 1.4826 * np.median(np.abs(ink[::2, ::2]))  # the paper's noise: its median deviation
    strong = ink > max(FAINT_CONTRAST, 6 * noise)
    # Strokes of one digit lie in neighbouring cells (or one cell apart: pencil skips).
    cell = FIND_SIZE // 64
    counts = np.pad(strong, ((0, -height % cell), (0, -width % cell)))
    counts = counts.reshape(counts.shape[0] // cell, cell, -1, cell).sum(axis=(1, 3))
    cluster = np.zeros(counts.shape, bool)
    cluster[np.unravel_index(counts.argmax(), counts.shape)] = True
    reach = _dilate(counts > 0)
    while not np.array_equal(grown := _dilate(cluster) & reach, cluster):
        cluster = grown
    digit = strong & cluster.repeat(cell, 0).repeat(cell, 1)[:height, :width]
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    if digit.sum() < 12 or max(rows[-1] - rows[0], cols[-1] - cols[0]) < FIND_SIZE // 32:
        return None  # a speck, not a digit
    margin = 0.25 * max(rows[-1] - rows[0], cols[-1] - cols[0]) + 2
    return (
        slice(max(0, int((rows[0] - margin) * scale)), int((rows[-1] + 1 + margin) * scale)),
        slice(max(0, int((cols[0] - margin) * scale)), int((cols[-1] + 1 + margin) * scale)),
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Each cell and its eight neighbours."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return wide


def _strokes(ink: np.ndarray) -> np.ndarray:
    """The ink of the strokes alone. Paper grain and specks that survive the cleaning (faint
    pencil on grainy paper leaves plenty) are pieces of ink far smaller than a stroke: pieces
    of solid ink under STROKE_SHARE of the largest one are dropped, with the weaker ink
    around them, so they neither stretch the digit's box nor speckle what the model sees."""
    solid = ink > SOLID_INK
    pieces = _components(solid)
    sizes = np.bincount(pieces[solid], minlength=solid.size + 1)
    strokes = solid & (sizes[pieces] >= STROKE_SHARE * sizes.max())
    # Weaker ink stays where it joins a stroke: the stroke's soft edge, a lighter part of it.
    inked = ink > 0
    joined = _components(inked)
    kept = np.zeros(solid.size + 1, bool)
    kept[joined[strokes]] = True
    return np.where(kept[joined], ink, 0).astype(np.float32)


def _components(mask: np.ndarray) -> np.ndarray:
    """A label per pixel of `mask` that it shares with the pixels it is connected to (by
    8-neighbours): the flat index of one of them; mask.size elsewhere. Union-find in numpy:
    each round joins every piece to its least-labelled neighbour's, then flattens the
    chains (5 rounds, ~1 ms, for the dense grain around faint pencil at WORK_SIZE; spreading
    labels pixel by pixel took 58)."""
    height, width = mask.shape
    outside = mask.size
    parent = np.arange(outside + 1, dtype=np.int32)  # the last one: outside the mask
    inside = np.flatnonzero(mask)
    while True:
        labels = np.where(mask, parent[:-1].reshape(height, width), outside)
        padded = np.pad(labels, 1, constant_values=outside)
        least = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(least, padded[dy : dy + height, dx : dx + width], out=least)
        joined = parent.copy()
        np.minimum.at(joined, parent[inside], least.ravel()[inside])
        while not np.array_equal(flatter := joined[joined], joined):
            joined = flatter
        if np.array_equal(joined, parent):
            return labels
        parent = joined


def _ink_box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the ink, ignoring specks far smaller than a digit."""
    mask = ink > 0.5
    if mask.sum() < max(4, 0.002 * mask.size):
        return None
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    # A row or column counts only if it holds a little of the ink mass (drops stray dots).
    min_share = 0.002 * mask.sum()
    rows_in, cols_in = np.flatnonzero(rows > min_share), np.flatnonzero(cols > min_share)
    if rows_in.size == 0 or cols_in.size == 0:
        return None
    return rows_in[0], rows_in[-1] + 1, cols_in[0], cols_in[-1] + 1


def _fit_box(digit: np.ndarray) -> np.ndarray:
    """Scales the digit so its longer side is 20 px, keeping the aspect ratio."""
    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Thin pen strokes on large images would vanish when shrunk: thicken them first so they
    # end up MNIST-wide (~2-3 px at 28x28).
    stroke = _stroke_width(digit)
    if stroke * scale < 1.8 and scale < 1:
        grow = int(np.ceil((1.8 / scale - stroke) / 2))
        digit = _filtered(digit, ImageFilter.MaxFilter(2 * min(grow, 6) + 1))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    resized = Image.fromarray(digit.astype(np.float32)).resize(size, resample)
    return np.clip(np.asarray(resized, np.float32), 0, 1)


def _stroke_width(digit: np.ndarray) -> float:
    """Mean stroke width in pixels: ink area over the length of its skeleton (approximated
    by the number of ink pixels that touch the background)."""
    mask = digit > 0.5
    area = mask.sum()
    interior = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    edge = area - interior.sum()
    return float(2 * area / max(edge, 1))


def _filtered(values: np.ndarray, *filters: ImageFilter.Filter) -> np.ndarray:
    """Applies PIL filters to a [0, 1] float image (through 8 bits: they need it)."""
    image = Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8))
    for image_filter in filters:
        image = image.filter(image_filter)
    return np.asarray(image, np.float32) / 255


def _center_by_mass(digit: np.ndarray) -> np.ndarray:
    """Pastes the digit into 28x28 with its centre of mass at the centre, as MNIST did."""
    height, width = digit.shape
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    center_row = (rows * digit).sum() / total if total else height / 2
    center_col = (cols * digit).sum() / total if total else width / 2
    top = int(np.clip(round(MNIST_SIZE / 2 - center_row), 0, MNIST_SIZE - height))
    left = int(np.clip(round(MNIST_SIZE / 2 - center_col), 0, MNIST_SIZE - width))
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    canvas[top : top + height, left : left + width] = digit
    return canvas

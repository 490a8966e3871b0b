"""How often a model flags real images of no digit that nobody on this project made, chose or
tuned on: four more icon themes and an emoji font, beside Adwaita's icons and Fashion-MNIST
(`uncertain_rate.py`), as estimates of issue 21's private set of real non-digit images (goal:
at least 95% flagged). Every image goes through `digitjax predict`'s path (a file,
preprocessed); flagged means no digit found, "not sure" or "not a digit" (`judge`).

Evaluation only: nothing may be chosen on these sets (only what the project generates tunes
rejection), so a change is decided on generated images and these figures are reported beside.

    apt-get install tango-icon-theme oxygen-icon-theme breeze-icon-theme librsvg2-bin \
        fonts-noto-color-emoji
    python benchmarks/real_non_digits.py [--checkpoint RUN] [--per-set N]

Each set: one image per icon name (or emoji), names that hint at a digit left out (a number in
the name, dial pads, calendars, clocks; for emoji, Unicode names with DIGIT, NUMBER, KEYCAP,
CLOCK, CALENDAR, HUNDRED or INPUT), and duplicates (links to one file) counted once. A set
that is not installed is skipped. Prints a JSON report, then a markdown table: the share
flagged per set and what the images that pass are read as.
"""

import argparse
import json
import subprocess
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from uncertain_rate import fashion_files, icon_files

from digitjax.inference.classifier import DEFAULT_MIN_CONFIDENCE
from digitjax.inference.predict import load_classifier, predict_files

ICONS = Path("/usr/share/icons")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DIGIT_HINTS = ("dialpad", "calendar", "clock", "number", "digit", "counter", "timer")
EMOJI_DIGIT_HINTS = ("DIGIT", "NUMBER", "KEYCAP", "CLOCK", "CALENDAR", "HUNDRED", "INPUT")


def hints_a_digit(name: str) -> bool:
    return any(c.isdigit() for c in name) or any(hint in name for hint in DIGIT_HINTS)


def one_per_name(paths: Iterable[Path]) -> list[Path]:
    """The first file found for each icon name, each real file once."""
    by_name: dict[str, Path] = {}
    seen: set[Path] = set()
    for path in paths:
        name = path.name.split(".")[0]
        real = path.resolve()
        if hints_a_digit(name.lower()) or "-rtl" in name or name in by_name or real in seen:
            continue
        if real.is_file():
            by_name[name] = path
            seen.add(real)
    return [by_name[name] for name in sorted(by_name)]


def tango() -> list[Path]:
    """Tango: full-colour desktop icons, 32 px (32x32/CONTEXT/NAME.png)."""
    return one_per_name(sorted((ICONS / "Tango/32x32").glob("*/*.png")))


def oxygen() -> list[Path]:
    """Oxygen: KDE 4's full-colour, photo-like icons, 48 px (base/48x48/CONTEXT/NAME.png)."""
    return one_per_name(sorted((ICONS / "oxygen/base/48x48").glob("*/*.png")))


def breeze(folder: Path) -> list[Path]:
    """Breeze: KDE Plasma's flat one-colour line icons (SVG only: CONTEXT/SIZE/NAME.svg, 32 px
    or the largest below), drawn to 48 px PNGs in `folder` by librsvg."""
    svgs = []
    for size in ("32", "24", "22", "16"):
        svgs += sorted((ICONS / "breeze").glob(f"*/{size}/*.svg"))
    chosen = one_per_name(svgs)
    if chosen:
        folder.mkdir(parents=True)
    pngs = []
    for n, svg in enumerate(chosen):
        png = folder / f"{n:05d}.png"
        drawn = subprocess.run(
            ["rsvg-convert", "-w", "48", "-h", "48", "-o", str(png), str(svg)],
            capture_output=True,
        )
        if drawn.returncode == 0:
            pngs.append(png)
    return pngs


def emoji(folder: Path) -> list[Path]:
    """Noto Color Emoji: every single-character emoji of the font (faces, people, animals,
    food, objects, flags' letters, symbols), drawn in colour on a transparent 136 px square."""
    from fontTools.ttLib import TTFont

    characters = [
        chr(code)
        for code in sorted(TTFont(EMOJI_FONT).getBestCmap() or {})
        if code >= 0x2000
        and (name := unicodedata.name(chr(code), ""))
        and not any(hint in name for hint in EMOJI_DIGIT_HINTS)
        and not name.startswith(("ZERO WIDTH", "COMBINING", "VARIATION", "TAG "))
    ]
    font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the font's one bitmap size
    folder.mkdir(parents=True)
    pngs = []
    for n, character in enumerate(characters):
        image = Image.new("RGBA", (136, 136), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((4, 4), character, font=font, embedded_color=True)
        if image.getbbox() is None:  # no glyph drawn
            continue
        pngs.append(folder / f"{n:05d}.png")
        image.save(pngs[-1])
    return pngs


def collect(folder: Path, fashion_count: int) -> dict[str, list[Path]]:
    sets = {
        "Adwaita icons": [path for path, _ in icon_files()],
        "Tango icons": tango(),
        "Oxygen icons": oxygen(),
        "Breeze icons": breeze(folder / "breeze") if (ICONS / "breeze").is_dir() else [],
        "Noto emoji": emoji(folder / "emoji") if EMOJI_FONT.is_file() else [],
        "Fashion-MNIST test": [path for path, _ in fashion_files(folder / "f", fashion_count)],
    }
    return {name: paths for name, paths in sets.items() if paths}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--per-set", type=int, default=None, help="at most N images a set")
    parser.add_argument("--fashion", type=int, default=1000, help="Fashion-MNIST test images")
    args = parser.parse_args()
    classifier = load_classifier(args.checkpoint)
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, paths in collect(Path(folder), args.fashion).items():
            if args.per_set is not None:
                # An even spread over the sorted names, so a cap keeps every context.
                paths = [paths[i] for i in np.linspace(0, len(paths) - 1, args.per_set, dtype=int)]
            predictions, _ = predict_files(classifier, paths, DEFAULT_MIN_CONFIDENCE)
            passed = Counter(str(p.digit) for p in predictions if p.uncertain is False)
            report[name] = {
                "images": len(paths),
                "flagged": 1 - sum(passed.values()) / len(paths),
                "passed_as": dict(sorted(passed.items(), key=lambda item: -item[1])),
            }
    print(json.dumps({"model": classifier.info.to_dict(), "sets": report}, indent=2))
    print("\n| set | images | flagged | passed as (most first) |\n| --- | --- | --- | --- |")
    for name, result in report.items():
        passed_as = ", ".join(f"{digit}: {n}" for digit, n in list(result["passed_as"].items())[:5])
        print(f"| {name} | {result['images']} | {100 * result['flagged']:.1f}% | {passed_as} |")
    every = [r for name, r in report.items() if name != "Fashion-MNIST test"]
    images = sum(r["images"] for r in every)
    flagged = sum(r["flagged"] * r["images"] for r in every) / images
    print(f"| every icon and emoji set | {images} | {100 * flagged:.1f}% | |")


if __name__ == "__main__":
    main()

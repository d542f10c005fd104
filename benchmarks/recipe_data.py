"""Build the three real image sets of ``benchmarks/recipes.md`` (issue #13) into a folder you name.

Nothing here is downloaded and nothing it writes is committed: every image comes from a package
installed on the machine, and the same packages give the same folders byte for byte (sorted file
lists, a seeded generator, no timestamps in the PNGs). Each set is an ordinary
``train/<class>/`` + ``val/<class>/`` image folder, and ``<set>/sources.json`` lists the packages
(with their versions) and every source file behind every image.

=========  ===================================================================================
digits     scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``), 10
           classes, upscaled to 72 px grey PNGs; a seeded 50 + 25 of each digit for train/ + val/.
icons      9 concepts (folder, trash, printer, home, search, volume, battery, network, weather)
           drawn by different artists: train/ from the PNG themes of ``oxygen-icon-theme``,
           ``gnome-icon-theme`` and ``adwaita-icon-theme`` (several sizes, scaled to 64 px),
           val/ from the SVG themes of ``papirus-icon-theme``, ``breeze-icon-theme`` and
           ``elementary-icon-theme`` rendered at 64 px by ``rsvg-convert`` (``librsvg2-bin``):
           a domain shift, RGBA with transparency. The class is read from the icon's file name.
glyphs     the letters A to J (upper and lower case in one class) drawn by real fonts:
           ``fonts-noto-core``, ``fonts-dejavu-core``, ``fonts-liberation`` (and their
           ``-extra`` packages when installed); train/ and val/ use different font families.
=========  ===================================================================================

    apt-get install -y --no-install-recommends librsvg2-bin oxygen-icon-theme gnome-icon-theme \\
        papirus-icon-theme breeze-icon-theme elementary-icon-theme fonts-noto-core
    .venv/bin/python benchmarks/recipe_data.py /tmp/recipe-data            # all three sets
    .venv/bin/python benchmarks/recipe_data.py /tmp/recipe-data --sets icons
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SETS = ("digits", "icons", "glyphs")
ICON_SIZE = 64
ICON_CLASSES = {  # class -> file-name pattern (the icon naming spec's names and their common variants)
    "folder": r"^folder($|-)",
    "trash": r"^(user-trash|trash|edit-trash)",
    "printer": r"^(printer|document-print)($|-)",
    "home": r"^(user-home|go-home|home)($|-)",
    "search": r"^(system-search|edit-find|search|find)($|-)",
    "volume": r"^audio-volume",
    "battery": r"^battery($|-)",
    "network": r"^network-(wired|wireless|cellular)",
    "weather": r"^weather-",
}
ICON_TRAIN_THEMES = ("oxygen", "gnome", "Adwaita")  # PNG themes
ICON_VAL_THEMES = ("Papirus", "breeze", "elementary")  # SVG themes, other artists
ICON_PACKAGES = ("oxygen-icon-theme", "gnome-icon-theme", "adwaita-icon-theme", "papirus-icon-theme",
                 "breeze-icon-theme", "elementary-icon-theme", "librsvg2-bin")
ICON_PNG_SIZES = ("32", "48", "64", "128", "256")  # size folders read from the PNG themes
# At most this many (train, val) images per class: small enough that one 5-epoch run of
# EfficientNet-Lite0 at 64 px takes a few minutes on a shared 2-core machine.
PER_CLASS = {"digits": (50, 25), "icons": (60, 35), "glyphs": (50, 25)}
GLYPH_LETTERS = "ABCDEFGHIJ"
GLYPH_SIZE = 64
FONT_DIRS = ("/usr/share/fonts/truetype",)
FONT_PACKAGES = ("fonts-noto-core", "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation", "fonts-liberation2")


def package_versions(names) -> dict:
    versions = {}
    for name in names:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
        versions[name] = result.stdout.strip() if result.returncode == 0 else None
    return versions


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)  # Pillow writes no time chunk: same pixels, same bytes


def choose(items: list, count: int, seed: str) -> list:
    """A seeded subset of ``items`` (sorted first, so the result depends only on the set of files)."""
    items = sorted(items)
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    if len(items) <= count:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), count, replace=False))]


# --- digits -------------------------------------------------------------------------------------

def build_digits(root: Path) -> dict:
    from sklearn.datasets import load_digits
    import sklearn

    digits = load_digits()
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    train_max, val_max = PER_CLASS["digits"]
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == digit))[:train_max + val_max]
        num_val = val_max
        for position, index in enumerate(indices):
            split = "val" if position < num_val else "train"
            paper = np.pad(255 - digits.images[index] / 16.0 * 255, 1, constant_values=255).astype(np.uint8)
            save_png(Image.fromarray(paper, "L").resize((72, 72), Image.BICUBIC),
                     root / split / str(digit) / f"digit_{index:04d}.png")
            counts[split] += 1
    return {"source": "sklearn.datasets.load_digits", "scikit-learn": sklearn.__version__, "counts": counts}


# --- icons --------------------------------------------------------------------------------------

def icon_class(path: Path) -> str | None:
    name = path.name.rsplit(".", 1)[0]
    if name.endswith("-symbolic") or "-rtl" in name:
        return None  # one-colour silhouettes and mirrored copies: not a different drawing
    for label, pattern in ICON_CLASSES.items():
        if re.search(pattern, name):
            return label
    return None


def icon_files(theme: str, suffix: str) -> dict[str, list[Path]]:
    """``class -> files`` of one theme, symlinks resolved and duplicates (same bytes) dropped."""
    base = Path("/usr/share/icons") / theme
    found: dict[str, list[Path]] = {}
    seen: set[str] = set()
    if not base.is_dir():
        return found
    for path in sorted(base.rglob(f"*.{suffix}")):
        label = icon_class(path)
        if label is None:
            continue
        if suffix == "png" and not any(part.split("x")[0] in ICON_PNG_SIZES for part in path.parts):
            continue
        real = path.resolve()
        if not real.is_file():
            continue
        digest = hashlib.sha256(real.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        found.setdefault(label, []).append(real)
    return found


def png_icon(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGBA").resize((ICON_SIZE, ICON_SIZE), Image.LANCZOS)


def svg_icon(path: Path) -> Image.Image | None:
    result = subprocess.run(["rsvg-convert", "-w", str(ICON_SIZE), "-h", str(ICON_SIZE), "-f", "png", str(path)],
                            capture_output=True)
    if result.returncode != 0 or not result.stdout:
        return None
    with Image.open(io.BytesIO(result.stdout)) as image:
        return image.convert("RGBA")


def build_icons(root: Path) -> dict:
    if shutil.which("rsvg-convert") is None:
        sys.exit("icons: rsvg-convert is missing; run: apt-get install -y librsvg2-bin (and the icon themes)")
    train_max, val_max = PER_CLASS["icons"]
    sources: dict[str, list[str]] = {"train": [], "val": []}
    for split, themes, suffix, render in (("train", ICON_TRAIN_THEMES, "png", png_icon),
                                          ("val", ICON_VAL_THEMES, "svg", svg_icon)):
        pooled: dict[str, list[Path]] = {}
        for theme in themes:
            for label, files in icon_files(theme, suffix).items():
                pooled.setdefault(label, []).extend(files)
        for label in ICON_CLASSES:
            picked = choose([str(p) for p in pooled.get(label, [])], train_max if split == "train" else val_max,
                            f"icons-{split}-{label}")
            for index, source in enumerate(picked):
                image = render(Path(source))
                if image is None:
                    continue
                save_png(image, root / split / label / f"{label}_{index:04d}.png")
                sources[split].append(f"{label}\t{source}")
    counts = {split: len(files) for split, files in sources.items()}
    return {"train_themes": ICON_TRAIN_THEMES, "val_themes": ICON_VAL_THEMES,
            "packages": package_versions(ICON_PACKAGES), "counts": counts, "files": sources}


# --- glyphs -------------------------------------------------------------------------------------

def latin_fonts() -> list[Path]:
    """Font files that draw A-J and a-j as real, distinct glyphs (not the missing-glyph box)."""
    fonts = []
    for directory in FONT_DIRS:
        for path in sorted(Path(directory).rglob("*")):
            if path.suffix.lower() not in (".ttf", ".otf") or not path.is_file():
                continue
            try:
                font = ImageFont.truetype(str(path), 40)
                masks = {ch: bytes(font.getmask(ch)) for ch in GLYPH_LETTERS + GLYPH_LETTERS.lower() + "\uffff"}
            except OSError:
                continue
            missing = masks.pop("\uffff")
            if all(mask and mask != missing for mask in masks.values()) and len(set(masks.values())) == len(masks):
                fonts.append(path)
    return fonts


def family(path: Path) -> str:
    """The font family: the file name before the style (``NotoSerifDisplay-BoldItalic`` -> ``NotoSerifDisplay``)."""
    return re.split(r"[-_]", path.stem)[0]


def glyph(path: Path, letter: str, rng: np.random.Generator) -> Image.Image:
    """``letter`` in black on white, its height 55-75 % of the image, shifted a little at random."""
    size = GLYPH_SIZE
    font = ImageFont.truetype(str(path), int(size * rng.uniform(0.55, 0.75)))
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    x = (size - (right - left)) / 2 - left + rng.uniform(-4, 4)
    y = (size - (bottom - top)) / 2 - top + rng.uniform(-4, 4)
    draw.text((x, y), letter, fill=0, font=font)
    return image


def build_glyphs(root: Path) -> dict:
    fonts = latin_fonts()
    families = sorted({family(p) for p in fonts})
    # Every third family (in sorted order) is val/: whole families, so val letters are drawn by
    # designs the network never saw in training.
    val_families = set(families[1::3])
    rng = np.random.default_rng(0)
    sources: dict[str, list[str]] = {"train": [], "val": []}
    for split in ("train", "val"):
        split_fonts = [p for p in fonts if (family(p) in val_families) == (split == "val")]
        for letter in GLYPH_LETTERS:
            candidates = [f"{p}\t{case}" for p in split_fonts for case in (letter, letter.lower())]
            picked = choose(candidates, PER_CLASS["glyphs"][0 if split == "train" else 1], f"glyphs-{split}-{letter}")
            for index, entry in enumerate(picked):
                font_path, character = entry.split("\t")
                save_png(glyph(Path(font_path), character, rng), root / split / letter / f"{letter}_{index:04d}.png")
                sources[split].append(f"{letter}\t{character}\t{font_path}")
    counts = {split: len(files) for split, files in sources.items()}
    return {"fonts": len(fonts), "val_families": sorted(val_families),
            "train_families": sorted(set(families) - val_families),
            "packages": package_versions(FONT_PACKAGES), "counts": counts, "files": sources}


BUILDERS = {"digits": build_digits, "icons": build_icons, "glyphs": build_glyphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the sets into (one sub-folder per set)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    args = parser.parse_args(argv)
    for name in args.sets.split(","):
        if name not in BUILDERS:
            parser.error(f"unknown set {name!r}; choose from {', '.join(SETS)}")
        root = args.out / name
        shutil.rmtree(root, ignore_errors=True)  # rebuilt from scratch: no image of an earlier build lingers
        info = BUILDERS[name](root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "sources.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        print(f"{name}: {info['counts']['train']} train / {info['counts']['val']} val images in {root}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())

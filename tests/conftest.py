"""Shared test helpers: everything is tiny, generated in tmp_path, and offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores in CI: keep torch from oversubscribing them, and never reach for a network hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_image(path: Path, color: tuple[int, int, int], size: int = 32, mode: str = "RGB", noise_seed: int = 0):
    """Write an image of one dominant colour with a little seeded noise (so classes are learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(noise_seed)
    pixels = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255)
    image = Image.fromarray(pixels.astype("uint8"), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


CLASS_COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def make_image_folder(
    root: Path,
    classes=("red", "green", "blue"),
    per_class: int = 8,
    val_per_class: int | None = 3,
    size: int = 32,
    ext: str = "png",
) -> Path:
    """Build ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (or one tree when
    ``val_per_class`` is None) with colour-coded classes a tiny model learns in a few steps."""
    seed = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        if count is None:
            continue
        for name in classes:
            for index in range(count):
                base = root / split if val_per_class is not None else root
                make_image(base / name / f"{name}_{index}.{ext}", CLASS_COLORS[name], size=size, noise_seed=seed)
                seed += 1
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A train/val image folder with three colour classes, 8 train and 3 val images each, 32 px."""
    return make_image_folder(tmp_path / "data")


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="tests/test_fuzz_cli.py: run ten times as many hostile cases per sub-command")

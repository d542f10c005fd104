"""A dirty image folder trains: unreadable files are listed with their reason, odd-but-readable
ones reach the model as the right pixels, and ``--on-bad-image error`` stops at the first bad file.

Pixel values of each odd format through ``load_image`` are tested in test_data_images.py; here
they go through the path training really takes (``decode_to_uint8``, the decode-once cache).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from visiontune.cli import main

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet", "--augment", "none"]
BOMB_LIMIT = 5_000  # pixels; Pillow refuses images over twice its MAX_IMAGE_PIXELS, so the 120x120 one is a "bomb"
RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 30), (20, 30, 220), (255, 255, 255)

# readable but odd -> the colour the model must see at (row, column) of the decoded square
ODD = {
    "cmyk.jpg": [((16, 16), (255, 0, 0))],
    "gray16.png": [((16, 16), (128, 128, 128))],  # 32768 of 65535 scales to 128; clipping would give 255
    "rgba.png": [((16, 16), WHITE)],  # fully transparent: the background, not the hidden colour
    "palette.png": [((3, 16), WHITE), ((28, 16), BLUE)],  # top half uses the transparent index
    "exif_rotated.jpg": [((3, 16), RED), ((28, 16), BLUE)],  # stored sideways, upright after EXIF
    "animated.gif": [((16, 16), RED)],  # the first frame
    "chat noir été 1.png": [((16, 16), GREEN)],  # non-ASCII and spaces in the name
}
UNREADABLE = {  # file -> a word its reason must contain
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "notes.jpg": "not an image",
    "huge.png": "too large",
}


def _write_odd_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(folder / "gray16.png")
    Image.new("RGBA", (32, 32), (10, 200, 10, 0)).save(folder / "rgba.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([*GREEN, *BLUE] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 32, 16))  # index 0 (green in the palette) is the transparent one
    palette.save(folder / "palette.png", transparency=0)
    sideways = Image.new("RGB", (32, 16), BLUE)
    sideways.paste(RED, (0, 0, 16, 16))  # stored: left red, right blue; orientation 6 turns left to top
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (32, 32), color) for color in (RED, BLUE)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    make_image(folder / "chat noir été 1.png", GREEN, noise_seed=99)


def _write_unreadable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)  # noise: most bytes are scan data, after the header
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n")
    Image.new("RGB", (120, 120), RED).save(folder / "huge.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))  # hidden: not even looked at
    (folder / "._cmyk.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork beside an image


@pytest.fixture(scope="module")
def dirty_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dirty") / "data"
    for split, count in (("train", 5), ("val", 2)):
        for name, color in (("cat", RED), ("dog", BLUE)):
            for index in range(count):
                make_image(root / split / name / f"{name}_{index}.png", color, noise_seed=index + 10 * (split == "val"))
    _write_odd_images(root / "train" / "cat")
    _write_unreadable(root / "train" / "dog")
    return root


@pytest.mark.slow
def test_a_dirty_folder_trains_and_report_json_lists_each_unreadable_file(dirty_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(dirty_folder), *TINY, "--epochs", "1", "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    reasons = {Path(item["path"]).name: item["reason"] for item in report["bad_files"]}
    assert set(reasons) == set(UNREADABLE)  # hidden files are neither images nor "bad"
    for name, word in UNREADABLE.items():
        assert word in reasons[name].lower(), (name, reasons[name])
    assert report["data"]["train_images"] == 5 + 5 + len(ODD)  # every odd-but-readable one is used
    assert report["epochs_completed"] == 1


def test_odd_images_reach_training_as_the_expected_pixels(dirty_folder, monkeypatch):
    from visiontune.config import TrainConfig
    from visiontune.data import decode_to_uint8, discover
    from visiontune.training.setup import resolve_run_preprocessing

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    preprocessing = resolve_run_preprocessing(TrainConfig(model="timm:test_resnet", weights="none", image_size=32))
    samples = [sample for sample in discover(dirty_folder).train if sample.path.name in ODD]
    assert len(samples) == len(ODD)
    # exactly the call training_setup makes for a folder that fits in memory
    decoded = decode_to_uint8(samples, preprocessing.resize_size, crop_size=preprocessing.crop_size,
                              interpolation=preprocessing.interpolation)
    scale = preprocessing.resize_size / 32  # the squares are resize_size wide; the expectations are for 32
    for sample, image in zip(decoded.samples, decoded.images):
        for (row, column), expected in ODD[sample.path.name]:
            got = image[:, int(row * scale), int(column * scale)].tolist()
            assert all(abs(g - e) <= 12 for g, e in zip(got, expected)), (sample.path.name, (row, column), got)


def test_on_bad_image_error_stops_at_the_first_bad_file_and_names_it(dirty_folder, tmp_path, capsys, monkeypatch):
    from visiontune.data import discover

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    first_bad = next(s.path for s in discover(dirty_folder).train if s.path.name in UNREADABLE)
    run_dir = tmp_path / "run"
    status = main(["train", "--data", str(dirty_folder), *TINY, "--epochs", "1", "--on-bad-image", "error",
                   "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(first_bad) in err and UNREADABLE[first_bad.name] in err.lower()
    assert not run_dir.exists()  # stopped before the run folder was made

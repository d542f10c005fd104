"""load_image and check_images: every image mode converts to the expected pixels; bad files are named."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from visiontune.data import BadImageError, Sample, check_images, load_image
from visiontune.errors import ConfigError, DataError

WHITE = (255, 255, 255)


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def jpeg_bytes(size=(64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_rgba_transparent_pixels_become_background_not_their_hidden_colour(tmp_path: Path):
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (12, 34, 56, 0)  # fully transparent, with an arbitrary colour hidden underneath
    pixels[:, 4:] = (200, 10, 10, 255)  # opaque red
    pixels[0, 4] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert pixel(image, 0, 3) == WHITE
    assert pixel(image, 6, 3) == (200, 10, 10)
    assert all(abs(v - 127) <= 1 for v in pixel(image, 4, 0))
    assert pixel(load_image(path, background=(0, 0, 0)), 0, 3) == (0, 0, 0)


def test_gray_with_alpha_is_composited(tmp_path: Path):
    pixels = np.zeros((4, 4, 2), dtype=np.uint8)
    pixels[:, :2] = (90, 0)
    pixels[:, 2:] = (90, 255)
    path = tmp_path / "la.png"
    Image.fromarray(pixels, "LA").save(path)
    image = load_image(path)
    assert pixel(image, 0, 0) == WHITE and pixel(image, 3, 0) == (90, 90, 90)


def test_palette_png_with_transparent_index_becomes_background(tmp_path: Path):
    image = Image.new("P", (6, 6), 1)
    image.putpalette([10, 200, 30, 220, 20, 20] + [0, 0, 0] * 254)
    for x in range(3):
        for y in range(6):
            image.putpixel((x, y), 0)  # index 0 (green in the palette) is the transparent one
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = load_image(path)
    assert pixel(loaded, 0, 0) == WHITE
    assert pixel(loaded, 5, 5) == (220, 20, 20)


def test_animated_gif_gives_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(path)
    red, green, blue = pixel(image, 4, 4)
    assert red > 200 and green < 40 and blue < 40


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_gives_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert pixel(load_image(path), 4, 4) == (250, 0, 0)


def test_16_bit_gray_is_scaled_not_clipped(tmp_path: Path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert [pixel(image, x, 0) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_16_bit_big_endian_and_32_bit_integer_tiffs(tmp_path: Path):
    big_endian = tmp_path / "gray16b.tiff"
    Image.frombytes("I;16B", (2, 1), np.array([32768, 65535], dtype=">u2").tobytes()).save(big_endian)
    assert [pixel(load_image(big_endian), x, 0)[0] for x in range(2)] == [128, 255]
    int32 = tmp_path / "gray32.tiff"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(int32)
    assert [pixel(load_image(int32), x, 0)[0] for x in range(2)] == [0, 255]


def test_float_image_in_unit_range_is_scaled(tmp_path: Path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)
    assert [pixel(load_image(path), x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_grayscale_and_bilevel_become_rgb(tmp_path: Path):
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 4), 77).save(gray)
    assert pixel(load_image(gray), 1, 1) == (77, 77, 77)
    bilevel = tmp_path / "bw.png"
    Image.new("1", (4, 4), 1).save(bilevel)
    assert pixel(load_image(bilevel), 1, 1) == WHITE


def test_cmyk_jpeg_converts_near_expected_rgb(tmp_path: Path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    assert Image.open(path).mode == "CMYK"
    red, green, blue = pixel(load_image(path), 8, 8)
    assert red > 235 and green < 20 and blue < 20


def test_exif_orientation_6_rotates_upright(tmp_path: Path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (250, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 250)  # right half blue
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)

    upright = load_image(path)
    assert upright.size == (20, 40)  # width and height swapped
    assert pixel(upright, 10, 5)[0] > 200  # the left edge is now on top
    assert pixel(upright, 10, 35)[2] > 200


def test_non_ascii_name_with_spaces(tmp_path: Path):
    path = tmp_path / "café au lait ü.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    assert pixel(load_image(path), 0, 0) == (1, 2, 3)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a picture\n" * 20, "not an image"),
        ("header_only.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an image"),
    ],
)
def test_unreadable_files_raise_bad_image_error(tmp_path: Path, name: str, content: bytes, reason: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    assert isinstance(caught.value, DataError)
    assert caught.value.path == str(path) and reason in caught.value.reason
    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_bad(tmp_path: Path):
    data = jpeg_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    Image.open(path).verify()  # why verify() is not enough: it accepts this file
    with pytest.raises(BadImageError, match="truncated"):
        load_image(path)


def test_png_with_corrupt_pixel_data_is_bad(tmp_path: Path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside the compressed IDAT stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="corrupt"):
        load_image(path)


def test_missing_file_is_bad(tmp_path: Path):
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("limit", [100, 300])  # 400 px: above 2x limit Pillow raises, between 1x-2x it only warns
def test_decompression_bomb_is_bad(tmp_path: Path, monkeypatch, limit: int):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20), (5, 5, 5)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.warns(Image.DecompressionBombWarning) if limit == 300 else _no_warning_check():
        with pytest.raises(BadImageError, match="too large"):
            load_image(path)


class _no_warning_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dirty_samples(tmp_path: Path) -> list[Sample]:
    good = [tmp_path / f"good_{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(path)
    empty, truncated = tmp_path / "empty.jpg", tmp_path / "truncated.jpg"
    empty.write_bytes(b"")
    data = jpeg_bytes(seed=1)
    truncated.write_bytes(data[: len(data) // 2])
    paths = [good[0], empty, good[1], truncated, good[2]]
    return [Sample(path, i % 2) for i, path in enumerate(paths)]


@pytest.mark.parametrize("workers", [1, 3])
def test_check_images_skips_and_lists_bad_files_in_order(tmp_path: Path, workers: int):
    samples = _dirty_samples(tmp_path)
    good, bad = check_images(samples, "skip", workers=workers)
    assert good == [samples[0], samples[2], samples[4]]
    assert [Path(path).name for path, _ in bad] == ["empty.jpg", "truncated.jpg"]
    assert "empty" in bad[0][1] and "truncated" in bad[1][1]


def test_check_images_error_names_first_bad_file(tmp_path: Path):
    samples = _dirty_samples(tmp_path)
    with pytest.raises(BadImageError, match="empty.jpg"):
        check_images(samples, "error", workers=2)


def test_check_images_rejects_unknown_policy(tmp_path: Path):
    with pytest.raises(ConfigError, match="skip, error"):
        check_images([], "ignore")


def test_dirty_image_folder_end_to_end(tmp_path: Path, monkeypatch):
    """Issue 7's dirty folder: discover ignores hidden files; check_images keeps every readable-but-odd
    file and lists each unreadable one with its reason."""
    from visiontune.data import discover

    odd = tmp_path / "data" / "train" / "odd"
    plain = tmp_path / "data" / "train" / "plain"
    odd.mkdir(parents=True)
    plain.mkdir(parents=True)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(odd / "gray16.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(odd / "rgba.png")
    Image.new("P", (8, 8), 0).save(odd / "palette.png", transparency=0)
    Image.new("RGB", (8, 8)).save(odd / "anim.gif", save_all=True, append_images=[Image.new("RGB", (8, 8), (9, 9, 9))])
    Image.new("RGB", (8, 8), (3, 4, 5)).save(odd / "photo ü ñ.png")
    Image.new("RGB", (100, 100)).save(plain / "huge.png")  # 10,000 px: over the lowered bomb limit below
    Image.new("RGB", (8, 8)).save(plain / "ok.png")
    (plain / "empty.jpg").write_bytes(b"")
    (plain / "text.jpg").write_text("hello")
    data = jpeg_bytes()
    (plain / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (plain / ".DS_Store").write_bytes(b"\x00")
    Image.new("RGB", (8, 8)).save(plain / "._ok.png")

    split = discover(tmp_path / "data", val_split=0.5)
    all_samples = split.train + split.val
    assert ".DS_Store" not in names_of(all_samples) and "._ok.png" not in names_of(all_samples)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # the other images have at most 3,072 px
    good, bad = check_images(all_samples, "skip", workers=2)
    assert sorted(names_of(good)) == sorted(
        ["anim.gif", "cmyk.jpg", "gray16.png", "ok.png", "palette.png", "photo ü ñ.png", "rgba.png"]
    )
    reasons = {Path(path).name: reason for path, reason in bad}
    assert set(reasons) == {"empty.jpg", "huge.png", "text.jpg", "truncated.jpg"}
    assert "too large" in reasons["huge.png"] and "truncated" in reasons["truncated.jpg"]


def names_of(samples: list[Sample]) -> list[str]:
    return [sample.path.name for sample in samples]


def test_directory_instead_of_file_is_bad(tmp_path: Path):
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()
    with pytest.raises(BadImageError, match="cannot open"):
        load_image(folder)

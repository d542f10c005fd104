"""Reading one image file into an RGB picture, whatever its format and mode, or saying why not.

Real folders hold RGBA screenshots, palette GIFs with a transparent colour, 16-bit scans, CMYK
print JPEGs, sideways phone photos, empty files and text files named ``.jpg``. :func:`load_image`
turns every readable one into the same thing (an 8-bit RGB ``PIL.Image``, upright, transparent
pixels set to a background colour) and every unreadable one into a :class:`BadImageError` with
a reason a person understands.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Extensions scanned in image folders (lower case). Files listed in a CSV manifest are read whatever
# their extension, since the user named them explicitly.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
BAD_IMAGE_POLICIES = ("skip", "error")
RGB = tuple[int, int, int]
DEFAULT_BACKGROUND: RGB = (255, 255, 255)  # what transparent pixels become; exported models' metadata says so

# Modes whose samples are wider than 8 bits; converted by value range, never by clipping.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class BadImageError(DataError):
    """A file that cannot be decoded into an image (empty, truncated, not an image, too large)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}. "
            "Remove or replace the file, or use --on-bad-image skip to leave unreadable images out."
        )


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (hidden files such as ``._x.jpg`` are skipped)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_image(path: str | Path, background: RGB = DEFAULT_BACKGROUND) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB image; raise :class:`BadImageError` if it cannot be read.

    Transparent pixels are alpha-composited onto ``background`` (fully transparent ones become
    exactly ``background``); 16-bit and float images are scaled to 8 bits; CMYK is converted; the
    EXIF orientation is applied; of an animated GIF/WebP the first frame is used.
    """
    return _decode(Path(path), background, draft_size=None)


def load_image_bytes(data: bytes, name: str, background: RGB = DEFAULT_BACKGROUND) -> Image.Image:
    """:func:`load_image` for an image held in memory (a shard's sample, a dataset row's bytes);
    ``name`` says where it came from in a :class:`BadImageError`."""
    return _decode(Path(name), background, draft_size=None, data=data)


def to_rgb(image: Image.Image, background: RGB = DEFAULT_BACKGROUND) -> Image.Image:
    """An already decoded picture (a dataset row's) as 8-bit RGB, by :func:`load_image`'s rules."""
    return _to_rgb(image, background)


def _decode(path: Path, background: RGB, draft_size: int | None, data: bytes | None = None) -> Image.Image:
    """Open, fully decode and convert ``path`` (or ``data``, named ``path``). ``draft_size`` lets JPEG
    decode at reduced scale (still reading every byte, so truncation is caught) when only validity matters."""
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            _check_pixel_count(path, image)
            if draft_size is not None and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            image.load()  # decode now: truncated data fails here, not later in a worker
            upright = _exif_transpose(path, image)
            return _to_rgb(upright, background)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file (unknown or unsupported format)") from None
    except (PermissionError, IsADirectoryError) as error:
        raise BadImageError(path, f"cannot open the file ({error.strerror})") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as error:
        # Pillow's plugins signal corrupt data with all of these; the message says which part broke.
        raise BadImageError(path, f"corrupt or truncated ({type(error).__name__}: {error})") from None


def _check_pixel_count(path: Path, image: Image.Image) -> None:
    """Refuse images above Pillow's decompression-bomb limit.

    Pillow only *warns* between 1x and 2x ``Image.MAX_IMAGE_PIXELS``; checking here makes the
    warning range a bad image too, without touching the process-wide warning filters."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        raise BadImageError(path, f"too large to decode safely ({width}x{height} pixels > limit {limit})")


def _exif_transpose(path: Path, image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block only costs the rotation, not the image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - any EXIF parsing failure is recoverable
        logger.warning("ignoring unreadable EXIF orientation in %s: %s", path, error)
        return image.copy()


def _to_rgb(image: Image.Image, background: RGB) -> Image.Image:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite(image.convert("RGBA"), background)
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _composite(rgba: Image.Image, background: RGB) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale integer or float samples to 8 bits by their nominal range.

    Integer images within [0, 65535] are 16-bit (Pillow gives 16-bit PNGs mode ``I;16`` or ``I``):
    65535 -> 255, 32768 -> 128. Float images within [0, 1] are scaled by 255, within [0, 255] kept.
    Anything else (signed or wider data) is stretched from its minimum to its maximum."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        else:
            scaled = _stretch(values)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        return Image.fromarray(np.rint(_stretch(values)).astype(np.uint8), "L")
    # Integer rounding of v * 255 / 65535 (= v / 257): exact for every 16-bit value.
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape)
    return (values - low) * (255.0 / (high - low))


def check_images(
    samples: Iterable, on_bad_image: str = "skip", workers: int | None = None
) -> tuple[list, list[tuple[str, str]]]:
    """Decode every sample's file once; return ``(good samples, [(path, reason), ...])``.

    Each file is fully decoded (a truncated JPEG usually passes ``Image.verify()``, so verify alone
    is not enough); JPEGs decode at reduced DCT scale, which still reads every byte. With
    ``on_bad_image="error"`` the first bad file in sample order raises :class:`BadImageError`.
    Works on any objects with a ``.path`` attribute (e.g. :class:`~visiontune.data.Sample`)."""
    check_bad_image_policy(on_bad_image)
    samples = list(samples)

    def probe(sample) -> str | None:
        try:
            _decode(Path(sample.path), DEFAULT_BACKGROUND, draft_size=64)
        except BadImageError as error:
            return error.reason
        return None

    good, bad = [], []
    for sample, reason in zip(samples, map_in_threads(probe, samples, workers)):
        if reason is None:
            good.append(sample)
            continue
        if on_bad_image == "error":
            raise BadImageError(sample.path, reason)
        bad.append((str(sample.path), reason))
    if bad:
        logger.warning("skipping %d unreadable image(s) of %d, first: %s (%s)", len(bad), len(samples), *bad[0])
    return good, bad


def check_bad_image_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"unknown on_bad_image {on_bad_image!r}; choose one of: {', '.join(BAD_IMAGE_POLICIES)}")


def default_workers() -> int:
    """Threads for decoding: the CPUs this process may use (Pillow releases the GIL while decoding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


T = TypeVar("T")
R = TypeVar("R")


def map_in_threads(function: Callable[[T], R], items: list[T], workers: int | None = None) -> Iterator[R]:
    """``map(function, items)`` on a thread pool, results in input order; stops early if abandoned."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="visiontune-decode")
    try:
        yield from executor.map(function, items)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def prepared_batches(prepare: Callable[[Path], R], paths: Sequence, batch_size: int,
                     skipped: list[tuple[str, str]]) -> Iterator[tuple[list, list[R]]]:
    """``(paths, prepared images)`` per batch of ``paths``, ``prepare`` (load and transform one file)
    run on threads. A file it cannot read (:class:`BadImageError`) goes to ``skipped`` as
    ``(path, reason)`` and out of the batch. Shared by the PyTorch and the torch-free ONNX predict."""
    def attempt(path) -> R | BadImageError:
        try:
            return prepare(path)
        except BadImageError as error:
            return error

    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        good, prepared = [], []
        for path, result in zip(chunk, map_in_threads(attempt, chunk)):
            if isinstance(result, BadImageError):
                # info: the caller gets ``skipped`` and the CLI prints each once
                logger.info("skipping unreadable image %s (%s)", path, result.reason)
                skipped.append((str(path), result.reason))
            else:
                good.append(path)
                prepared.append(result)
        if prepared:
            yield good, prepared

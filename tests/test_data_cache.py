"""Decode once: cached uint8 tensors give the same inputs as decoding the files every epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data import (
    BadImageError,
    ImageDataset,
    InMemoryDataset,
    Sample,
    build_transforms,
    decode_to_uint8,
    decoded_bytes,
    fits_in_memory,
)
from visiontune.data.transforms import _square_offset
from visiontune.model.preprocessing import Preprocessing

# resize - crop is odd (31 - 24 = 7): torchvision's rounded centre offsets then disagree with a
# plain centre square for some widths, which the cache must compensate for.
PREPROCESSING = Preprocessing(crop_size=24, resize_size=31)
SIZES = [(40, 40), (47, 31), (31, 60), (83, 41), (64, 33), (33, 97), (50, 70)]


def make_samples(root: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for index, (width, height) in enumerate(SIZES):
        gradient = np.linspace(0, 180, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
        pixels = (gradient + rng.integers(0, 16, (height, width, 3))).astype(np.uint8)
        path = root / f"img_{index}.{'jpg' if index % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        samples.append(Sample(path, index % 3))
    return samples


def test_square_offset_compensates_rounding():
    # width 302 after resizing to 255, crop 224: the whole-image crop starts at round(78/2) = 39;
    # cutting the square at the plain centre round(47/2) = 24 would put it at 24 + round(31/2) = 40.
    assert _square_offset(302, 255, 224) == 23
    assert 23 + round((255 - 224) / 2) == round((302 - 224) / 2)
    assert _square_offset(255, 255, 224) == 0


@pytest.mark.parametrize("workers", [1, 3])
def test_eval_outputs_equal_decoding_every_epoch(tmp_path: Path, workers: int):
    """Exact equality (tolerance 0): both paths resize with the same Pillow call, and the cached
    square plus CenterCrop selects exactly the pixels CenterCrop takes from the whole image."""
    samples = make_samples(tmp_path)
    _, evaluation = build_transforms(PREPROCESSING, "none")
    decoded = decode_to_uint8(
        samples, PREPROCESSING.resize_size, workers,
        crop_size=PREPROCESSING.crop_size, interpolation=PREPROCESSING.interpolation,
    )
    assert decoded.images.shape == (len(SIZES), 3, 31, 31) and decoded.images.dtype == torch.uint8
    from_files, from_memory = ImageDataset(samples, evaluation), InMemoryDataset.from_decoded(decoded, evaluation)
    for index in range(len(samples)):
        (expected, label), (actual, cached_label) = from_files[index], from_memory[index]
        assert label == cached_label
        assert torch.equal(actual, expected), f"image {index} of size {SIZES[index]} differs"


def test_bad_files_are_skipped_and_rows_stay_aligned(tmp_path: Path):
    samples = make_samples(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    mixed = samples[:2] + [Sample(broken, 2)] + samples[2:4]
    decoded = decode_to_uint8(mixed, 31, workers=2)
    assert decoded.samples == samples[:4]
    assert decoded.labels.tolist() == [s.label for s in samples[:4]]
    assert decoded.bad == [(str(broken), decoded.bad[0][1])] and "not an image" in decoded.bad[0][1]
    reference = decode_to_uint8(samples[:4], 31, workers=1)
    assert torch.equal(decoded.images, reference.images)  # compacting moved the rows after the hole
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_to_uint8(mixed, 31, workers=1, on_bad_image="error")


def test_train_augmentation_runs_on_cached_uint8(tmp_path: Path):
    decoded = decode_to_uint8(make_samples(tmp_path)[:3], 31)
    train, _ = build_transforms(PREPROCESSING, "trivial")
    dataset = InMemoryDataset(decoded.images, decoded.labels, train)
    image, label = dataset[1]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == 1
    assert dataset.targets == [0, 1, 2]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    batch, labels = next(iter(loader))
    assert batch.shape == (3, 3, 24, 24) and labels.tolist() == [0, 1, 2]


def test_in_memory_dataset_validates_inputs():
    with pytest.raises(ValueError, match="uint8"):
        InMemoryDataset(torch.zeros(2, 3, 4, 4), [0, 1], None)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        InMemoryDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0], None)


def test_memory_estimate():
    assert decoded_bytes(10, 256) == 10 * 3 * 256 * 256
    assert fits_in_memory(10, 32)
    assert not fits_in_memory(10**9, 256)  # 196 TB


def test_crop_larger_than_cache_is_refused(tmp_path: Path):
    from visiontune.errors import ConfigError

    with pytest.raises(ConfigError, match="resize_size >= crop_size"):
        decode_to_uint8(make_samples(tmp_path)[:1], 24, crop_size=32)

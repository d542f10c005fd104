"""Decode once: keep every image decoded, resized and as uint8 in memory for all epochs.

Decoding a JPEG and resizing it costs more than the rest of a small model's input pipeline; for a
dataset that fits in memory, :func:`decode_to_uint8` does it once, up front, on a thread pool
(Pillow releases the GIL), and :class:`InMemoryDataset` serves the tensors to the transforms.
Up front rather than "during the first epoch" because data-loader workers are separate processes:
what a worker caches never reaches the main process or the next epoch's workers.

What is stored: what :class:`~visiontune.data.transforms.EvalTransform` computes from a picture
before its centre crop, by the same function (:func:`~visiontune.data.transforms.resize_to_square`):
the image resized by Pillow so its short side is ``size`` (the weights' ``resize_size``), then cut
to a ``size x size`` square whose offset makes ``CenterCrop(crop_size)`` land on exactly the pixels
it would take from the full resized image. So the evaluation transform gives bit-identical tensors
here, on files (:class:`~visiontune.data.ImageDataset`), in ``evaluate`` and in ``predict``.
Random augmentation (RandomResizedCrop) then samples from the central square only, which loses
the far ends of wide images: a documented trade-off for bounded, stackable memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from visiontune.data.images import (DEFAULT_BACKGROUND, RGB, BadImageError, check_bad_image_policy, load_image,
                                    map_in_threads)
from visiontune.data.samples import Sample
from visiontune.data.transforms import TrainTransform, interpolation_mode, resize_to_square
from visiontune.errors import ConfigError
from visiontune.memory import MemoryBudget

logger = logging.getLogger(__name__)


@dataclass
class DecodedImages:
    """Decoded images of the readable samples, in sample order, and the files left out."""

    images: torch.Tensor  # uint8, shape (N, 3, size, size)
    labels: torch.Tensor  # int64, shape (N,)
    samples: list[Sample]  # the N readable samples, aligned with ``images``
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files


# Free disk space left after spilling, as a fraction of what the spill takes: room for logs, checkpoints, caches.
SPILL_HEADROOM = 0.1


def decoded_bytes(num_images: int, size: int) -> int:
    """Bytes that ``num_images`` decoded RGB uint8 squares of side ``size`` take."""
    return num_images * 3 * size * size


def fits_in_memory(num_images: int, size: int, budget: MemoryBudget | None = None) -> bool:
    """Whether ``num_images`` decoded squares of side ``size`` fit in what is left of ``budget``
    (default: a budget of its own, :data:`~visiontune.memory.MEMORY_FRACTION` of the available RAM).
    Only checks; the caller claims the bytes when it decodes."""
    budget = budget if budget is not None else MemoryBudget.from_available()
    return budget.fits(decoded_bytes(num_images, size))


def fits_on_disk(nbytes: int, folder: str | os.PathLike) -> bool:
    """Whether ``nbytes`` of decoded images (plus :data:`SPILL_HEADROOM`) fit on the disk of ``folder``."""
    folder = Path(folder)
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path("/"))
    try:
        return shutil.disk_usage(existing).free >= nbytes * (1 + SPILL_HEADROOM)
    except OSError:
        return False


def decode_to_uint8(
    samples: Sequence[Sample],
    size: int,
    workers: int | None = None,
    *,
    crop_size: int | None = None,
    interpolation: str = "bilinear",
    on_bad_image: str = "skip",
    background: RGB = DEFAULT_BACKGROUND,
    spill_dir: str | os.PathLike | None = None,
) -> DecodedImages:
    """Decode, resize (short side to ``size``) and square-crop every sample once, into one uint8 tensor.

    Pass the weights' ``resize_size`` as ``size``, their ``crop_size`` and ``interpolation``: then the
    evaluation transform on these tensors equals it on the files, pixel for pixel. Unreadable files
    are skipped and listed in ``bad`` (``on_bad_image="skip"``) or raise (``"error"``), so this pass
    can replace :func:`~visiontune.data.check_images`.

    ``spill_dir``: the images go into a memory-mapped file there instead of RAM (the run's memory
    budget had no room): the page cache keeps what it can, the disk the rest, and every epoch still
    skips decoding. The file is unlinked as soon as it is mapped, so nothing is left behind."""
    check_bad_image_policy(on_bad_image)
    if crop_size is not None and crop_size > size:
        raise ConfigError(
            f"crop size {crop_size} is larger than the resize size {size}; the in-memory cache needs "
            "resize_size >= crop_size (or decode from files with ImageDataset)"
        )
    samples = list(samples)
    mode = interpolation_mode(interpolation)
    images = _allocate((len(samples), 3, size, size), spill_dir)

    def decode(index: int) -> str | None:
        try:
            picture = load_image(samples[index].path, background)
        except BadImageError as error:
            return error.reason
        images[index] = resize_to_square(picture, size, crop_size or size, mode)  # as EvalTransform does
        return None

    kept, bad = [], []
    for index, reason in zip(range(len(samples)), map_in_threads(decode, list(range(len(samples))), workers)):
        if reason is None:
            kept.append(index)
        elif on_bad_image == "error":
            raise BadImageError(samples[index].path, reason)
        else:
            bad.append((str(samples[index].path), reason))
    if bad:
        logger.warning("skipped %d unreadable image(s) of %d, first: %s (%s)", len(bad), len(samples), *bad[0])
    _compact(images, kept)
    good = [samples[index] for index in kept]
    return DecodedImages(
        images=images[: len(kept)],
        labels=torch.tensor([sample.label for sample in good], dtype=torch.int64),
        samples=good,
        bad=bad,
    )


def _allocate(shape: tuple[int, int, int, int], spill_dir: str | os.PathLike | None) -> torch.Tensor:
    """A uint8 tensor in RAM, or backed by an (already unlinked) memory-mapped file in ``spill_dir``."""
    if spill_dir is None or shape[0] == 0:
        return torch.empty(shape, dtype=torch.uint8)
    Path(spill_dir).mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="decoded-", suffix=".u8", dir=spill_dir)
    try:
        os.ftruncate(handle, int(np.prod(shape)))
        mapped = np.memmap(name, dtype=np.uint8, mode="r+", shape=shape)
    finally:
        os.close(handle)
        os.unlink(name)  # the mapping keeps the data; the name goes, so a crash leaves no file
    return torch.from_numpy(mapped)


def _compact(images: torch.Tensor, kept: list[int]) -> None:
    """Move the kept rows to the front in place (dest <= source, so no row is overwritten early)."""
    for destination, source in enumerate(kept):
        if destination != source:
            images[destination].copy_(images[source])


class InMemoryDataset(torch.utils.data.Dataset):
    """Decoded uint8 images served from memory: ``dataset[i] -> (transform(images[i]), label)``.

    ``transform`` must accept a uint8 ``CHW`` tensor; the ones from
    :func:`~visiontune.data.build_transforms` do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], transform: Callable | None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = [int(label) for label in labels]  # what samplers and class weights read
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        self.transform = transform

    @classmethod
    def from_decoded(cls, decoded: DecodedImages, transform: Callable | None) -> "InMemoryDataset":
        return cls(decoded.images, decoded.labels, transform)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]

    def get_batch(self, indices: Sequence[int], before_each: Callable[[int], None] | None = None) -> list[tuple]:
        """``[self[i] for i in indices]``, the same tensors: with a :class:`TrainTransform` each image
        is augmented on its own and the batch is converted and normalised once, stacked (the
        per-image calls cost more than the arithmetic at small image sizes).
        ``before_each(position)`` runs before the ``position``-th image's transform (the training
        sampler seeds each image's augmentation there)."""
        transform = self.transform
        if not isinstance(transform, TrainTransform) or not indices:
            items = []
            for position, index in enumerate(indices):
                if before_each is not None:
                    before_each(position)
                items.append(self[index])
            return items
        augmented = []
        for position, index in enumerate(indices):
            if before_each is not None:
                before_each(position)
            augmented.append(transform.augment(self.images[index]))
        images = transform.finish_batch(torch.stack(augmented))
        return list(zip(images.unbind(0), (self.targets[index] for index in indices)))

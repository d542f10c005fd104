"""Data: finding labelled images, reading any image file, transforms, and decode-once caching.

``discover`` finds classes and a train/val split; ``check_images`` leaves out unreadable files;
``ImageDataset`` reads files every epoch, ``decode_to_uint8`` + ``InMemoryDataset`` decode once;
``build_transforms`` gives the weights' evaluation preprocessing and the training augmentation.
"""

from visiontune.data.decoded_cache import (
    DecodedImages,
    InMemoryDataset,
    decode_to_uint8,
    decoded_bytes,
    fits_in_memory,
    fits_on_disk,
)
from visiontune.data.datasets import ImageDataset, discover, list_images, scan_labelled
from visiontune.data.images import (
    BAD_IMAGE_POLICIES,
    IMAGE_EXTENSIONS,
    BadImageError,
    check_images,
    is_image_file,
    load_image,
)
from visiontune.data.samples import DatasetSplit, Sample
from visiontune.data.transforms import (
    AUGMENTATIONS,
    build_batch_mixer,
    build_eval_transform,
    build_transforms,
    is_deterministic,
)
from visiontune.memory import available_memory_bytes  # re-exported: it lived here before memory.py

__all__ = [
    "AUGMENTATIONS",
    "BAD_IMAGE_POLICIES",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "DatasetSplit",
    "DecodedImages",
    "ImageDataset",
    "InMemoryDataset",
    "Sample",
    "available_memory_bytes",
    "build_batch_mixer",
    "build_eval_transform",
    "build_transforms",
    "check_images",
    "decode_to_uint8",
    "decoded_bytes",
    "discover",
    "fits_in_memory",
    "fits_on_disk",
    "is_deterministic",
    "is_image_file",
    "list_images",
    "load_image",
    "scan_labelled",
]

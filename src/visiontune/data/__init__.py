"""Data: finding labelled images, reading any image file, transforms, and decode-once caching.

``discover`` finds classes and a train/val split; ``check_images`` leaves out unreadable files;
``ImageDataset`` reads files every epoch, ``decode_to_uint8`` + ``InMemoryDataset`` decode once;
``build_transforms`` gives the weights' evaluation preprocessing and the training augmentation.

The names are imported lazily (as ``visiontune/__init__.py`` does): ``visiontune.data.images``
needs only Pillow and NumPy, and the ONNX Runtime backend (``visiontune.run.onnx_backend``) reads
images through it on machines without torch, so importing this package must not import torch.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "DecodedImages": "visiontune.data.decoded_cache",
    "InMemoryDataset": "visiontune.data.decoded_cache",
    "decode_to_uint8": "visiontune.data.decoded_cache",
    "decoded_bytes": "visiontune.data.decoded_cache",
    "fits_in_memory": "visiontune.data.decoded_cache",
    "fits_on_disk": "visiontune.data.decoded_cache",
    "ImageDataset": "visiontune.data.datasets",
    "discover": "visiontune.data.datasets",
    "list_images": "visiontune.data.datasets",
    "scan_labelled": "visiontune.data.datasets",
    "BAD_IMAGE_POLICIES": "visiontune.data.images",
    "IMAGE_EXTENSIONS": "visiontune.data.images",
    "BadImageError": "visiontune.data.images",
    "check_images": "visiontune.data.images",
    "is_image_file": "visiontune.data.images",
    "load_image": "visiontune.data.images",
    "DatasetSplit": "visiontune.data.samples",
    "Sample": "visiontune.data.samples",
    "AUGMENTATIONS": "visiontune.data.transforms",
    "build_batch_mixer": "visiontune.data.transforms",
    "build_eval_transform": "visiontune.data.transforms",
    "build_transforms": "visiontune.data.transforms",
    "is_deterministic": "visiontune.data.transforms",
    "available_memory_bytes": "visiontune.memory",  # re-exported: it lived here before memory.py
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'visiontune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

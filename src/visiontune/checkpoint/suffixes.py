"""The file suffixes visiontune reads and writes weights under, in one place.

Reading never trusts a suffix (:func:`visiontune.checkpoint.io.sniff_format` looks at the bytes);
the suffix only decides whether a ``--weights`` value names a file rather than a zoo weights name,
and which container :func:`visiontune.checkpoint.save_weights` writes.
"""

from __future__ import annotations

SAFETENSORS_SUFFIX = ".safetensors"  # tensors only, no code: the recommended format
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # torch.save files, read with weights_only=True
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)


def has_weight_suffix(name: str) -> bool:
    """Whether ``name`` ends like a weights file (``model.safetensors``, ``resnet.pth``, ...)."""
    return name.endswith(WEIGHT_SUFFIXES)

"""How images must be prepared for a given set of pretrained weights.

Resolved from the weights' own metadata (torchvision ``weights.transforms()``, timm
``pretrained_cfg``) by :func:`visiontune.model.create.resolve_preprocessing`; consumed by the data
transforms, written into every run folder, and shipped next to exported models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from visiontune.errors import ConfigError

MAX_SIZE = 16_384  # pixels per side a preprocessing.json may name; more is a damaged file, not a model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize the short side to ``resize_size``, centre-crop
    ``crop_size``, scale to [0, 1], then normalise with ``mean``/``std`` (per RGB channel)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" | "nearest"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        """Read back :meth:`to_dict`; a damaged or hand-edited file (a missing key, size 0, zero std,
        NaN, two channels) is a ConfigError here, not a crash or silent NaN outputs later."""
        try:
            preprocessing = cls(
                crop_size=int(values["crop_size"]),
                resize_size=int(values["resize_size"]),
                mean=tuple(float(v) for v in values["mean"]),
                std=tuple(float(v) for v in values["std"]),
                interpolation=str(values.get("interpolation", "bilinear")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ConfigError(f"preprocessing.json values {str(values)[:200]} are not valid ({error!r}); expected "
                              "keys crop_size, resize_size, mean, std, interpolation") from None
        sizes_ok = 0 < preprocessing.crop_size <= MAX_SIZE and 0 < preprocessing.resize_size <= MAX_SIZE
        channels_ok = len(preprocessing.mean) == len(preprocessing.std) in (1, 3)  # grey or RGB
        numbers_ok = all(math.isfinite(v) for v in preprocessing.mean + preprocessing.std) and \
            all(v > 0 for v in preprocessing.std)
        if not (sizes_ok and channels_ok and numbers_ok):
            raise ConfigError(f"preprocessing.json values {str(values)[:200]} are not valid: need positive crop_size "
                              f"and resize_size up to {MAX_SIZE}, finite mean values and positive std values, "
                              "three (RGB) or one each")
        return preprocessing

    def with_image_size(self, image_size: int) -> "Preprocessing":
        """Same normalisation at another crop size, keeping the weights' resize/crop ratio."""
        ratio = self.resize_size / self.crop_size
        return Preprocessing(image_size, max(image_size, round(image_size * ratio)), self.mean, self.std, self.interpolation)

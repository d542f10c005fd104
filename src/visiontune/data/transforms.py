"""Image transforms: the weights' evaluation preprocessing, training augmentation, batch mixing.

Every transform accepts a ``PIL.Image`` (from :class:`~visiontune.data.ImageDataset`) or a uint8
``CHW`` tensor (from :class:`~visiontune.data.InMemoryDataset`) and returns a plain float tensor.
Geometric steps run before ``ToImage`` so that a PIL input is resized by Pillow, exactly as
torchvision's ``weights.transforms()`` does.

:class:`EvalTransform` is the one implementation of the evaluation preprocessing: the run's own
validation, ``evaluate``, ``predict``, ``load_run().predict`` and the inputs that verify an exported
model all call it (after :func:`~visiontune.data.load_image`), so they feed the model the same
tensor bit for bit and a difference in their numbers can only come from the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune.errors import ConfigError
from visiontune.model.preprocessing import Preprocessing

AUGMENTATIONS = ("none", "basic", "trivial", "randaugment")
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}

# RandomResizedCrop's lowest crop area scales with the image size (see crop_scale): 0.6 at 64 px, as
# careful small-image recipes use, and torchvision's 0.08 from 177 px up.
MIN_CROP_SIDE = 50  # pixels of side a random crop keeps at least (at 64 px: scale 0.61, capped to 0.6)
TORCHVISION_MIN_SCALE = 0.08
MAX_MIN_SCALE = 0.6  # even tiny crops still vary: the crop covers 60-100 % of the image

# Transforms whose output depends only on their input. Anything not listed (including transforms
# added later) counts as random, so a feature cache is never fed augmented images by mistake.
_DETERMINISTIC = (
    v2.Resize,
    v2.CenterCrop,
    v2.ToImage,
    v2.ToDtype,
    v2.Normalize,
    v2.ToPureTensor,
    v2.Identity,
)


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown interpolation {name!r}; choose one of: {', '.join(INTERPOLATIONS)}") from None


class EvalTransform:
    """The weights' evaluation preprocessing (``weights.transforms()``): resize the short side to
    ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], normalise with ``mean``/``std``.

    A ``PIL.Image`` is resized by Pillow (antialiased) and cut to its central ``resize_size`` square
    by :func:`resize_to_square`: the very function that fills the decode-once cache, whose uint8
    squares therefore skip that step (``resize`` is a no-op on a tensor whose short side is already
    ``resize_size``). Other tensors are resized by torchvision on the tensor."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing
        self.interpolation = interpolation_mode(preprocessing.interpolation)
        self.finish = v2.Compose([v2.CenterCrop(preprocessing.crop_size), *_to_normalized_tensor(preprocessing)])

    def resize(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The resized uint8 ``CHW`` tensor, before the centre crop (what the decode-once cache stores)."""
        size, crop_size = self.preprocessing.resize_size, self.preprocessing.crop_size
        if isinstance(image, Image.Image):
            return resize_to_square(image, size, crop_size, self.interpolation)
        return F.resize(image, [size], interpolation=self.interpolation, antialias=True)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.finish(self.resize(image))

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocessing})"


def resize_to_square(picture: Image.Image, size: int, crop_size: int, mode: InterpolationMode) -> torch.Tensor:
    """``picture`` resized by Pillow so its short side is ``size``, then cut to the ``size x size``
    square from which ``CenterCrop(crop_size)`` takes exactly the pixels it would take from the
    whole resized picture; a uint8 ``CHW`` tensor. (With ``crop_size > size`` nothing is cut: the
    crop pads.)"""
    resized = F.resize(picture, [size], interpolation=mode, antialias=True)  # the same call v2.Resize makes
    width, height = resized.size
    if crop_size > size:
        return F.pil_to_tensor(resized)
    top = _square_offset(height, size, crop_size)
    left = _square_offset(width, size, crop_size)
    return F.pil_to_tensor(resized.crop((left, top, left + size, top + size)))


def _square_offset(length: int, size: int, crop_size: int) -> int:
    """Where to cut ``size`` out of ``length`` so that centre-cropping ``crop_size`` from the cut
    gives the same pixels as centre-cropping it from the whole (torchvision rounds each half-offset,
    so cutting at the plain centre can be off by one pixel)."""
    direct = int(round((length - crop_size) / 2.0))
    within = int(round((size - crop_size) / 2.0))
    return min(max(direct - within, 0), length - size)


def build_eval_transform(preprocessing: Preprocessing) -> EvalTransform:
    """The evaluation transform of ``preprocessing`` (see :class:`EvalTransform`)."""
    return EvalTransform(preprocessing)


def build_transforms(preprocessing: Preprocessing, augment: str = "basic") -> tuple[Callable, EvalTransform]:
    """``(train_transform, eval_transform)`` for ``preprocessing``.

    ``augment``: ``"none"`` (the eval transform, deterministic), ``"basic"`` (RandomResizedCrop +
    horizontal flip), ``"trivial"`` (basic + TrivialAugmentWide) or ``"randaugment"`` (basic +
    RandAugment). Use :func:`is_deterministic` to ask whether the train transform is random."""
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment {augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    eval_transform = build_eval_transform(preprocessing)
    if augment == "none":
        return eval_transform, eval_transform
    interpolation = interpolation_mode(preprocessing.interpolation)
    steps: list[Callable] = [
        v2.RandomResizedCrop(preprocessing.crop_size, scale=crop_scale(preprocessing.crop_size),
                             interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    # The rotations and shears of these policies run on decoded uint8 tensors, where torchvision
    # supports only nearest and bilinear: a bicubic model (most timm weights) gets bilinear here.
    policy_interpolation = interpolation if interpolation == InterpolationMode.NEAREST else InterpolationMode.BILINEAR
    if augment == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=policy_interpolation))
    elif augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=policy_interpolation))
    return TrainTransform(v2.Compose(steps), v2.Compose(_to_normalized_tensor(preprocessing))), eval_transform


class TrainTransform:
    """The random training augmentation: ``augment`` (geometric and colour steps on the uint8 image
    or the picture) then ``finish`` (to float, scaled, normalised), as one callable.

    Kept as two parts so a batch of decoded images can be augmented image by image and then
    finished once, stacked (:meth:`finish_batch`): the finishing steps are elementwise (convert,
    scale, subtract, divide), so doing them on the stack gives the same numbers bit for bit as
    doing them on each image, at a small fraction of the per-call overhead (~55 us per image vs
    ~6 on a 2-core CPU, 64 px)."""

    def __init__(self, augment: v2.Compose, finish: v2.Compose):
        self.augment, self.finish = augment, finish

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return self.finish(self.augment(image))

    def finish_batch(self, images: torch.Tensor) -> torch.Tensor:
        """``finish`` on a stacked uint8 ``NCHW`` batch of augmented images."""
        return self.finish(images)

    def __repr__(self) -> str:
        # The one Compose it was before: the disk feature cache keys on this text.
        return repr(v2.Compose([*self.augment.transforms, *self.finish.transforms]))


def crop_scale(crop_size: int) -> tuple[float, float]:
    """RandomResizedCrop's ``scale`` (the range of the crop's area, as a fraction of the image) for
    ``crop_size``-pixel crops: the crop keeps a side of at least ``MIN_CROP_SIDE`` pixels, between
    torchvision's 0.08 (ImageNet at 224 px, and every size from 177 px up) and ``MAX_MIN_SCALE``.

    At 64 px torchvision's 0.08 keeps an 18-pixel patch, blown up to 64: on small images that
    destroys the object (benchmarks/recipes.md compares both on its icons)."""
    lowest = (MIN_CROP_SIDE / crop_size) ** 2
    return (min(MAX_MIN_SCALE, max(TORCHVISION_MIN_SCALE, lowest)), 1.0)


def _to_normalized_tensor(preprocessing: Preprocessing) -> list[Callable]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),  # uint8 / 255, as convert_image_dtype does
        v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        v2.ToPureTensor(),  # plain tensors collate and pickle without tv_tensors metadata
    ]


def is_deterministic(transform: Callable) -> bool:
    """True when ``transform`` (a v2 ``Compose`` or single transform) has no random step."""
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(step) for step in transform.transforms)
    if isinstance(transform, EvalTransform):
        return is_deterministic(transform.finish)
    if isinstance(transform, TrainTransform):
        return is_deterministic(transform.augment) and is_deterministic(transform.finish)
    return isinstance(transform, _DETERMINISTIC)


def build_batch_mixer(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> Callable | None:
    """A callable ``(images, labels) -> (images, soft targets)`` mixing a batch, or None if both are 0.

    ``mixup`` / ``cutmix`` are the Beta-distribution alphas (typical: 0.2 and 1.0); with both,
    each batch uses one of them chosen at random. Soft targets have shape ``(batch, num_classes)``."""
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if alpha < 0:
            raise ConfigError(f"{name} must be >= 0 (a Beta alpha; 0 turns it off), got {alpha}")
    if num_classes < 2:
        raise ConfigError(f"batch mixing needs at least 2 classes, got num_classes={num_classes}")
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

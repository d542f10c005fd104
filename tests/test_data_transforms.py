"""build_transforms matches torchvision's weights transforms; augmentations; batch mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms._presets import ImageClassification

from visiontune.data import AUGMENTATIONS, build_batch_mixer, build_transforms, is_deterministic
from visiontune.data.transforms import crop_scale
from visiontune.errors import ConfigError
from visiontune.model.preprocessing import Preprocessing

SMALL = Preprocessing(crop_size=24, resize_size=28)


def photo(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    """A non-square image with structure (a gradient plus noise), so a wrong crop or resize shows."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    pixels = gradient + rng.integers(0, 56, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def test_eval_transform_equals_resnet18_weights_transforms():
    image = photo()
    expected = ResNet18_Weights.IMAGENET1K_V1.transforms()(image)  # builds the preset, downloads nothing
    train, evaluation = build_transforms(Preprocessing(crop_size=224, resize_size=256), augment="basic")
    actual = evaluation(image)
    assert type(actual) is torch.Tensor and actual.shape == (3, 224, 224)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)  # same Pillow resize, same arithmetic


def test_eval_transform_bicubic_and_tensor_input():
    image = photo(97, 131, seed=1)
    preprocessing = Preprocessing(crop_size=64, resize_size=73, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic")
    reference = ImageClassification(crop_size=64, resize_size=73, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation=InterpolationMode.BICUBIC)
    _, evaluation = build_transforms(preprocessing, "none")
    torch.testing.assert_close(evaluation(image), reference(image), rtol=0, atol=1e-6)
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    # On tensors v2 resizes uint8 natively where v1 goes through float: rounding may differ by one
    # uint8 level, i.e. 1/255 before normalisation, 1/255/std after.
    torch.testing.assert_close(evaluation(uint8), reference(uint8), rtol=0, atol=1.01 / 255 / 0.25)


def test_none_is_the_deterministic_eval_transform():
    train, evaluation = build_transforms(SMALL, "none")
    assert train is evaluation and is_deterministic(train)
    image = photo(40, 30)
    assert torch.equal(train(image), train(image))


@pytest.mark.parametrize("augment", ["basic", "trivial", "randaugment"])
def test_augmentations_are_random_and_shaped(augment: str):
    train, evaluation = build_transforms(SMALL, augment)
    assert not is_deterministic(train) and is_deterministic(evaluation)
    image = photo(60, 40)
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(4)]
    assert all(out.shape == (3, 24, 24) and out.dtype == torch.float32 for out in outputs)
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    assert train(uint8).shape == (3, 24, 24)  # the decode-once path feeds uint8 tensors


def test_unknown_augment_and_interpolation_list_valid_values():
    with pytest.raises(ConfigError, match="none, basic, trivial, randaugment"):
        build_transforms(SMALL, "heavy")
    with pytest.raises(ConfigError, match="bilinear, bicubic, nearest"):
        build_transforms(Preprocessing(interpolation="lanczos2"), "none")
    assert AUGMENTATIONS == ("none", "basic", "trivial", "randaugment")


def test_is_deterministic_treats_unknown_steps_as_random():
    assert not is_deterministic(lambda image: image)


def test_no_mixer_when_both_off():
    assert build_batch_mixer(5) is None


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixer_gives_soft_targets(mixup: float, cutmix: float):
    torch.manual_seed(0)
    mixer = build_batch_mixer(num_classes=5, mixup=mixup, cutmix=cutmix)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = mixer(images, labels)
    assert mixed.shape == (6, 3, 16, 16) and targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed, images)


def test_mixer_rejects_bad_values():
    with pytest.raises(ConfigError, match="mixup"):
        build_batch_mixer(5, mixup=-1)
    with pytest.raises(ConfigError, match="2 classes"):
        build_batch_mixer(1, cutmix=1.0)


@pytest.mark.parametrize("crop_size, lowest", [(32, 0.6), (64, 0.6), (96, (50 / 96) ** 2), (128, (50 / 128) ** 2),
                                               (224, 0.08), (384, 0.08)])
def test_random_resized_crop_scale_grows_as_the_image_shrinks(crop_size: int, lowest: float):
    # torchvision's 0.08 keeps an 18-px patch of a 64-px image; the crop keeps >= 50 px of side,
    # between 0.08 (large images) and 0.6 (tiny ones).
    assert crop_scale(crop_size) == pytest.approx((lowest, 1.0))
    train, _ = build_transforms(Preprocessing(resize_size=crop_size, crop_size=crop_size), "basic")
    crop = next(step for step in train.augment.transforms if isinstance(step, v2.RandomResizedCrop))
    assert tuple(crop.scale) == pytest.approx((lowest, 1.0))


@pytest.mark.parametrize("augment", ["trivial", "randaugment"])
def test_policies_run_on_decoded_tensors_of_a_bicubic_model(augment: str):
    # The decoded-image cache hands uint8 tensors to the train transform; torchvision's tensor
    # rotations and shears refuse bicubic, which most timm weights (EfficientNet-Lite0's included) use.
    preprocessing = Preprocessing(crop_size=24, resize_size=28, interpolation="bicubic")
    train, _ = build_transforms(preprocessing, augment=augment)
    decoded = torch.from_numpy(np.array(photo().resize((28, 28)))).permute(2, 0, 1).contiguous()
    for seed in range(20):  # enough draws that some rotate or shear
        torch.manual_seed(seed)
        assert train(decoded).shape == (3, 24, 24)

"""A batch fetched at once (SeededSamples.__getitems__, what the training loader calls) gives each
image exactly the tensor it gets alone: seeded by (index, seed) only, normalised once per batch."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import v2

from visiontune.data import InMemoryDataset, build_transforms
from visiontune.data.transforms import TrainTransform
from visiontune.model.preprocessing import Preprocessing
from visiontune.training.samplers import EpochSampler, SeededSamples

# Bilinear: torchvision's tensor kernels of TrivialAugment/RandAugment refuse bicubic.
SMALL = Preprocessing(crop_size=16, resize_size=20, interpolation="bilinear")
NUM_IMAGES = 12


def decoded_dataset(augment: str) -> InMemoryDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (NUM_IMAGES, 3, 20, 20), dtype=torch.uint8, generator=generator)
    train, _ = build_transforms(SMALL, augment)
    return InMemoryDataset(images, torch.arange(NUM_IMAGES) % 3, train)


class RandomItems(torch.utils.data.Dataset):
    """No get_batch: SeededSamples falls back to one image at a time."""

    def __len__(self):
        return NUM_IMAGES

    def __getitem__(self, index):
        return torch.rand(3) + index, random.random()


def same_items(batch: list, alone: list) -> bool:
    # Bit-for-bit: the batched path runs the same elementwise operations, only on a stack.
    return len(batch) == len(alone) and all(
        torch.equal(got[0], want[0]) and got[1] == want[1] for got, want in zip(batch, alone))


@pytest.mark.parametrize("augment", ["basic", "trivial", "none"])
def test_a_batch_equals_its_images_fetched_alone_whatever_the_other_images(augment):
    samples = SeededSamples(decoded_dataset(augment))
    keys = list(EpochSampler(NUM_IMAGES, seed=5))
    first = samples.__getitems__(keys[:8])
    assert same_items(first, [samples[key] for key in keys[:8]])
    # The same keys at other positions, next to other images: the same tensors.
    shifted = samples.__getitems__(keys[4:] + keys[:4])
    assert same_items(shifted[:4], first[4:8])
    assert same_items(shifted[-4:], first[:4])


def test_the_generic_path_seeds_each_image_and_restores_the_process_rng():
    samples = SeededSamples(RandomItems())
    keys = [(1, 99), (2, 7), (1, 99)]
    torch.manual_seed(0)
    random.seed(0)
    expected = torch.rand(1), random.random()
    torch.manual_seed(0)
    random.seed(0)
    batch = samples.__getitems__(keys)
    assert (torch.rand(1), random.random()) == expected  # the process's streams went on untouched
    assert same_items(batch, [samples[key] for key in keys])
    assert torch.equal(batch[0][0], batch[2][0]) and not torch.equal(batch[0][0] - 1, batch[1][0] - 2)


def test_the_decoded_path_restores_the_process_rng():
    samples = SeededSamples(decoded_dataset("basic"))
    torch.manual_seed(3)
    random.seed(3)
    expected = torch.rand(2), random.random()
    torch.manual_seed(3)
    random.seed(3)
    samples.__getitems__(list(EpochSampler(NUM_IMAGES, seed=0)))
    assert (torch.rand(2).tolist(), random.random()) == (expected[0].tolist(), expected[1])


def test_the_training_loader_batches_are_the_per_image_tensors_collated():
    dataset = decoded_dataset("basic")
    assert isinstance(dataset.transform, TrainTransform)
    sampler = EpochSampler(NUM_IMAGES, seed=2)
    sampler.set_epoch(1)
    keys = list(sampler)
    samples = SeededSamples(dataset)
    for start, (images, labels) in zip(range(0, NUM_IMAGES, 5), DataLoader(samples, batch_size=5, sampler=sampler)):
        want_images, want_labels = default_collate([samples[key] for key in keys[start:start + 5]])
        assert images.dtype == torch.float32 and torch.equal(images, want_images)
        assert torch.equal(labels, want_labels)


def test_finishing_a_stack_equals_finishing_each_image():
    train, _ = build_transforms(SMALL, "basic")
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train.finish_batch(crops), torch.stack([train.finish(crop) for crop in crops]))


def test_the_train_transform_describes_itself_as_one_compose():
    # The disk feature cache keys on repr(transform): splitting it in two must not change the key.
    train, _ = build_transforms(SMALL, "basic")
    assert repr(train) == repr(v2.Compose([*train.augment.transforms, *train.finish.transforms]))
    assert repr(train).startswith("Compose(") and "RandomResizedCrop" in repr(train) and "Normalize" in repr(train)

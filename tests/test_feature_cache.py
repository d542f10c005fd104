"""Feature cache: training the head on cached features is the same training, and never stale."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_image, make_image_folder
from torch import nn

from visiontune.data import ImageDataset, build_transforms, discover, is_deterministic
from visiontune.features.extract import (
    HeadNotReproducible,
    build_feature_cache,
    feature_cache_key,
    plan_feature_cache,
)
from visiontune.model.freeze import freeze
from visiontune.model.heads import find_head
from visiontune.training.loops import set_train_mode
from visiontune.model.preprocessing import Preprocessing

TINY = Preprocessing(crop_size=32, resize_size=32)


def tiny_resnet(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    freeze(model, train="head", bn="frozen")
    return model


def train_dataset(root, augment: str = "none") -> ImageDataset:
    split = discover(root)
    train_transform, _ = build_transforms(TINY, augment)
    return ImageDataset(split.train, train_transform)


def head_after_training(forward, head: nn.Module, dataset, epochs: int = 2) -> dict:
    """SGD on the head for ``epochs``; ``dataset(epoch)`` gives the pairs ``forward`` consumes."""
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        order = torch.Generator().manual_seed(epoch)
        for inputs, labels in torch.utils.data.DataLoader(dataset(epoch), batch_size=8, shuffle=True, generator=order):
            loss = nn.functional.cross_entropy(forward(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {name: value.clone() for name, value in head.state_dict().items()}


@pytest.mark.slow
def test_cached_and_uncached_linear_probes_reach_the_same_head(image_folder):
    dataset = train_dataset(image_folder)
    model = tiny_resnet()
    plan = plan_feature_cache(model, deterministic_transform=is_deterministic(dataset.transform))
    assert plan.mode == "features", plan.reason

    uncached_model = copy.deepcopy(model)
    set_train_mode(uncached_model)  # as the training loop does: frozen BatchNorm stays in eval mode
    uncached = head_after_training(uncached_model, uncached_model.fc, lambda epoch: dataset)

    cached_model = copy.deepcopy(model)
    cache = build_feature_cache(cached_model, dataset, batch_size=5)
    assert cache.location == "memory" and tuple(cache.features.shape) == (1, len(dataset), 512)
    set_train_mode(cached_model)
    cached = head_after_training(cached_model.fc, cached_model.fc, cache.dataset)

    assert cached.keys() == uncached.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], uncached[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(cached["weight"], model.fc.weight)  # the head did train


def count_forwards(model: nn.Module) -> list:
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_disk_cache_is_reused_and_a_changed_file_invalidates_it(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3, val_per_class=1)
    dataset = train_dataset(root)
    model = tiny_resnet()
    calls = count_forwards(model)
    transform = repr(dataset.transform)

    def cached(cache_key):
        return build_feature_cache(model, dataset, key=cache_key, cache_dir=tmp_path / "cache", store="disk")

    key = feature_cache_key(model, dataset.samples, transform_description=transform, views=1)
    first = cached(key)
    assert first.location == str(tmp_path / "cache" / "features" / key)
    forwards = len(calls)
    again = cached(feature_cache_key(model, dataset.samples, transform_description=transform, views=1))
    assert len(calls) == forwards  # served from disk: the model did not run
    assert (again.features[:] == first.features[:]).all()
    assert torch.equal(again.labels, first.labels)

    changed = dataset.samples[0].path
    make_image(changed, (10, 10, 10), size=32)  # a different picture under the same name
    os.utime(changed, ns=(1, 1))  # and a different mtime, whatever the file system's clock resolution
    new_key = feature_cache_key(model, dataset.samples, transform_description=transform, views=1)
    assert new_key != key
    fresh = cached(new_key)
    assert len(calls) > forwards
    assert not (fresh.features[0, 0] == first.features[0, 0]).all()
    assert np.allclose(fresh.features[0, 1:], first.features[0, 1:], rtol=1e-5, atol=1e-6)


def test_key_ignores_the_head_but_not_the_backbone_or_the_transform(image_folder):
    dataset = train_dataset(image_folder)
    model = tiny_resnet()

    def key(**overrides):
        options = {"transform_description": repr(dataset.transform), "views": 1} | overrides
        return feature_cache_key(model, dataset.samples, **options)

    base = key()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert key() == base
    with torch.no_grad():
        model.layer4[0].conv1.weight.add_(1.0)
    assert key() != base
    assert key(views=2) != key()
    assert key(transform_description="other") != key()


def test_plan_says_why_the_cache_is_off(image_folder):
    model = tiny_resnet()
    assert plan_feature_cache(model, deterministic_transform=True, batch_mixing=True).mode == "off"
    random_plan = plan_feature_cache(model, deterministic_transform=False)
    assert random_plan.mode == "off" and "cache_views" in random_plan.reason
    views_plan = plan_feature_cache(model, deterministic_transform=False, views=3)
    assert (views_plan.mode, views_plan.views) == ("views", 3)

    freeze(model, train="all", bn="frozen")
    assert "outside the head" in plan_feature_cache(model, deterministic_transform=True).reason


def test_plan_is_off_when_backbone_batchnorm_uses_batch_statistics():
    model = tiny_resnet().eval()
    # A training mode that leaves BatchNorm updating its statistics (frozen weights notwithstanding).
    plan = plan_feature_cache(model, deterministic_transform=True, set_train_mode=nn.Module.train)
    assert plan.mode == "off" and "batch norm" in plan.reason
    assert not any(module.training for module in model.modules())  # the check left the modes alone


@pytest.mark.slow
def test_augmented_views_differ_are_reproducible_and_rotate_by_epoch(image_folder):
    dataset = train_dataset(image_folder, augment="basic")
    model = tiny_resnet()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    cache = build_feature_cache(model, dataset, views=2, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert not torch.allclose(cache.features[0], cache.features[1])
    torch.testing.assert_close(build_feature_cache(model, dataset, views=2, seed=7).features, cache.features)
    assert torch.equal(cache.dataset(epoch=3)[0][0], cache.features[1, 0])
    assert torch.equal(cache.dataset(epoch=4)[0][0], cache.features[0, 0])


def test_a_model_with_operations_after_its_head_is_not_cached(image_folder):
    dataset = train_dataset(image_folder)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=3)  # conv head, then ReLU + pool
    freeze(model, train="head", bn="frozen")
    head_name, _ = find_head(model)
    with pytest.raises(HeadNotReproducible, match=head_name):
        build_feature_cache(model, dataset, batch_size=4)

"""The fast paths keep the results: a frozen prefix stores no activations, and a training run
whose head learns on cached features ends with the same weights as one that forwards every image."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

# The measurement lives beside the speed benchmark that reports it; the test imports it from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from frozen_prefix import saved_activation_bytes  # noqa: E402


def resnet_training_only(prefixes: tuple[str, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(prefixes)
    return model.train()


def test_a_frozen_prefix_saves_nothing_for_backward():
    images = torch.randn(2, 3, 32, 32)
    partial = resnet_training_only(("layer4.", "fc."))
    _, partial_bytes = saved_activation_bytes(lambda: partial(images), ignore=partial.parameters())

    def suffix_after_no_grad_prefix():
        with torch.no_grad():
            features = partial.layer3(partial.layer2(partial.layer1(
                partial.maxpool(partial.relu(partial.bn1(partial.conv1(images)))))))
        return partial.fc(torch.flatten(partial.avgpool(partial.layer4(features)), 1))

    _, explicit_bytes = saved_activation_bytes(suffix_after_no_grad_prefix, ignore=partial.parameters())
    assert partial_bytes == explicit_bytes > 0

    full = resnet_training_only(("",))
    _, full_bytes = saved_activation_bytes(lambda: full(images), ignore=full.parameters())
    assert full_bytes > 3 * partial_bytes


def test_saved_bytes_count_each_storage_once_and_skip_ignored_tensors():
    weight = torch.randn(4, 4, requires_grad=True)
    inputs = torch.randn(3, 4)
    _, counted = saved_activation_bytes(lambda: (inputs @ weight) @ weight)
    assert counted == inputs.nbytes + weight.nbytes + 3 * 4 * 4  # inputs, weight once, the hidden product
    _, without_weight = saved_activation_bytes(lambda: (inputs @ weight) @ weight, ignore=[weight])
    assert without_weight == counted - weight.nbytes


@pytest.mark.slow
def test_a_linear_probe_on_cached_features_ends_where_the_uncached_one_does(image_folder, tmp_path, caplog):
    from visiontune.config import TrainConfig
    from visiontune.training.engine import train

    caplog.set_level(logging.INFO, logger="visiontune.training.phase_inputs")
    results = {}
    for mode in ("off", "auto"):
        config = TrainConfig(data=str(image_folder), model="resnet18", weights="none", strategy="linear-probe",
                             epochs=2, batch_size=8, image_size=32, augment="none", workers=0, feature_cache=mode,
                             precision="fp32", out=str(tmp_path / mode))
        results[mode] = train(config)
    assert "feature cache features" in caplog.text and "feature cache off (turned off" in caplog.text
    # float32 pinned above: the cached features are computed in float32, so under bf16 autocast ("auto"
    # on CPUs with AVX-512 BF16 or AMX) only the uncached backbone would round to 8 bits (3.7e-4
    # apart). In float32 both paths run the same frozen backbone on the same pixels; they may
    # differ only by kernel rounding of the features (a few eps32 = 1.2e-7 relative), which 6
    # steps of a linear head carry into its weights (below 0.1) linearly: rtol 1e-5 is ~100 eps.
    uncached, cached = results["off"].model.state_dict(), results["auto"].model.state_dict()
    for name in uncached:
        torch.testing.assert_close(cached[name], uncached[name], rtol=1e-5, atol=1e-6)
    for before, after in zip(results["off"].history, results["auto"].history):
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4)
        assert after["val_acc"] == before["val_acc"]


def test_convolutional_networks_train_in_channels_last_and_others_do_not():
    from visiontune.device import prefers_channels_last

    assert prefers_channels_last(torchvision.models.resnet18(weights=None, num_classes=3))
    assert not prefers_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))

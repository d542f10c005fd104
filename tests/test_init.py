"""init_weights: the tutorial's conv formula, norms at identity, linear default, other schemes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visiontune.errors import ConfigError
from visiontune.model.init import init_weights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_kaiming_conv_follows_the_tutorial_formula():
    conv = nn.Conv2d(64, 128, kernel_size=3)  # 73,728 weights: std within 1% of its target
    init_weights(conv)
    n = 3 * 3 * 128
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.02)
    assert abs(conv.weight.mean().item()) < 0.05 * math.sqrt(2.0 / n)
    assert torch.count_nonzero(conv.bias) == 0


def test_norm_layers_start_as_identity_with_fresh_statistics():
    layers = nn.Sequential(nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.LayerNorm(8))
    for layer in layers:
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    layers[0].running_mean.fill_(3.0)
    layers[0].running_var.fill_(5.0)
    init_weights(layers, scheme="xavier")  # every scheme treats norms the same way
    for layer in layers:
        assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)
    assert torch.all(layers[0].running_mean == 0) and torch.all(layers[0].running_var == 1)


def test_kaiming_linear_is_uniform_in_one_over_sqrt_fan_in():
    linear = nn.Linear(400, 300)
    init_weights(linear)
    bound = 1 / math.sqrt(400)
    assert linear.weight.abs().max().item() <= bound
    assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(linear.bias) == 0


def test_other_schemes():
    linear = init_weights(nn.Linear(400, 200), scheme="xavier")
    assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / (400 + 200)), rel=0.02)
    linear = init_weights(nn.Linear(400, 200), scheme="trunc_normal")
    assert linear.weight.abs().max().item() <= 0.04
    assert linear.weight.std().item() == pytest.approx(0.02 * 0.8796, rel=0.03)  # std of N(0,1) cut at +-2
    conv = init_weights(nn.Conv2d(4, 4, 1), scheme="zeros")
    assert torch.count_nonzero(conv.weight) == 0 and torch.count_nonzero(conv.bias) == 0


def test_applies_recursively_and_returns_the_module():
    model = nn.Sequential(nn.Conv2d(3, 256, 3, bias=False), nn.Sequential(nn.Linear(10, 10)))
    assert init_weights(model) is model
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.05)
    assert torch.count_nonzero(model[1][0].bias) == 0


def test_frozen_parameters_can_be_initialised():
    linear = nn.Linear(4, 4).requires_grad_(False)
    init_weights(linear, scheme="zeros")
    assert torch.count_nonzero(linear.weight) == 0


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="unknown init scheme 'he'.*kaiming"):
        init_weights(nn.Linear(2, 2), scheme="he")

"""find_head / head_names / replace_head on user modules, torchvision aux heads and timm heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visiontune.errors import ModelError
from visiontune.model.heads import find_head, head_names, replace_head


class TinyNet(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))


def test_last_linear_is_the_head_even_after_an_mlp():
    mlp_head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    name, module = find_head(TinyNet(mlp_head))
    assert name == "head.2" and module is mlp_head[2]


def test_chained_linears_are_not_ambiguous():
    name, _ = find_head(nn.Sequential(nn.Flatten(), nn.Linear(12, 12), nn.Linear(12, 4)))
    assert name == "2"


def test_one_by_one_conv_head_like_squeezenet():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, kernel_size=1), nn.AdaptiveAvgPool2d(1))
    assert find_head(model)[0] == "2"
    replace_head(model, 7)
    assert isinstance(model[2], nn.Conv2d) and model[2].out_channels == 7 and model[2].in_channels == 8
    assert model[2].weight.abs().max() <= 1 / 8**0.5  # initialised like Linear(8, 7), not by conv fan-out
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 7, 1, 1)


def test_two_sibling_heads_are_ambiguous():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.species = nn.Linear(8, 10)
            self.colour = nn.Linear(8, 3)

    with pytest.raises(ModelError, match="ambiguous.*species.*colour"):
        find_head(TwoHeads())


def test_missing_head_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot find the classification head of Sequential"):
        find_head(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))


def test_replace_head_keeps_width_dtype_bias_and_returns_the_model():
    model = TinyNet(nn.Linear(8, 5, bias=False)).to(torch.float64)
    old = model.head
    assert replace_head(model, 2) is model
    assert model.head is not old
    assert (model.head.in_features, model.head.out_features) == (8, 2)
    assert model.head.weight.dtype == torch.float64 and model.head.bias is None
    assert model(torch.randn(3, 3, 8, 8, dtype=torch.float64)).shape == (3, 2)


@pytest.mark.parametrize("scheme", ["zeros", "xavier"])
def test_replace_head_uses_the_init_scheme(scheme):
    model = replace_head(TinyNet(nn.Linear(8, 5)), 4, init=scheme)
    assert (torch.count_nonzero(model.head.weight) == 0) == (scheme == "zeros")
    assert torch.count_nonzero(model.head.bias) == 0


def test_bad_num_classes():
    with pytest.raises(ModelError, match="num_classes"):
        replace_head(TinyNet(nn.Linear(8, 5)), 0)


def test_torchvision_auxiliary_heads_are_heads_too():
    import torchvision

    googlenet = torchvision.models.googlenet(init_weights=False, aux_logits=True)
    assert head_names(googlenet) == ["fc", "aux1.fc2", "aux2.fc2"]
    replace_head(googlenet, 6)
    assert googlenet.aux1.fc2.out_features == googlenet.aux2.fc2.out_features == googlenet.fc.out_features == 6
    assert googlenet.aux1.fc1.out_features == 1024  # only the last layer of the aux branch is a head
    inception = torchvision.models.inception_v3(init_weights=False, aux_logits=True)
    assert head_names(inception) == ["fc", "AuxLogits.fc"]


def test_timm_heads_come_from_the_model_config():
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32)
    assert head_names(model) == ["head", "head_dist"]
    replace_head(model, 3)
    assert model.head.out_features == model.head_dist.out_features == model.num_classes == 3
    convnext = replace_head(timm.create_model("convnext_atto"), 5)
    assert find_head(convnext)[0] == "head.fc" and convnext.head.fc.out_features == 5

"""layer_groups and freeze: stages, last-N, prefixes, frozen BatchNorm, re-freezing, pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

from visiontune.errors import ConfigError
from visiontune.model.freeze import freeze, group_of, layer_groups
from visiontune.model.create import create_model


def resnet18(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def train_step(model: nn.Module) -> None:
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()


def test_resnet_groups_are_its_stages():
    groups = layer_groups(resnet18())
    assert [g.name for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert groups[0].modules == ["conv1", "bn1"] and groups[-1].modules == ["fc"]


@pytest.mark.parametrize(("name", "kwargs", "first", "last_before_head"), [
    ("vit_b_32", {"image_size": 32}, "stem", "encoder.layers.encoder_layer_11"),
    ("densenet121", {}, "stem", "features.denseblock4"),
    ("efficientnet_b0", {}, "features.0", "features.8"),
    ("mnasnet0_5", {}, "stem", "layers.14"),
    ("timm:convnext_atto", {}, "stem", "head.norm"),
    ("timm:vit_tiny_patch16_224", {"img_size": 32}, "stem", "blocks.11"),
])
def test_every_parameter_is_in_exactly_one_group(name, kwargs, first, last_before_head):
    with torch.device("meta"):  # structure only: no memory, no init
        model = create_model(name, 3, **kwargs)
    groups = layer_groups(model)
    assert (groups[0].name, groups[-2].name, groups[-1].name) == (first, last_before_head, "head")
    for param_name, _ in model.named_parameters():
        owners = [g.name for g in groups if any(param_name == m or param_name.startswith(m + ".") for m in g.modules)]
        assert len(owners) == 1, (param_name, owners)


def test_head_only_linear_probing():
    model = resnet18()
    trainable = freeze(model, "head")
    assert trainable == ["fc.weight", "fc.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


@pytest.mark.parametrize(("train", "stages"), [
    (0, {"fc"}), (1, {"layer4", "fc"}), (2, {"layer3", "layer4", "fc"}), ("2", {"layer3", "layer4", "fc"}),
    (["layer4", "fc"], {"layer4", "fc"}), ("layer4", {"layer4"}), (["layer3.1.conv2"], {"layer3"}),
    (99, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}), ("all", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
])
def test_train_last_n_groups_or_prefixes(train, stages):
    model = resnet18()
    trainable = freeze(model, train)
    assert {n.split(".")[0] for n in trainable} == stages
    if train == ["layer3.1.conv2"]:
        assert trainable == ["layer3.1.conv2.weight"]


def test_unknown_prefix_lists_valid_names():
    with pytest.raises(ConfigError, match="'layer5'.*layer4.*fc"):
        freeze(resnet18(), ["layer5"])
    with pytest.raises(ConfigError, match="bn="):
        freeze(resnet18(), "head", bn="eval")
    with pytest.raises(ConfigError, match=">= 0"):
        freeze(resnet18(), -1)
    with pytest.raises(ConfigError, match="must be 'head', 'all'"):
        freeze(resnet18(), True)


def test_frozen_batchnorm_keeps_statistics_through_train_mode():
    model = resnet18()
    freeze(model, 1)  # layer4 + fc train; everything before is frozen
    before = bn_state(model)
    train_step(model)
    after = bn_state(model)
    for key in before:
        if key.startswith("layer4."):
            assert not torch.equal(before[key], after[key]), key  # trained BN still learns statistics
        else:
            assert torch.equal(before[key], after[key]), key
    assert not model.bn1.training and model.layer4[0].bn1.training and model.training


def test_bn_train_opts_out_of_frozen_statistics():
    model = resnet18()
    freeze(model, "head", bn="train")
    before = bn_state(model)
    train_step(model)
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)
    assert model.bn1.weight.grad is None  # the parameters themselves stay frozen


def test_gradual_unfreezing_refreezes_from_scratch():
    model = resnet18()
    freeze(model, "head")
    train_step(model)
    frozen_stats = bn_state(model)
    assert freeze(model, "all") == [n for n, _ in model.named_parameters()]
    assert model.bn1.training  # follows the model's mode again without another model.train()
    train_step(model)
    assert not torch.equal(frozen_stats["bn1.running_mean"], model.bn1.running_mean)
    freeze(model, "head")
    stats = bn_state(model)
    train_step(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())


def test_frozen_model_pickles_copies_and_keeps_state_dict_keys():
    model = resnet18()
    keys = list(model.state_dict())
    freeze(model, "head")
    assert list(model.state_dict()) == keys  # num_batches_tracked and all
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        stats = bn_state(clone)
        train_step(clone)
        assert all(torch.equal(v, clone.state_dict()[k]) for k, v in stats.items())


def test_group_of_and_layer_groups_on_a_plain_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    groups = layer_groups(model)
    assert [g.modules for g in groups] == [["0", "1"], ["3"], ["6"]]  # a norm joins the conv before it
    assert group_of(groups, "1.running_mean") == 0 and group_of(groups, "6.bias") == 2


def test_googlenet_aux_heads_train_with_the_head():
    model = torchvision.models.googlenet(init_weights=False)
    trainable = freeze(model, "head")
    assert {n.rsplit(".", 1)[0] for n in trainable} == {"fc", "aux1.fc2", "aux2.fc2"}

"""param_groups: one group per tensor, the right learning rates, no decay on norms/biases."""

from __future__ import annotations

import pytest
import torch

from visiontune.errors import ConfigError
from visiontune.model.freeze import freeze, layer_groups
from visiontune.model.create import create_model
from visiontune.model.param_groups import param_groups


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet18", 3)


def owner(groups: list[dict]) -> dict[int, str]:
    """Parameter id -> group name, failing if any tensor is in two groups."""
    seen = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in seen, f"in {seen[id(param)]} and {group['name']}"
            seen[id(param)] = group["name"]
    return seen


def test_head_gets_its_own_rate_and_norms_no_decay(resnet):
    freeze(resnet, "all")
    groups = param_groups(resnet, lr=0.01, head_lr=0.1, weight_decay=1e-4)
    names = dict(resnet.named_parameters())
    where = owner(groups)
    assert set(where) == {id(p) for p in names.values()}  # every trainable tensor, once
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["head"]["params"] == [names["fc.weight"]] and by_name["head"]["lr"] == 0.1
    assert by_name["head_no_decay"]["params"] == [names["fc.bias"]] and by_name["head_no_decay"]["weight_decay"] == 0
    assert by_name["backbone"]["lr"] == 0.01 and by_name["backbone"]["weight_decay"] == 1e-4
    assert all(p.ndim == 4 for p in by_name["backbone"]["params"])  # convs decay, BN weights/biases do not
    assert id(names["bn1.weight"]) in {id(p) for p in by_name["backbone_no_decay"]["params"]}


def test_an_optimizer_accepts_the_groups_and_steps(resnet):
    freeze(resnet, "all")
    groups = param_groups(resnet, lr=0.01, head_lr=0.1, weight_decay=0.05)
    before = resnet.fc.weight.detach().clone(), resnet.conv1.weight.detach().clone()
    for optimizer_class in (torch.optim.SGD, torch.optim.AdamW):
        optimizer = optimizer_class(groups)
        resnet.train()
        optimizer.zero_grad()
        resnet(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
    assert not torch.equal(before[0], resnet.fc.weight) and not torch.equal(before[1], resnet.conv1.weight)
    assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in groups]


def test_frozen_parameters_are_left_out(resnet):
    freeze(resnet, "head")
    groups = param_groups(resnet, lr=0.01, head_lr=0.1)
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups] == [("head", 2, 0.0)]


def test_layer_decay_scales_each_group_by_its_distance_to_the_head(resnet):
    freeze(resnet, "all")
    decay, lr = 0.5, 0.08
    groups = param_groups(resnet, lr=lr, head_lr=1.0, layer_decay=decay)
    names = [g.name for g in layer_groups(resnet)]  # stem, layer1..layer4, head
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"group0": lr * decay**5, "group1": lr * decay**4, "group2": lr * decay**3,
                   "group3": lr * decay**2, "group4": lr * decay, "head": 1.0}
    assert len(names) == 6
    owner(groups)


def test_backbone_multiplier(resnet):
    freeze(resnet, "all")
    lrs = {g["name"]: g["lr"] for g in param_groups(resnet, lr=0.1, backbone_lr_mult=0.1)}
    assert lrs == {"backbone": pytest.approx(0.01), "head": 0.1}


def test_transformer_embeddings_are_not_decayed():
    vit = create_model("vit_b_32", 3, image_size=32)
    groups = param_groups(vit, lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = dict(vit.named_parameters())
    assert id(names["class_token"]) not in decayed and id(names["encoder.pos_embedding"]) not in decayed
    assert id(names["encoder.layers.encoder_layer_0.mlp.0.weight"]) in decayed


def test_timm_no_weight_decay_names():
    model = create_model("timm:vit_tiny_patch16_224", 3, img_size=32)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = dict(model.named_parameters())
    assert id(names["pos_embed"]) not in decayed and id(names["cls_token"]) not in decayed
    assert id(names["head.weight"]) in decayed


@pytest.mark.parametrize("options", [{"lr": -1}, {"lr": 0.1, "layer_decay": 0}, {"lr": 0.1, "layer_decay": 1.5},
                                     {"lr": 0.1, "weight_decay": float("nan")}, {"lr": 0.1, "head_lr": "fast"}])
def test_bad_values(resnet, options):
    with pytest.raises(ConfigError):
        param_groups(resnet, **options)

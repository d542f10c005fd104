"""The model's anatomy: heads and layer groups found once, agreeing with the public finders, and
computed once per training run; the one BatchNorm rule shared by freeze() and the training loop."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import visiontune.model.anatomy as anatomy_module
import visiontune.model.heads as heads_module
import visiontune.training.setup as training_setup
from conftest import make_image_folder
from visiontune.config import config_from_dict
from visiontune.features.extract import feature_cache_key, plan_feature_cache
from visiontune.model.anatomy import Anatomy, anatomy_of
from visiontune.model.create import create_model
from visiontune.model.freeze import freeze, is_frozen_batchnorm, layer_groups, set_train_mode
from visiontune.model.heads import find_head, head_names
from visiontune.model.param_groups import param_groups
from visiontune.training import loops
from visiontune.training.engine import train

# name -> (create_model kwargs, main head, auxiliary heads, first group, last group before the head)
MODELS = {
    "resnet18": ({}, "fc", (), "stem", "layer4"),
    "vit_b_16": ({"image_size": 32}, "heads.head", (), "stem", "encoder.layers.encoder_layer_11"),
    "squeezenet1_1": ({}, "classifier.1", (), "stem", "features.12"),
    "inception_v3": ({}, "fc", ("AuxLogits.fc",), "Conv2d_1a_3x3", "Mixed_7c"),
    "timm:convnext_atto": ({}, "head.fc", (), "stem", "head.norm"),
}


def build(name: str) -> nn.Module:
    kwargs = MODELS[name][0]
    with torch.device("meta"):  # structure only: no memory, no initialisation
        return create_model(name, 3, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_anatomy_names_the_heads_and_the_stages(name):
    _, head, aux_heads, first, last_before_head = MODELS[name]
    model = build(name)
    anatomy = anatomy_of(model, name)
    assert (anatomy.name, anatomy.head, anatomy.aux_heads) == (name, head, aux_heads)
    assert anatomy.heads == [head, *aux_heads]
    names = [group.name for group in anatomy.groups]
    assert (names[0], names[-2], names[-1]) == (first, last_before_head, "head")
    assert anatomy.groups[-1].modules == [head, *aux_heads]
    for parameter, _ in model.named_parameters():
        owners = [g.name for g in anatomy.groups if any(anatomy_module.owns(m, parameter) for m in g.modules)]
        assert len(owners) == 1, (parameter, owners)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_public_finders_agree_with_the_anatomy(name):
    model = build(name)
    anatomy = anatomy_of(model)
    assert anatomy.name == type(model).__name__  # no name given: the class, never an attribute on the model
    found_name, found = find_head(model)
    assert found_name == anatomy.head and found is anatomy.head_module(model)
    assert find_head(model, anatomy=anatomy) == (found_name, found)
    assert head_names(model) == head_names(model, anatomy=anatomy) == anatomy.heads
    assert layer_groups(model) == layer_groups(model, anatomy=anatomy) == list(anatomy.groups)


def test_freeze_and_param_groups_give_the_same_answer_with_a_given_anatomy():
    torch.manual_seed(0)
    model = create_model("resnet18", 3)
    anatomy = anatomy_of(model, "resnet18")
    for train_part in ("head", 2, ["layer3", "fc"], "all"):
        assert freeze(model, train_part, anatomy=anatomy) == freeze(model, train_part)
    options = {"lr": 0.01, "head_lr": 0.1, "layer_decay": 0.5, "weight_decay": 1e-4}
    found = param_groups(model, **options)
    given = param_groups(model, **options, anatomy=anatomy)
    assert [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in found] == \
           [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in given]


def test_anatomy_is_frozen_and_hands_out_copies_of_its_groups():
    anatomy = anatomy_of(build("resnet18"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        anatomy.head = "layer4"
    groups = layer_groups(nn.Module(), anatomy=anatomy)  # the anatomy answers; the module is not searched
    groups[-1].modules.append("layer4")
    assert anatomy.groups[-1].modules == ["fc"]


def test_create_model_leaves_no_name_on_the_module():
    assert not hasattr(build("resnet18"), "visiontune_name")


def test_feature_cache_key_uses_the_anatomy(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 3)
    image = tmp_path / "a.png"
    image.write_bytes(b"not read, only stat()ed")
    samples = [type("Sample", (), {"path": image, "label": 0})()]
    key = dict(transform_description="t", views=1)
    named = anatomy_of(model, "resnet18")
    assert feature_cache_key(model, samples, **key, anatomy=named) == feature_cache_key(
        model, samples, **key, model_name="resnet18")
    assert feature_cache_key(model, samples, **key, anatomy=named) != feature_cache_key(
        model, samples, **key, anatomy=dataclasses.replace(named, name="resnet34"))


# --- computed once per run --------------------------------------------------------------------------


@pytest.fixture
def count_searches(monkeypatch):
    """Counts every head search and layer-group search made after the model is built (building
    it replaces the head, which needs a search of its own before there is a model to describe)."""
    calls = {"heads": 0, "groups": 0}

    def counting(kind, function):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return wrapper

    build_model = training_setup.build_model

    def build_then_count(*args, **kwargs):
        built = build_model(*args, **kwargs)
        calls.update(heads=0, groups=0)
        return built

    monkeypatch.setattr(heads_module, "locate_heads", counting("heads", heads_module.locate_heads))
    monkeypatch.setattr(anatomy_module, "find_layer_groups", counting("groups", anatomy_module.find_layer_groups))
    monkeypatch.setattr(training_setup, "build_model", build_then_count)
    return calls


def tiny_run(tmp_path, monkeypatch, **values):
    # Files rather than decoded images, so the feature cache is keyed by them (feature_cache_key runs too).
    monkeypatch.setattr("visiontune.data.fits_in_memory", lambda *args, **kwargs: False)
    monkeypatch.setattr(training_setup, "fits_in_memory", lambda *args, **kwargs: False, raising=False)
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    config = config_from_dict({"data": str(data), "model": "timm:test_resnet", "weights": "none", "image_size": 32,
                               "batch_size": 8, "workers": 0, "device": "cpu", "augment": "none",
                               "out": str(tmp_path / "run"), **values})
    train(config)
    return json.loads((tmp_path / "run" / "report.json").read_text())


@pytest.mark.slow
def test_a_linear_probe_finds_the_anatomy_once(tmp_path, monkeypatch, count_searches):
    report = tiny_run(tmp_path, monkeypatch, strategy="linear-probe", epochs=1)
    assert report["feature_cache"]["head"]["mode"] == "features"  # plan, key, capture and check all ran
    assert count_searches == {"heads": 1, "groups": 1}


@pytest.mark.slow
def test_gradual_finds_the_anatomy_once_across_its_phases(tmp_path, monkeypatch, count_searches):
    report = tiny_run(tmp_path, monkeypatch, strategy="gradual", epochs=2, freeze_epochs=1)
    assert set(report["feature_cache"]) == {"head", "full"}  # both phases ran
    assert count_searches == {"heads": 1, "groups": 1}


def test_setup_records_the_anatomy_under_the_configured_name(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    config = config_from_dict({"data": str(data), "model": "timm:test_resnet", "weights": "none", "image_size": 32,
                               "batch_size": 4, "workers": 0, "device": "cpu", "out": str(tmp_path / "run")})
    setup = training_setup.build_training(config)
    assert isinstance(setup.anatomy, Anatomy) and setup.anatomy.name == "timm:test_resnet"
    assert setup.anatomy == anatomy_of(setup.model, "timm:test_resnet")


# --- the BatchNorm rule ---------------------------------------------------------------------------


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_the_training_loop_uses_freezes_batchnorm_rule():
    assert loops.set_train_mode is set_train_mode


@pytest.mark.parametrize(("bn", "frozen_layer_trains"), [("frozen", False), ("train", True)])
def test_set_train_mode_follows_freezes_choice(bn, frozen_layer_trains):
    model = small_net()
    freeze(model, "head", bn=bn)
    set_train_mode(model)
    assert model.training and model[7].training
    assert model[1].training is frozen_layer_trains and model[4].training is frozen_layer_trains
    assert is_frozen_batchnorm(model[1]) is not frozen_layer_trains
    freeze(model, "all", bn=bn)  # re-freezing clears the earlier choice
    set_train_mode(model)
    assert model[1].training and not is_frozen_batchnorm(model[1])


def test_a_batchnorm_freeze_never_saw_is_frozen_when_its_parameters_are():
    model = small_net()
    model[1].requires_grad_(False)
    assert is_frozen_batchnorm(model[1]) and not is_frozen_batchnorm(model[4])
    assert not is_frozen_batchnorm(nn.BatchNorm2d(4, affine=False))  # nothing says it is frozen


def test_the_feature_cache_plan_sees_the_same_rule():
    model = small_net()
    freeze(model, "head", bn="train")  # backbone BatchNorm keeps learning statistics: features would drift
    assert "batch norm" in plan_feature_cache(model, deterministic_transform=True).reason
    freeze(model, "head", bn="frozen")
    assert plan_feature_cache(model, deterministic_transform=True).mode == "features"

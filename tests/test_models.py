"""create_model over every torchvision classifier and a few timm ones, names, weights, in_chans."""

from __future__ import annotations

import hashlib
import json
import pickle
from unittest import mock
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision

from visiontune.errors import ModelError
from visiontune.model.anatomy import anatomy_of
from visiontune.model.freeze import freeze, group_of, layer_groups, owns
from visiontune.model.heads import find_head, head_names
from visiontune.model.create import create_model, list_models, resolve_preprocessing
from visiontune.model.registry import torchvision_head_name

NUM_CLASSES = 3
TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)
TV_PARAMS = {info.name: info.num_params for info in list_models() if info.source == "torchvision"}
SLOW_INPUTS = {"inception_v3": 299, "maxvit_t": 224, "alexnet": 64}  # the smallest each accepts in train mode

# --- helpers --------------------------------------------------------------------------------------

def build(name: str, num_classes: int = NUM_CLASSES, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes, **kwargs)


def small_input(name: str) -> tuple[dict, int]:
    """Builder kwargs and an image side that ``name`` accepts, as small as it allows."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return {"image_size": 2 * patch}, 2 * patch
    return {}, SLOW_INPUTS.get(name, 32)


def fingerprint(tensor: torch.Tensor):
    """An exact stand-in for ``tensor``: a copy when small, a SHA-1 of its bytes when large."""
    tensor = tensor.detach()
    if tensor.numel() <= 1 << 22:
        return tensor.clone()
    return hashlib.sha1(tensor.contiguous().view(-1).view(torch.uint8).numpy()).digest()


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def logits_and_loss(output, target):
    """Main logits and the summed loss of main and auxiliary outputs (googlenet/inception namedtuples)."""
    outputs = [o for o in output if isinstance(o, torch.Tensor)] if isinstance(output, tuple) else [output]
    return outputs, sum(F.cross_entropy(o, target) for o in outputs)


def check_fine_tunes_only_head(model: torch.nn.Module, image_size: int, in_chans: int = 3) -> None:
    heads = head_names(model)
    trainable = freeze(model, train="head")
    in_head = {n for n, _ in model.named_parameters() if any(owns(h, n) for h in heads)}
    assert set(trainable) == in_head and in_head
    assert all(p.requires_grad == (n in in_head) for n, p in model.named_parameters())

    model.train()
    frozen_before = {k: fingerprint(v) for k, v in model.state_dict().items() if not any(owns(h, k) for h in heads)}
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in in_head}
    target = torch.tensor([0, NUM_CLASSES - 1])
    outputs, loss = logits_and_loss(model(torch.randn(2, in_chans, image_size, image_size)), target)
    assert all(o.shape == (2, NUM_CLASSES) for o in outputs)
    assert len(outputs) in (1, len(heads))  # googlenet/inception return one output per head
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in in_head)
    torch.optim.SGD(model.parameters(), lr=0.5).step()

    changed = {n for n, p in model.named_parameters() if n in in_head and not torch.equal(p, head_before[n])}
    # Every head learned, aux ones too (with random features near 0 only the bias may move).
    assert all(any(owns(h, n) for n in changed) for h in heads), (heads, changed)
    for key, value in model.state_dict().items():
        if key in frozen_before:
            assert same(fingerprint(value), frozen_before[key]), f"frozen {key} changed"


# --- every torchvision model ----------------------------------------------------------------------


def _marks(name: str):
    return [pytest.mark.slow] if TV_PARAMS[name] > 250_000_000 else []  # 3-10 s: building 300M+ parameters


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in TORCHVISION_MODELS])
def test_every_torchvision_model_gets_a_new_head_and_trains_only_it(name):
    kwargs, size = small_input(name)
    model = build(name, **kwargs)
    head_name, head = find_head(model)
    assert head_name == torchvision_head_name(name)  # the listing's table is right
    assert getattr(head, "out_features", getattr(head, "out_channels", None)) == NUM_CLASSES
    assert not hasattr(model, "visiontune_name")  # the name travels in the anatomy, not on the module
    groups = layer_groups(model)
    assert groups[-1].name == "head" and len(groups) >= 4
    assert all(group_of(groups, n) >= 0 for n, _ in model.named_parameters())
    check_fine_tunes_only_head(model, size)


TIMM_MODELS = {  # name -> (kwargs, image size)
    "timm:resnet18": ({}, 32),
    "timm:efficientnet_lite0": ({}, 32),
    "timm:convnext_atto": ({}, 32),
    "timm:vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "timm:deit_tiny_distilled_patch16_224": ({"img_size": 32}, 32),  # two heads
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models_get_a_new_head_and_train_only_it(name):
    kwargs, size = TIMM_MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, **kwargs)
    assert model.get_classifier() is find_head(model)[1] or name.endswith("distilled_patch16_224")
    assert model.num_classes == NUM_CLASSES
    check_fine_tunes_only_head(model, size)


# --- names -----------------------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match="resnet18") as error:
        create_model("resnet181", NUM_CLASSES)
    assert "visiontune models" in str(error.value)
    with pytest.raises(ModelError, match="timm:efficientnet_lite0"):
        create_model("efficientnet_lite0", NUM_CLASSES)  # timm-only name without its prefix
    with pytest.raises(ModelError, match="timm:convnext_atto"):
        create_model("timm:convnext_ato", NUM_CLASSES)


def test_list_models_reads_registries_without_building(monkeypatch):
    monkeypatch.setattr(torchvision.models, "get_model", mock.Mock(side_effect=AssertionError("built")))
    everything = list_models()
    tv = [i for i in everything if i.source == "torchvision"]
    assert sorted(i.name for i in tv) == sorted(TORCHVISION_MODELS)
    assert all(i.num_params and i.head and i.default_weights for i in tv)
    assert any(i.name == "timm:resnet18" and i.head == "fc" for i in everything)
    assert {i.name for i in list_models("resnet1")} >= {"resnet18", "resnet101", "timm:resnet18"}
    assert {i.name for i in list_models("vit_b_*")} == {"vit_b_16", "vit_b_32"}
    assert all(i.source == "timm" for i in list_models("timm:convnext_*"))
    assert list_models("no-such-model") == []


def test_models_command_prints_table_and_json(capsys):
    from visiontune.cli import main

    assert main(["models", "resnet18"]) == 0
    table = capsys.readouterr().out
    assert "resnet18" in table and "11.7" in table and "timm:resnet18" in table and " fc" in table
    assert main(["models", "timm:convnext_atto", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "timm:convnext_atto" and rows[0]["params"] > 3_000_000 and rows[0]["head"] == "head.fc"


# --- weights --------------------------------------------------------------------------------------


def test_default_weights_offline_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached file
    monkeypatch.setattr(torch.hub, "urlopen", mock.Mock(side_effect=URLError("[Errno -3] name resolution failed")))
    for weights in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        with pytest.raises(ModelError, match="could not download") as error:
            create_model("resnet18", NUM_CLASSES, weights=weights)
        assert "weights=PATH" in str(error.value) and "--weights PATH" in str(error.value)


def test_timm_pretrained_offline_says_what_to_do(monkeypatch):
    import timm.models._builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(ModelError, match="could not download.*--weights PATH"):
        create_model("timm:resnet18", NUM_CLASSES, weights="DEFAULT")


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        create_model("resnet18", NUM_CLASSES, weights="IMAGENET_V9")
    with pytest.raises(ModelError, match="a1_in1k"):
        create_model("timm:resnet18", NUM_CLASSES, weights="no_such_tag")
    with pytest.raises(ModelError, match="does not exist"):
        create_model("resnet18", NUM_CLASSES, weights="missing/model.pth")


def test_local_weights_load_the_backbone_but_never_the_old_head(tmp_path):
    torch.manual_seed(1)
    pretrained = torchvision.models.resnet18(num_classes=NUM_CLASSES)  # same head shape: must still not load
    path = tmp_path / "pretrained.pth"
    torch.save(pretrained.state_dict(), path)
    torch.manual_seed(2)
    model = create_model("resnet18", NUM_CLASSES, weights=path)
    assert torch.equal(model.layer4[1].conv2.weight, pretrained.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, pretrained.bn1.running_var)
    assert not torch.equal(model.fc.weight, pretrained.fc.weight)
    assert torch.count_nonzero(model.fc.bias) == 0  # freshly initialised


# --- input channels -------------------------------------------------------------------------------


def test_in_chans_sums_or_repeats_the_rgb_kernels():
    torch.manual_seed(0)
    rgb = create_model("resnet18", NUM_CLASSES).conv1.weight
    torch.manual_seed(0)
    gray = create_model("resnet18", NUM_CLASSES, in_chans=1)
    assert torch.equal(gray.conv1.weight, rgb.sum(dim=1, keepdim=True))
    torch.manual_seed(0)
    five = create_model("resnet18", NUM_CLASSES, in_chans=5).conv1.weight
    assert torch.allclose(five, rgb.repeat(1, 2, 1, 1)[:, :5] * 3 / 5)
    assert gray.eval()(torch.randn(2, 1, 32, 32)).shape == (2, NUM_CLASSES)


def test_in_chans_adapts_loaded_weights_of_timm_and_vit(tmp_path):
    import timm

    torch.manual_seed(0)
    pretrained = timm.create_model("resnet18")
    torch.save(pretrained.state_dict(), tmp_path / "timm_resnet18.pth")
    gray = create_model("timm:resnet18", NUM_CLASSES, weights=tmp_path / "timm_resnet18.pth", in_chans=1)
    assert torch.allclose(gray.conv1.weight, pretrained.conv1.weight.sum(dim=1, keepdim=True))
    vit = create_model("vit_b_32", NUM_CLASSES, in_chans=1, image_size=32)
    assert vit.conv_proj.in_channels == 1 and vit.eval()(torch.randn(1, 1, 32, 32)).shape == (1, NUM_CLASSES)


def test_model_is_picklable_and_keeps_its_anatomy():
    model = create_model("mobilenet_v3_small", NUM_CLASSES)
    freeze(model, "head")
    copy = pickle.loads(pickle.dumps(model))
    assert anatomy_of(copy, "mobilenet_v3_small") == anatomy_of(model, "mobilenet_v3_small")
    assert copy.state_dict().keys() == model.state_dict().keys()


# --- preprocessing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "weights", "crop", "resize", "interpolation"), [
    ("resnet18", None, 224, 256, "bilinear"),
    ("resnet50", "IMAGENET1K_V2", 224, 232, "bilinear"),
    ("inception_v3", "DEFAULT", 299, 342, "bilinear"),
    ("efficientnet_b3", None, 300, 320, "bicubic"),
    ("timm:resnet18", None, 224, 235, "bicubic"),
    ("timm:vit_tiny_patch16_224", "augreg_in21k_ft_in1k", 224, 248, "bicubic"),
])
def test_resolve_preprocessing_reads_weight_metadata_offline(name, weights, crop, resize, interpolation):
    prep = resolve_preprocessing(name, weights)
    assert (prep.crop_size, prep.resize_size, prep.interpolation) == (crop, resize, interpolation)
    assert len(prep.mean) == len(prep.std) == 3


def test_resolve_preprocessing_of_a_file_uses_default_weights(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    assert resolve_preprocessing("resnet50", path) == resolve_preprocessing("resnet50", "DEFAULT")

"""``transformers`` image classifiers <-> timm and torchvision, both directions, with match="auto".

Each family is a randomly initialised ``transformers`` model from a small config and the timm
model of the same architecture; the weights of one are loaded into the other and both must give
the same logits. BatchNorm statistics and layer scales are randomised first (so a swapped tensor
cannot hide). ``transformers`` 4.x checkpoints are produced from 5.x ones by reversing the renames
``transformers`` documents in ``transformers/conversion_mapping.py``.

Norm epsilons are architecture, not weights: where the libraries configure them differently the
target's are set to the source's (as in test_checkpoint_transplant.py).
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
tvm = pytest.importorskip("torchvision.models")

from test_checkpoint_transplant import randomize_statistics
from timm.models import ConvNeXt, ResNet, SwinTransformer, VisionTransformer
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, Bottleneck

from visiontune.checkpoint import load_weights

T = transformers


def _vit_config(**extra):
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=5, layer_norm_eps=1e-6, **extra)


_TIMM_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
_CONVNEXT = dict(num_stages=4, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=5)

# family -> (transformers model, timm model); all take 32 px images
FAMILIES = {
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**_vit_config())), lambda: VisionTransformer(**_TIMM_VIT)),
    "deit": (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**_vit_config())), lambda: VisionTransformerDistilled(**_TIMM_VIT)),
    # BEiT without relative position bias (its tiny default); timm's Beit pools the mean patch token as transformers does
    "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**_vit_config())),
             lambda: Beit(**_TIMM_VIT, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=False, global_pool="avg")),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(**_CONVNEXT)),
                 lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5)),
    "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(**_CONVNEXT)),
                   lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5, use_grn=True, ls_init_value=None)),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=5)),
             lambda: SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=5)),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=64, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", num_labels=5)),
               lambda: ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=5)),
    "resnet_bottleneck": (lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=5)),
                          lambda: ResNet(Bottleneck, [1, 1, 1, 1], channels=(4, 8, 16, 32), num_classes=5)),
    "regnety": (lambda: T.RegNetForImageClassification(T.RegNetConfig(embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8, layer_type="y", num_labels=5)),
                lambda: timm.create_model("regnety_002", num_classes=5)),
    "regnetx": (lambda: T.RegNetForImageClassification(T.RegNetConfig(embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8, layer_type="x", num_labels=5)),
                lambda: timm.create_model("regnetx_002", num_classes=5)),
    # transformers' EfficientNet pads like TensorFlow, as timm's tf_ variant does
    "efficientnet": (lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, num_labels=5)),
                     lambda: timm.create_model("tf_efficientnet_b0", num_classes=5)),
    "mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=32, tf_padding=False, num_labels=5)),
                     lambda: timm.create_model("mobilenetv2_100", num_classes=5)),
}


def logits(model, images):
    if isinstance(model, T.PreTrainedModel):
        return model(pixel_values=images).logits
    return model(images)


def copy_norm_eps(source, target) -> None:
    norms = (torch.nn.modules.batchnorm._BatchNorm,)
    for source_norm, target_norm in zip([m for m in source.modules() if isinstance(m, norms)], [m for m in target.modules() if isinstance(m, norms)]):
        target_norm.eps = source_norm.eps


def to_transformers_4x(state: dict) -> dict:
    """5.x names back to 4.x: the inverse of transformers' own "ViTModel" conversion renames."""
    renamed = {}
    for key, tensor in state.items():
        key = re.sub(r"^(vit|deit|beit)\.layers\.", r"\1.encoder.layer.", key)
        for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                         ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            key = key.replace(new, old)
        renamed[key] = tensor
    return renamed


def randomize_scales(model, seed: int = 3) -> None:
    """Layer scales the shared helper does not know by name (BEiT's gamma_1/lambda_1, DINOv2's
    lambda1) made distinct, and a near-zero head (timm's BEiT starts at 0.001 scale) made visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if re.search(r"(gamma_\d|lambda_\d|lambda1)$", name):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif re.search(r"(^|\.)(head|classifier)\.weight$", name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def transplant(source, target, state=None):
    torch.manual_seed(0)
    source.eval(), target.eval()
    randomize_statistics(source)
    randomize_scales(source)
    report = load_weights(target, state if state is not None else source.state_dict(), match="auto")
    copy_norm_eps(source, target)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return report, logits(source, images), logits(target, images)


def assert_same(report, expected, actual):
    assert report.complete, str(report)
    assert_same_outputs(expected, actual, str(report))


def assert_same_outputs(expected, actual, context: str = ""):
    assert expected.abs().max() > 1e-3  # the comparison means something
    # float32 sums in another order (LayerNorm over channels first or last): ~1e-7 relative per
    # operation, a few dozen operations deep; a swapped or missing tensor changes logits by ~1e-1
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    assert (expected - actual).abs().max().item() <= tolerance, context


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_checkpoint_loads_into_timm_with_identical_outputs(family):
    build_hf, build_timm = FAMILIES[family]
    report, expected, actual = transplant(build_hf(), build_timm())
    assert_same(report, expected, actual)
    if family not in ("efficientnet", "mobilenet_v2"):  # these two line up by structure alone
        assert "transformers'" in report.notes[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_checkpoint_loads_into_transformers_with_identical_outputs(family):
    build_hf, build_timm = FAMILIES[family]
    report, expected, actual = transplant(build_timm(), build_hf())
    assert_same(report, expected, actual)


@pytest.mark.parametrize("family", ["vit", "deit", "beit"])
def test_transformers_4x_names_load_too(family):
    build_hf, build_timm = FAMILIES[family]
    source = build_hf()
    state = to_transformers_4x(source.state_dict())
    assert any(".attention.attention.query." in key for key in state)
    report, expected, actual = transplant(source, build_timm(), state)
    assert_same(report, expected, actual)


def test_report_shows_the_fused_attention_it_built(tmp_path):
    from safetensors.torch import save_file

    source = FAMILIES["vit"][0]()
    path = tmp_path / "model.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in source.state_dict().items()}, str(path))
    report = load_weights(VisionTransformer(**_TIMM_VIT), path)
    assert report.complete
    assert report.transformed["blocks.0.attn.qkv.weight"] == (
        "cat(vit.layers.0.attention.q_proj.weight, vit.layers.0.attention.k_proj.weight, vit.layers.0.attention.v_proj.weight)"
    )
    assert report.unexpected == []
    text = str(report)
    assert "built" in text and "blocks.0.attn.qkv.weight <- cat(" in text
    assert report.to_dict()["transformed"] == report.transformed


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig

    widths = (8, 16, 32, 64)
    return tvm.ConvNeXt([CNBlockConfig(width, following, 1) for width, following in zip(widths, widths[1:] + (None,))], num_classes=5)


# family -> (transformers model, torchvision model, model keys allowed to stay unloaded)
TORCHVISION_FAMILIES = {
    "vit": (FAMILIES["vit"][0], lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5), ()),
    # torchvision saves Swin's relative_position_index, a buffer computed from the window, not a weight
    "swin": (FAMILIES["swin"][0], lambda: tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=5), ("relative_position_index",)),
    "convnext": (FAMILIES["convnext"][0], _tv_convnext, ()),
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], layer_type="basic", num_labels=5)),
               lambda: tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5), ()),
    "regnety": (lambda: T.RegNetForImageClassification(T.RegNetConfig(embedding_size=32, hidden_sizes=[48, 104, 208, 440], depths=[1, 3, 6, 6], groups_width=8, layer_type="y", num_labels=5)),
                lambda: tvm.regnet_y_400mf(num_classes=5), ()),
    "mobilenet_v2": (FAMILIES["mobilenet_v2"][0], lambda: tvm.mobilenet_v2(num_classes=5), ()),
}


@pytest.mark.parametrize("direction", ["from_transformers", "to_transformers"])
@pytest.mark.parametrize("family", sorted(TORCHVISION_FAMILIES))
def test_transformers_and_torchvision_exchange_checkpoints_with_identical_outputs(family, direction):
    build_hf, build_tv, computed_buffers = TORCHVISION_FAMILIES[family]
    source, target = (build_hf(), build_tv()) if direction == "from_transformers" else (build_tv(), build_hf())
    report, expected, actual = transplant(source, target)
    if computed_buffers:
        assert not report.mismatched and all(key.endswith(computed_buffers) for key in report.missing), str(report)
    else:
        assert report.complete, str(report)
    assert_same_outputs(expected, actual)


def _dinov2_pair():
    source = T.Dinov2ForImageClassification(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, num_labels=5))
    # timm's DINOv2 backbone: layer scale, class token pooled; no head (transformers' reads [cls, mean patch])
    target = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=0, init_values=1.0)
    return source, target


@pytest.mark.parametrize("direction", ["from_transformers", "to_transformers"])
def test_dinov2_backbone_loads_both_ways_with_identical_features(direction):
    hf, tm = _dinov2_pair()
    hf.eval(), tm.eval()
    randomize_statistics(tm)  # its layer scales (ls*.gamma), so a swapped one shows
    randomize_scales(hf)  # transformers' (lambda1)
    source, target = (hf, tm) if direction == "from_transformers" else (tm, hf)
    report = load_weights(target, source.state_dict())
    if direction == "from_transformers":
        assert report.complete and set(report.unexpected) == {"dinov2.embeddings.mask_token", "classifier.weight", "classifier.bias"}, str(report)
    else:
        assert set(report.missing) == {"dinov2.embeddings.mask_token", "classifier.weight", "classifier.bias"}, str(report)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_outputs(hf.dinov2(pixel_values=images).pooler_output, tm(images), str(report))

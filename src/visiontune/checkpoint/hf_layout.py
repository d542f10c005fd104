"""``transformers`` image classifiers: their state-dict names translated to timm's.

A checkpoint saved by ``transformers`` (``ViTForImageClassification.save_pretrained`` and the
like) names its tensors after its own modules: ``vit.layers.0.attention.q_proj.weight`` in 5.x,
``vit.encoder.layer.0.attention.attention.query.weight`` in 4.x. Registration orders differ from
timm's too (a ViT layer registers its LayerNorms after the MLP), so structure alignment alone
would have to guess. Names settle it: each family below translates every key to the name timm
gives the same tensor, with attention's query/key/value kept apart (``attn.q``) for
:mod:`.readings` to fuse into timm's ``qkv``. The 4.x names are first brought to 5.x with the
renames ``transformers`` itself documents (``transformers/conversion_mapping.py``).

The translation runs on whichever side is in ``transformers``' layout: on the checkpoint's keys
to load it into timm, on the model's keys to load a timm checkpoint into a ``transformers`` model.
``transformers`` itself is never imported: this works from key names only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Replacement = str | Callable[[re.Match], str]


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: tuple[str, ...]  # the backbone attribute of the *ForImageClassification model
    rules: tuple[tuple[str, Replacement], ...]  # applied in order, each at most once per key
    block_order: tuple[str, ...] = ()  # timm's registration order inside a block, where transformers' differs


def _stage_block(template: str) -> Callable[[re.Match], str]:
    """A replacement that numbers stages and blocks from 1 (timm's ResNet and RegNet do)."""
    return lambda found: template.format(stage=int(found.group(1)) + 1, block=int(found.group(2)), block1=int(found.group(2)) + 1)


# 4.x -> 5.x, from transformers' own conversion mapping ("ViTModel", "swin")
_FOUR_TO_FIVE = (
    (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
    (r"\.attention\.(?:attention|self)\.query\.", ".attention.q_proj."),
    (r"\.attention\.(?:attention|self)\.key\.", ".attention.k_proj."),
    (r"\.attention\.(?:attention|self)\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.attention\.self\.relative_position_bias_table", ".attention.relative_position_bias.relative_position_bias_table"),
)

_ATTENTION = (
    (r"\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.k_proj\.", ".attn.k."),
    (r"\.attention\.v_proj\.", ".attn.v."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
)

# transformers registers a block's LayerNorms after its MLP; torchvision (and timm) before each part,
# and a Swin block's relative position table before its projections.
# Putting translated keys in timm's order lets structure alignment pair them with torchvision's.
_TRANSFORMER_BLOCK = ("norm1.", "attn.relative_position_bias_table", "attn.q.", "attn.k.", "attn.v.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")

FAMILIES = (
    Family("vit", ("vit.", "deit."), (
        *_FOUR_TO_FIVE,
        (r"^(?:vit|deit)\.embeddings\.cls_token$", "cls_token"),
        (r"^(?:vit|deit)\.embeddings\.distillation_token$", "dist_token"),
        (r"^(?:vit|deit)\.embeddings\.position_embeddings$", "pos_embed"),
        (r"^(?:vit|deit)\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^(?:vit|deit)\.layers\.(\d+)\.", r"blocks.\1."),
        *_ATTENTION,
        (r"^(?:vit|deit)\.layernorm\.", "norm."),
        (r"^(?:classifier|cls_classifier)\.", "head."),
        (r"^distillation_classifier\.", "head_dist."),
    ), _TRANSFORMER_BLOCK),
    Family("beit", ("beit.",), (
        *_FOUR_TO_FIVE,
        (r"^beit\.embeddings\.cls_token$", "cls_token"),
        (r"^beit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^beit\.layers\.(\d+)\.", r"blocks.\1."),
        (r"\.lambda_([12])$", r".gamma_\1"),
        *_ATTENTION,
        # BEiT's key projection has no bias: timm keeps the query and value biases apart
        (r"\.attn\.q\.bias$", ".attn.q_bias"),
        (r"\.attn\.v\.bias$", ".attn.v_bias"),
        (r"^beit\.pooler\.layernorm\.", "fc_norm."),
        (r"^classifier\.", "head."),
    ), _TRANSFORMER_BLOCK),
    Family("dinov2", ("dinov2.",), (
        *_FOUR_TO_FIVE,
        (r"^dinov2\.embeddings\.cls_token$", "cls_token"),
        (r"^dinov2\.embeddings\.position_embeddings$", "pos_embed"),
        (r"^dinov2\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^dinov2\.(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
        (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
        *_ATTENTION,
        (r"^dinov2\.layernorm\.", "norm."),
        # transformers' classifier reads the class token and the mean patch token side by side; timm has no such head
        (r"^classifier\.", "head."),
    )),
    Family("swin", ("swin.",), (
        *_FOUR_TO_FIVE,
        (r"^swin\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^swin\.embeddings\.norm\.", "patch_embed.norm."),
        # transformers merges patches at the end of a stage, timm at the start of the next
        (r"^swin\.encoder\.layers\.(\d+)\.downsample\.", lambda found: f"layers.{int(found.group(1)) + 1}.downsample."),
        (r"^swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2."),
        (r"\.attention\.relative_position_bias\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
        *_ATTENTION,
        (r"^swin\.layernorm\.", "norm."),
        (r"^classifier\.", "head.fc."),
    ), _TRANSFORMER_BLOCK),
    Family("convnext", ("convnext.", "convnextv2."), (
        (r"^convnext(?:v2)?\.embeddings\.patch_embeddings\.", "stem.0."),
        (r"^convnext(?:v2)?\.embeddings\.layernorm\.", "stem.1."),
        (r"^convnext(?:v2)?\.encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
        (r"^convnext(?:v2)?\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"\.layer_scale_parameter$", ".gamma"),
        (r"\.dwconv\.", ".conv_dw."),
        (r"(blocks\.\d+)\.layernorm\.", r"\1.norm."),
        (r"\.pwconv1\.", ".mlp.fc1."),
        (r"\.grn\.", ".mlp.grn."),
        (r"\.pwconv2\.", ".mlp.fc2."),
        (r"^convnext(?:v2)?\.layernorm\.", "head.norm."),
        (r"^classifier\.", "head.fc."),
    )),
    Family("resnet", ("resnet.",), (
        (r"^resnet\.embedder\.embedder\.convolution\.", "conv1."),
        (r"^resnet\.embedder\.embedder\.normalization\.", "bn1."),
        (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", _stage_block("layer{stage}.{block}.downsample.0.")),
        (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", _stage_block("layer{stage}.{block}.downsample.1.")),
        (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.", _stage_block("layer{stage}.{block}.layer.")),
        (r"\.layer\.(\d)\.convolution\.", lambda found: f".conv{int(found.group(1)) + 1}."),
        (r"\.layer\.(\d)\.normalization\.", lambda found: f".bn{int(found.group(1)) + 1}."),
        (r"^classifier\.1\.", "fc."),
    )),
    Family("regnet", ("regnet.",), (
        (r"^regnet\.embedder\.embedder\.convolution\.", "stem.conv."),
        (r"^regnet\.embedder\.embedder\.normalization\.", "stem.bn."),
        (r"^regnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", _stage_block("s{stage}.b{block1}.")),
        (r"\.shortcut\.convolution\.", ".downsample.conv."),
        (r"\.shortcut\.normalization\.", ".downsample.bn."),
        (r"\.layer\.2\.attention\.0\.", ".se.fc1."),
        (r"\.layer\.2\.attention\.2\.", ".se.fc2."),
        # RegNetX has three layers (conv1-3); RegNetY puts squeeze-excitation at index 2, conv3 at 3
        (r"\.layer\.0\.(convolution|normalization)\.", r".conv1.\1."),
        (r"\.layer\.1\.(convolution|normalization)\.", r".conv2.\1."),
        (r"\.layer\.[23]\.(convolution|normalization)\.", r".conv3.\1."),
        (r"\.convolution\.", ".conv."),
        (r"\.normalization\.", ".bn."),
        (r"^classifier\.1\.", "head.fc."),
    )),
)

_COMPILED = {family.name: [(re.compile(pattern), replacement) for pattern, replacement in family.rules] for family in FAMILIES}


def detect_family(keys: list[str]) -> Family | None:
    """The ``transformers`` family whose backbone prefix most keys carry (at least half), or None."""
    for family in FAMILIES:
        if keys and sum(key.startswith(family.prefixes) for key in keys) * 2 >= len(keys):
            return family
    return None


def translate(key: str, family: Family) -> str:
    for pattern, replacement in _COMPILED[family.name]:
        key = pattern.sub(replacement, key, count=1)
    return key


def timm_names(keys: list[str]) -> tuple[dict[str, str], str | None]:
    """``{timm-style name: original key}`` for keys in a ``transformers`` layout, and the family's
    name; the keys unchanged and None otherwise. Two keys translating to one name keep their own."""
    family = detect_family(keys)
    if family is None:
        return {key: key for key in keys}, None
    names: dict[str, str] = {}
    for key in keys:
        new = translate(key, family)
        names[new if new not in names else key] = key
    return {name: names[name] for name in _in_block_order(list(names), family.block_order)}, family.name


_BLOCK = re.compile(r"^(.*\.blocks\.\d+\.|blocks\.\d+\.)(.*)$")


def _in_block_order(names: list[str], block_order: tuple[str, ...]) -> list[str]:
    """Keys of one block sorted by ``block_order`` (stable), blocks and other keys where they were."""
    if not block_order:
        return names

    def rank(name: str) -> tuple[int, int]:
        found = _BLOCK.match(name)
        if not found:
            return (0, 0)
        return (0, next((index for index, part in enumerate(block_order) if found.group(2).startswith(part)), len(block_order)))

    groups: dict[str, list[str]] = {}
    for name in names:
        found = _BLOCK.match(name)
        groups.setdefault(found.group(1) if found else name, []).append(name)
    return [name for members in groups.values() for name in sorted(members, key=rank)]

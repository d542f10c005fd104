"""What a state-dict key says about its tensor: its module, its role, and which shapes may stand in."""

from __future__ import annotations

import math
from collections.abc import Sequence

Shape = tuple[int, ...]

# Roles a tensor plays inside its module; anything else (cls_token, layer_scale, ...) is "other".
WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES = "weight", "bias", "running_mean", "running_var", "num_batches_tracked"
OTHER = "other"
STANDARD_ROLES = (WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES)


def module_of(key: str) -> str:
    """'layer1.0.bn1.weight' -> 'layer1.0.bn1'; a top-level tensor belongs to module ''."""
    return key.rpartition(".")[0]


def leaf_of(key: str) -> str:
    return key.rpartition(".")[2]


def role_of(key: str) -> str:
    """The tensor's role; 'in_proj_weight' (nn.MultiheadAttention) counts as a weight."""
    leaf = leaf_of(key)
    if leaf in STANDARD_ROLES:
        return leaf
    if leaf.endswith("_weight"):
        return WEIGHT
    if leaf.endswith("_bias"):
        return BIAS
    return OTHER


def squeezed(shape: Sequence[int]) -> Shape:
    """The shape without size-1 dimensions: (C, 1, 1) and (C,) hold the same numbers in the same order."""
    return tuple(int(size) for size in shape if size != 1)


def shapes_compatible(target: Sequence[int], source: Sequence[int], role: str = OTHER) -> bool:
    """Whether ``source`` can fill ``target`` by a reshape that keeps every number in its place.

    Allowed: equal shapes; shapes that differ only by size-1 dimensions (a 1x1 conv vs a linear
    layer, a layer scale stored as (C, 1, 1) vs (C,)); and, for weights, a linear layer's
    (out, in*kh*kw) vs a conv's (out, in, kh, kw), which is how VGG-style classifiers are converted
    to convolutions (torch flattens channels-first, so the element order agrees).
    """
    target, source = tuple(target), tuple(source)
    if target == source or squeezed(target) == squeezed(source):
        return True
    if role != WEIGHT or {len(target), len(source)} != {2, 4}:
        return False
    return target[0] == source[0] and math.prod(target) == math.prod(source)

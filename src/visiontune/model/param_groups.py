"""Parameter groups for ``torch.optim``: the new head's own learning rate, layer-wise decay, and
no weight decay where it does harm.

Written as explicit dicts (like cifar10-airbench's ``param_configs``) so that a test or a log can
read exactly which tensor gets which learning rate. Weight decay is skipped for biases, norm
layers, any other 1-d tensor, timm's ``no_weight_decay()`` names and torchvision's transformer
embeddings (the torchvision reference recipes' ``--transformer-embedding-decay 0``).
"""

from __future__ import annotations

import fnmatch
import math

from torch import nn

from visiontune.errors import ConfigError
from visiontune.model.anatomy import NORM_TYPES, Anatomy, anatomy_of, group_of

# Parameter names (last component) of position embeddings and tokens: never decayed.
EMBEDDING_NAMES = frozenset({
    "class_token", "pos_embedding", "relative_position_bias_table", "cls_token", "pos_embed", "dist_token",
    "reg_token", "absolute_pos_embed",
})


def param_groups(
    model: nn.Module,
    lr: float,
    head_lr: float | None = None,
    backbone_lr_mult: float | None = None,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    *,
    anatomy: Anatomy | None = None,
) -> list[dict]:
    """Groups of the trainable parameters of ``model``, ready for ``torch.optim.X(groups)``.

    Learning rates: the head (main and auxiliary) gets ``head_lr`` (default ``lr``); the rest gets
    ``lr * backbone_lr_mult`` (default ``lr``), further scaled by ``layer_decay ** k`` for a layer
    group k groups before the head when ``layer_decay`` is given (timm/BEiT layer-wise decay).
    Each dict has ``params``, ``lr``, ``weight_decay`` and a ``name`` ("head", "backbone",
    "group3", with ``_no_decay`` for the tensors exempt from weight decay). Frozen parameters
    are left out and every trainable parameter is in exactly one group; empty groups are dropped.
    ``anatomy``: the model's :class:`~visiontune.model.anatomy.Anatomy`, when the caller has it.
    """
    _check(lr, head_lr, backbone_lr_mult, layer_decay, weight_decay)
    groups = (anatomy or anatomy_of(model)).groups
    head_index = len(groups) - 1
    backbone_lr = lr * (1.0 if backbone_lr_mult is None else backbone_lr_mult)
    no_decay = _no_decay_names(model)
    built: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = group_of(groups, name)
        if index == head_index:
            label, group_lr = "head", (lr if head_lr is None else head_lr)
        elif layer_decay is not None:
            label, group_lr = f"group{index}", backbone_lr * layer_decay ** (head_index - index)
        else:
            label, group_lr = "backbone", backbone_lr
        decays = weight_decay > 0 and name not in no_decay
        if weight_decay > 0 and not decays:
            label += "_no_decay"
        group = built.setdefault(label, {"name": label, "params": [], "lr": group_lr, "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return list(built.values())


def _check(lr, head_lr, backbone_lr_mult, layer_decay, weight_decay) -> None:
    for option, value in (("lr", lr), ("head_lr", head_lr), ("backbone_lr_mult", backbone_lr_mult), ("weight_decay", weight_decay)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
            raise ConfigError(f"{option} must be a finite number >= 0, got {value!r}")
    if layer_decay is not None and (not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1):
        raise ConfigError(f"layer_decay must be in (0, 1] (1 means no decay), got {layer_decay!r}")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that should not be weight-decayed."""
    patterns = set()
    if hasattr(model, "no_weight_decay"):
        patterns = set(model.no_weight_decay())  # timm: exact names or fnmatch patterns
    norm_prefixes = {name for name, module in model.named_modules() if isinstance(module, NORM_TYPES)}
    names = set()
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if (
            param.ndim <= 1
            or name.endswith(".bias")
            or module_name in norm_prefixes
            or name.rpartition(".")[2] in EMBEDDING_NAMES
            or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ):
            names.add(name)
    return names

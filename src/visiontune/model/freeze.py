"""Split a model into layer groups (input -> head) and freeze all but some of them.

Layer groups give "the last N groups" and layer-wise learning-rate decay a meaning for every
architecture. timm models describe their own stages (``model.group_matcher(coarse=True)``); for
everything else the groups are found from the module tree: the children of the model (and of any
container holding the head) are the stages, and a container holding most of the network
(``features``, ``encoder.layers``, ``trunk_output``, ``blocks``) is opened up until there are at
least :data:`MIN_STAGES` of them. Loose layers before the first stage form ``"stem"``, a norm layer
joins the group before it, and the last group is always ``"head"`` (main and auxiliary heads).

**BatchNorm policy.** Frozen BatchNorm layers stay in eval mode even after ``model.train()``, so
neither their affine parameters nor their running statistics change: a frozen part of the network
computes exactly what it computed before fine-tuning (timm's ``freeze`` and Keras do the same;
Lightning's ``BaseFinetuning`` leaves statistics updating). Pass ``bn="train"`` to let frozen
BatchNorm layers keep updating their running statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from visiontune.errors import ConfigError
from visiontune.model.heads import head_names

logger = logging.getLogger(__name__)

MIN_STAGES = 4  # open the biggest container until the model shows at least this many stages
BN_POLICIES = ("frozen", "train")
NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerGroup:
    """A stage of the network: the qualified names of the modules (or loose parameters) in it."""

    name: str
    modules: list[str] = field(default_factory=list)


def owns(prefix: str, name: str) -> bool:
    """True when the module or parameter ``name`` is ``prefix`` or lies inside it."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def group_of(groups: list[LayerGroup], name: str) -> int:
    """Index of the group holding the module or parameter ``name`` (-1 if none)."""
    for index, group in enumerate(groups):
        if any(owns(prefix, name) for prefix in group.modules):
            return index
    return -1


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's stages ordered from input to head; the last group is ``"head"``.

    Every parameter belongs to exactly one group.
    """
    heads = head_names(model)
    groups = _timm_groups(model, heads) if hasattr(model, "group_matcher") else None
    if groups is None:
        groups = _tree_groups(model, heads)
    return groups + [LayerGroup("head", list(heads))]


# --- groups from timm's own stage description ---------------------------------------------------


def _timm_groups(model: nn.Module, heads: list[str]) -> list[LayerGroup] | None:
    from timm.models._manipulate import group_parameters

    try:
        grouped = group_parameters(model, model.group_matcher(coarse=True))
    except (NotImplementedError, AttributeError, TypeError, ValueError) as error:  # not every timm model has one
        logger.debug("timm group_matcher unusable for %s: %s", type(model).__name__, error)
        return None
    all_names = [n for n, _ in model.named_parameters()]
    groups = []
    for index in sorted(grouped):
        names = [n for n in grouped[index] if not any(owns(h, n) for h in heads)]
        if names:
            prefixes = _collapse(names, all_names)
            label = "stem" if not groups and len(prefixes) > 1 else prefixes[0]
            groups.append(LayerGroup(label, prefixes))
    return groups


def _collapse(names: list[str], all_names: list[str]) -> list[str]:
    """The shortest module prefixes that cover ``names`` and nothing else of ``all_names``."""
    chosen: list[str] = []
    wanted = set(names)
    for name in names:
        if any(owns(p, name) for p in chosen):
            continue
        parts = name.split(".")
        best = name
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if all(n in wanted for n in all_names if owns(prefix, n)):
                best = prefix
                break
        chosen.append(best)
    return chosen


# --- groups from the module tree -----------------------------------------------------------------


@dataclass
class _Unit:
    name: str
    module: nn.Module | None  # None for a parameter held directly by a container
    size: int  # number of parameter elements

    @property
    def is_stage(self) -> bool:
        return self.module is not None and any(_has_state(c) for c in self.module.children())


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _open(module: nn.Module, prefix: str, heads: list[str]) -> list[_Unit]:
    """The parts of ``module`` in order; containers of a head are opened, the heads left out."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    units = [_Unit(join(n), None, p.numel()) for n, p in module.named_parameters(recurse=False)]
    for child_name, child in module.named_children():
        name = join(child_name)
        if name in heads or not _has_state(child):
            continue
        if any(owns(name, h) for h in heads):
            units += _open(child, name, heads)
        else:
            units.append(_Unit(name, child, sum(p.numel() for p in child.parameters())))
    return units


def _tree_groups(model: nn.Module, heads: list[str]) -> list[LayerGroup]:
    units = _open(model, "", heads)
    while sum(u.is_stage for u in units) < MIN_STAGES:
        stages = [u for u in units if u.is_stage]
        if not stages:
            break
        biggest = max(stages, key=lambda u: u.size)
        at = units.index(biggest)
        units[at:at + 1] = _open(biggest.module, biggest.name, heads)
    return _merge(units)


def _merge(units: list[_Unit]) -> list[LayerGroup]:
    groups: list[LayerGroup] = []
    first_stage = next((i for i, u in enumerate(units) if u.is_stage), None)
    for index, unit in enumerate(units):
        in_stem = first_stage is not None and index < first_stage
        if in_stem:
            if not groups:
                groups.append(LayerGroup("stem"))
            groups[-1].modules.append(unit.name)
        elif groups and isinstance(unit.module, NORM_TYPES):
            groups[-1].modules.append(unit.name)  # a norm belongs with the layer it normalises
        else:
            groups.append(LayerGroup(unit.name, [unit.name]))
    return groups


# --- freezing ------------------------------------------------------------------------------------


def freeze(model: nn.Module, train: str | int | Sequence[str] = "head", bn: str = "frozen") -> list[str]:
    """Make only part of ``model`` trainable; return the names of the trainable parameters.

    ``train``: ``"head"`` (linear probing), ``"all"``, an int N (the last N layer groups plus the
    head), or module-name prefixes / group names such as ``["layer4", "fc"]``. Frozen parameters
    get ``requires_grad=False``. ``bn``: ``"frozen"`` (default) keeps BatchNorm layers outside the
    trained part in eval mode through ``model.train()`` so their statistics never change;
    ``"train"`` lets them update. Calling again re-freezes from scratch (gradual unfreezing).
    """
    if bn not in BN_POLICIES:
        raise ConfigError(f"unknown BatchNorm policy bn={bn!r}; choose one of {', '.join(BN_POLICIES)}")
    groups = layer_groups(model)
    prefixes = _trainable_prefixes(model, groups, train)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(owns(p, name) for p in prefixes))
        if param.requires_grad:
            trainable.append(name)
    if not any(owns(h, n) for h in groups[-1].modules for n in trainable):
        logger.warning("freeze(train=%r) leaves the head %s frozen", train, groups[-1].modules)
    for name, module in model.named_modules():
        if isinstance(module, _NormBase):
            frozen = not any(owns(p, name) or owns(name, p) for p in prefixes)
            _set_bn_frozen(module, frozen and bn == "frozen", model.training)
    logger.debug("freeze(train=%r): %d trainable tensors", train, len(trainable))
    return trainable


def _trainable_prefixes(model: nn.Module, groups: list[LayerGroup], train) -> list[str]:
    if isinstance(train, str) and train.isdigit():
        train = int(train)
    if train == "all":
        return [""]
    if train == "head":
        return list(groups[-1].modules)
    if isinstance(train, int) and not isinstance(train, bool):
        if train < 0:
            raise ConfigError(f"train={train} must be >= 0 (the number of layer groups to train before the head)")
        chosen = groups[-1 - train:] if train < len(groups) - 1 else groups
        return [p for g in chosen for p in g.modules]
    names = [train] if isinstance(train, str) else list(train) if isinstance(train, Sequence) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"train={train!r} must be 'head', 'all', an int or a list of module names")
    by_group = {g.name: g.modules for g in groups}
    param_names = [n for n, _ in model.named_parameters()]
    prefixes = []
    for name in names:
        if name in by_group:
            prefixes += by_group[name]
        elif any(owns(name, n) for n in param_names):
            prefixes.append(name)
        else:
            valid = list(dict.fromkeys(list(by_group) + [n for n, _ in model.named_children()]))
            raise ConfigError(
                f"train: no parameters under {name!r} in {type(model).__name__}; valid names are "
                f"'head', 'all', a number, or module prefixes such as {', '.join(valid)}"
            )
    return prefixes


def _keep_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen BatchNorm: undo ``model.train()`` before it can update stats.

    A module-level function (not a lambda), so models stay picklable and copyable."""
    if module.training:
        module.train(False)


def _set_bn_frozen(module: nn.Module, frozen: bool, model_training: bool) -> None:
    hooks = module._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if hook is _keep_in_eval]:
        del hooks[key]
    if frozen:
        module.register_forward_pre_hook(_keep_in_eval)
        module.train(False)
    else:
        module.train(model_training)  # an unfrozen layer follows the model's mode again

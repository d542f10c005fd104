"""A model's anatomy, found once: its name, its heads and its layer groups (input -> head).

timm declares a model's anatomy in its own config (``pretrained_cfg["classifier"]`` names the head,
``group_matcher`` the stages); :func:`anatomy_of` gives every model the same description, built
from the head finder (:func:`visiontune.model.heads.head_names`) and the layer-group rules below.
The training set-up computes it once, when the model has its final modules (new head,
SyncBatchNorm, ``compile``), and passes it to freezing, parameter groups, layer decay and the
feature cache, so no later stage searches the module tree again. It holds qualified module names,
which stay valid while no module is replaced: freezing, compiling and loading weights keep them.

**Layer groups** give "the last N groups" and layer-wise learning-rate decay a meaning for every
architecture. timm models describe their own stages (``model.group_matcher(coarse=True)``); for
everything else the groups are found from the module tree: the children of the model (and of any
container holding the head) are the stages, and a container holding most of the network
(``features``, ``encoder.layers``, ``trunk_output``, ``blocks``) is opened up until there are at
least :data:`MIN_STAGES` of them. Loose layers before the first stage form ``"stem"``, a norm layer
joins the group before it, and the last group is always ``"head"`` (main and auxiliary heads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from visiontune.model.heads import head_names

logger = logging.getLogger(__name__)

MIN_STAGES = 4  # open the biggest container until the model shows at least this many stages
NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerGroup:
    """A stage of the network: the qualified names of the modules (or loose parameters) in it."""

    name: str
    modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Anatomy:
    """Where things are in one model, by qualified module name."""

    name: str  # the model's name as create_model took it ("resnet18", "timm:convnext_atto"), else its class
    head: str  # the main classification head
    aux_heads: tuple[str, ...]  # auxiliary heads (inception's AuxLogits.fc, timm's head_dist), trained with it
    groups: tuple[LayerGroup, ...]  # stages from input to head; the last is "head" (main and auxiliary)

    @property
    def heads(self) -> list[str]:
        """The main head first, then the auxiliary ones: for freezing and learning rates all "head"."""
        return [self.head, *self.aux_heads]

    def head_module(self, model: nn.Module) -> nn.Module:
        """The main head's module in ``model`` (the model this anatomy was taken of)."""
        return model.get_submodule(self.head)

    def layer_groups(self) -> list[LayerGroup]:
        """The groups as new objects: a caller may edit them without changing this anatomy."""
        return [LayerGroup(group.name, list(group.modules)) for group in self.groups]


def anatomy_of(model: nn.Module, name: str | None = None) -> Anatomy:
    """Find ``model``'s heads and layer groups; ``name`` (default: the class name) is recorded as is.

    Raises :class:`~visiontune.errors.ModelError` when the model has no recognisable head."""
    heads = head_names(model)
    groups = find_layer_groups(model, heads) + [LayerGroup("head", list(heads))]
    return Anatomy(name=name or type(model).__name__, head=heads[0], aux_heads=tuple(heads[1:]), groups=tuple(groups))


def layer_groups(model: nn.Module, *, anatomy: Anatomy | None = None) -> list[LayerGroup]:
    """The model's stages ordered from input to head; the last group is ``"head"``.

    Every parameter belongs to exactly one group. ``anatomy``: the model's, when the caller has it."""
    return (anatomy or anatomy_of(model)).layer_groups()


def owns(prefix: str, name: str) -> bool:
    """True when the module or parameter ``name`` is ``prefix`` or lies inside it."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def group_of(groups: list[LayerGroup] | tuple[LayerGroup, ...], name: str) -> int:
    """Index of the group holding the module or parameter ``name`` (-1 if none)."""
    for index, group in enumerate(groups):
        if any(owns(prefix, name) for prefix in group.modules):
            return index
    return -1


def find_layer_groups(model: nn.Module, heads: list[str]) -> list[LayerGroup]:
    """The stages before the head (``heads``: its qualified names), from timm's description or the tree."""
    groups = _timm_groups(model, heads) if hasattr(model, "group_matcher") else None
    return _tree_groups(model, heads) if groups is None else groups


# --- groups from timm's own stage description ---------------------------------------------------


def _timm_groups(model: nn.Module, heads: list[str]) -> list[LayerGroup] | None:
    # Deferred: timm is slow to import, and only a timm model (which has already imported it) gets here.
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

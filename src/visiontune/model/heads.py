"""Find a classifier's head and replace it for a new number of classes.

The head is the layer that produces the class scores. timm models name theirs in
``pretrained_cfg["classifier"]``; for anything else (every torchvision classifier and a user's
own module) it is the last ``nn.Linear`` or 1x1 ``nn.Conv2d`` in registration order, which is
where torchvision defines it (``fc``, ``classifier.1``, ``heads.head``, squeezenet's 1x1 conv
``classifier.1``). Auxiliary heads (googlenet's ``aux1``/``aux2``, inception's ``AuxLogits``,
timm's distillation head) are the last such layer inside a child whose name says ``aux``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from visiontune.errors import ModelError
from visiontune.model.init import init_weights

logger = logging.getLogger(__name__)


def _is_head_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _timm_head_names(model: nn.Module) -> list[str] | None:
    """Heads named by a timm model's own config, if it has one that points at real layers."""
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    if not names or not hasattr(model, "reset_classifier"):
        return None
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    if all(name in modules and _is_head_layer(modules[name]) for name in names):
        return names
    return None


def find_head(model: nn.Module, *, anatomy=None) -> tuple[str, nn.Module]:
    """Return ``(qualified_name, module)`` of the model's main classification head.

    ``anatomy``: the model's :class:`~visiontune.model.anatomy.Anatomy`, when the caller has it
    (then nothing is searched). Raises ModelError when the model has no linear / 1x1-conv layer,
    or when its last two such layers are interchangeable siblings (two heads side by side: which
    one is the classifier?).
    """
    name = anatomy.head if anatomy is not None else locate_heads(model)[0]
    return name, model.get_submodule(name)


def head_names(model: nn.Module, *, anatomy=None) -> list[str]:
    """Qualified names of the main head first, then the auxiliary heads; for freezing and
    learning rates they all count as "head". ``anatomy``: as for :func:`find_head`."""
    return list(anatomy.heads) if anatomy is not None else locate_heads(model)


def locate_heads(model: nn.Module) -> list[str]:
    """The head finder: the main head's qualified name, then the auxiliary heads' (one per
    auxiliary branch, its last head-like layer). Everything that searches a model for its heads
    comes through here; :func:`visiontune.model.anatomy.anatomy_of` keeps the answer."""
    timm_heads = _timm_head_names(model)
    if timm_heads:
        return timm_heads
    main = _main_head(model)
    auxiliary = {}
    for name, module in model.named_modules():
        if _is_head_layer(module) and _is_auxiliary(name):
            branch = next(i for i, part in enumerate(name.split(".")) if "aux" in part.lower())
            auxiliary[".".join(name.split(".")[: branch + 1])] = name  # keeps the branch's last one
    return [main] + list(auxiliary.values())


def _main_head(model: nn.Module) -> str:
    """The last linear / 1x1-conv leaf outside an auxiliary branch, unless it has a rival sibling."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    candidates = [i for i, (n, m) in enumerate(leaves) if _is_head_layer(m) and not _is_auxiliary(n)]
    if not candidates:
        raise ModelError(
            f"cannot find the classification head of {type(model).__name__}: it has no nn.Linear or "
            "1x1 nn.Conv2d layer outside an auxiliary branch; replace the head yourself or wrap the "
            "model so that its last layer is the classifier"
        )
    last = candidates[-1]
    name, _ = leaves[last]
    if len(candidates) > 1 and _are_parallel(leaves, candidates[-2], last):
        other = leaves[candidates[-2]][0]
        raise ModelError(
            f"the head of {type(model).__name__} is ambiguous: {other!r} and {name!r} are sibling "
            "layers with the same input width and either could be the classifier; replace the "
            "head yourself (model.<name> = nn.Linear(...)) and pass the model on"
        )
    return name


def _is_auxiliary(qualified_name: str) -> bool:
    return any("aux" in part.lower() for part in qualified_name.split(".")[:-1])


def _in_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _are_parallel(leaves: list[tuple[str, nn.Module]], first: int, second: int) -> bool:
    """Two head-like layers are rivals when they sit next to each other in the same parent and
    both read the same features (a multi-task model), not when one can feed the other."""
    (name_a, a), (name_b, b) = leaves[first], leaves[second]
    same_parent = name_a.rpartition(".")[0] == name_b.rpartition(".")[0]
    adjacent = second == first + 1
    same_input = _in_width(a) == _in_width(b) and _out_width(a) != _in_width(b)
    return same_parent and adjacent and same_input


def replace_head(model: nn.Module, num_classes: int, init: str = "kaiming") -> nn.Module:
    """Give ``model`` new, freshly initialised heads (main and auxiliary) with ``num_classes``
    outputs. Each new layer keeps the old one's input width, bias, device and dtype; nothing of the
    old head's weights is kept. ``init`` is an :func:`~visiontune.model.init.init_weights`
    scheme (a 1x1-conv head is initialised as the linear layer it is). Returns ``model``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    names = locate_heads(model)
    if _timm_head_names(model):
        old = model.get_submodule(names[0]).weight
        model.reset_classifier(num_classes)  # timm knows its own head layouts (pooling, dist heads)
        for name in names:
            _init_head(model.get_submodule(name).to(device=old.device, dtype=old.dtype), init)
        return model
    for name in names:
        new = _new_head_like(model.get_submodule(name), num_classes)
        model.set_submodule(name, _init_head(new, init))
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes  # e.g. squeezenet keeps it as an attribute
    logger.debug("replaced head(s) %s for %d classes", names, num_classes)
    return model


@torch.no_grad()
def _init_head(head: nn.Module, scheme: str) -> nn.Module:
    """A 1x1-conv head is a linear classifier applied at every position, so it is initialised as
    that linear layer: the conv formula's n = out_channels would give a 3-class head weights of
    std 0.8 and saturated logits (torchvision uses std 0.01 for squeezenet's for that reason)."""
    if not isinstance(head, nn.Conv2d):
        return init_weights(head, scheme)
    linear = nn.Linear(head.in_channels, head.out_channels, bias=head.bias is not None,
                       device=head.weight.device, dtype=head.weight.dtype)
    init_weights(linear, scheme)
    head.weight.copy_(linear.weight.view_as(head.weight))
    if head.bias is not None:
        head.bias.copy_(linear.bias)
    return head


def _new_head_like(old: nn.Module, num_classes: int) -> nn.Module:
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    return nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None, **factory)

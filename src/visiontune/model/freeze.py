"""Freeze all but part of a model, and the BatchNorm policy that goes with it.

What "the last N groups" or "the head" means comes from the model's
:class:`~visiontune.model.anatomy.Anatomy` (its heads and layer groups).

**BatchNorm policy** (the one rule; the training loop's :func:`set_train_mode` applies it too).
Frozen BatchNorm layers stay in eval mode even after ``model.train()``, so neither their affine
parameters nor their running statistics change: a frozen part of the network computes exactly
what it computed before fine-tuning (timm's ``freeze`` and Keras do the same; Lightning's
``BaseFinetuning`` leaves statistics updating). Pass ``bn="train"`` to let frozen BatchNorm layers
keep updating their running statistics. In a model :func:`freeze` never saw, a BatchNorm layer
whose affine parameters all have ``requires_grad=False`` counts as frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from visiontune.errors import ConfigError
from visiontune.model.anatomy import NORM_TYPES, Anatomy, LayerGroup, anatomy_of, group_of, layer_groups, owns

# The layer-group names keep this module as their public home too (visiontune.layer_groups, tests).
__all__ = ["BN_POLICIES", "NORM_TYPES", "LayerGroup", "freeze", "group_of", "is_frozen_batchnorm", "layer_groups",
           "owns", "set_train_mode"]

logger = logging.getLogger(__name__)

BN_POLICIES = ("frozen", "train")


# --- freezing ------------------------------------------------------------------------------------


def freeze(model: nn.Module, train: str | int | Sequence[str] = "head", bn: str = "frozen", *,
           anatomy: Anatomy | None = None) -> list[str]:
    """Make only part of ``model`` trainable; return the names of the trainable parameters.

    ``train``: ``"head"`` (linear probing), ``"all"``, an int N (the last N layer groups plus the
    head), or module-name prefixes / group names such as ``["layer4", "fc"]``. Frozen parameters
    get ``requires_grad=False``. ``bn``: ``"frozen"`` (default) keeps BatchNorm layers outside the
    trained part in eval mode through ``model.train()`` so their statistics never change;
    ``"train"`` lets them update. Calling again re-freezes from scratch (gradual unfreezing).
    ``anatomy``: the model's :class:`~visiontune.model.anatomy.Anatomy`, when the caller has it.
    """
    if bn not in BN_POLICIES:
        raise ConfigError(f"unknown BatchNorm policy bn={bn!r}; choose one of {', '.join(BN_POLICIES)}")
    groups = (anatomy or anatomy_of(model)).groups
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
            _set_bn_policy(module, bn if frozen else None, model.training)
    logger.debug("freeze(train=%r): %d trainable tensors", train, len(trainable))
    return trainable


def _trainable_prefixes(model: nn.Module, groups: tuple[LayerGroup, ...], train) -> list[str]:
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


# --- the BatchNorm policy ------------------------------------------------------------------------


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """The one BatchNorm rule: True when ``module`` is a norm layer with running statistics that
    must stay in eval mode while the model trains. :func:`freeze` decides for the layers it saw
    (``bn="frozen"``: frozen outside the trained part; ``bn="train"``: never); in a model it never
    saw, a layer whose affine parameters all have ``requires_grad=False`` is frozen."""
    if not isinstance(module, _NormBase):
        return False
    for hook in module._forward_pre_hooks.values():
        if hook is _keep_in_eval:
            return True
        if hook is _update_statistics:
            return False
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()`` under the BatchNorm policy: how the training loop enters training mode.

    Frozen norm layers (:func:`is_frozen_batchnorm`) are put in eval mode now rather than at their
    next forward, so code that reads ``.training`` (the feature-cache plan) sees what will run."""
    model.train()
    for module in model.modules():
        if is_frozen_batchnorm(module):
            module.train(False)


def _keep_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen BatchNorm: undo ``model.train()`` before it can update stats.

    A module-level function (not a lambda), so models stay picklable and copyable."""
    if module.training:
        module.train(False)


def _update_statistics(module: nn.Module, args) -> None:
    """Forward pre-hook that does nothing: it records ``freeze(bn="train")``'s choice on a frozen
    layer, so :func:`set_train_mode` lets its statistics update as asked."""


def _set_bn_policy(module: nn.Module, policy: str | None, model_training: bool) -> None:
    """``policy``: ``"frozen"`` or ``"train"`` for a layer in the frozen part, None for a trained one."""
    hooks = module._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if hook in (_keep_in_eval, _update_statistics)]:
        del hooks[key]
    if policy == "frozen":
        module.register_forward_pre_hook(_keep_in_eval)
        module.train(False)
        return
    if policy == "train":
        module.register_forward_pre_hook(_update_statistics)
    module.train(model_training)  # an unfrozen layer follows the model's mode again

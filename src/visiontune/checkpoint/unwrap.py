"""Find the state dict inside whatever a checkpoint file holds.

Training scripts wrap weights in dicts with the epoch, the optimizer and so on, under a handful of
conventional names; some save the whole ``nn.Module``. ``unwrap`` digs the tensors out and says
where it found them, so the report can tell the user (for example that EMA weights were used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from visiontune.errors import CheckpointError

logger = logging.getLogger(__name__)

# Searched in this order: the trained weights first, the EMA copies only when nothing else is there
# (or when the caller asks for them), since a checkpoint holding both means the user chose.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params", "weights")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")


@dataclass(frozen=True)
class Unwrapped:
    state_dict: dict
    unwrapped_from: str | None  # e.g. "state_dict", "model.ema" (nested), None for a bare state dict
    wrapper_keys: tuple[str, ...]  # the top-level keys of the wrapping dict, for `inspect`


def unwrap(obj: object, prefer_ema: bool = False, origin: str = "checkpoint") -> Unwrapped:
    """Return the tensors held by ``obj`` (a state dict, a wrapping dict, or a whole model)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return Unwrapped(dict(obj.state_dict()), "whole pickled model", ())
    if not isinstance(obj, dict):
        raise CheckpointError(f"The {origin} holds a {type(obj).__name__}, not a dict of tensors; there are no weights to load in it.")
    path = _find_weights(obj, prefer_ema, depth=0)
    if path is None:
        raise CheckpointError(_nothing_found_message(obj, origin))
    found = obj
    for key in path:
        found = found[key]
    if isinstance(found, torch.nn.Module):
        found = found.state_dict()
    tensors = {key: value for key, value in found.items() if isinstance(value, torch.Tensor)}
    wrapper_keys = tuple(str(key) for key in obj) if path else ()
    return Unwrapped(tensors, _describe(path), wrapper_keys)


def _find_weights(obj: dict, prefer_ema: bool, depth: int) -> tuple[str, ...] | None:
    """Path of keys leading to the state dict inside ``obj``; () when ``obj`` is one itself."""
    import torch

    if _is_state_dict(obj):
        return ()
    if depth >= 3:
        return None
    names = EMA_KEYS + WEIGHT_KEYS if prefer_ema else WEIGHT_KEYS + EMA_KEYS
    for name in names:
        value = obj.get(name)
        if isinstance(value, torch.nn.Module):
            return (name,)
        if isinstance(value, dict):
            inner = _find_weights(value, prefer_ema, depth + 1)
            if inner is not None:
                return (name, *inner)
    return None


def _is_state_dict(obj: dict) -> bool:
    """A dict whose values are mostly tensors (a few extras such as a version number are tolerated)."""
    import torch

    if not obj:
        return False
    tensors = sum(isinstance(value, torch.Tensor) for value in obj.values())
    return tensors > 0 and tensors >= 0.9 * len(obj) and all(isinstance(key, str) for key in obj)


def _describe(path: tuple[str, ...]) -> str | None:
    return ".".join(path) if path else None


def _nothing_found_message(obj: dict, origin: str) -> str:
    keys = ", ".join(repr(key) for key in list(obj)[:12])
    return (
        f"The {origin} is a dict without tensors where visiontune looks for them; its keys are {keys}. "
        f"Weights are expected directly or under one of {', '.join(WEIGHT_KEYS + EMA_KEYS)}. "
        "Pass the inner state dict yourself (load_weights(model, checkpoint['your_key']))."
    )

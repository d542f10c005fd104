"""Prefix cleaning: make checkpoint keys line up with the model's before matching them.

Wrappers add prefixes: ``module.`` (DataParallel / DistributedDataParallel), ``_orig_mod.``
(torch.compile), and training frameworks store the network under an attribute such as ``model.``,
``backbone.`` or ``encoder.``. The wrapper prefixes are always removed; a framework prefix is only
removed (or added) when doing so makes more names line up with the model.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """'module._orig_mod.conv1.weight' -> 'conv1.weight'."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def clean_keys(source_keys: list[str], target_keys: list[str]) -> dict[str, str]:
    """Map each cleaned source key to its original name, choosing the prefix fix that lines up most names.

    Keys that would collide after cleaning keep their original names (the first one wins the
    cleaned name), so no tensor is ever lost by cleaning.
    """
    cleaned = _rename_without_collisions(source_keys, strip_wrapper_prefixes)
    targets = set(target_keys)
    best_overlap = len(targets & set(cleaned))
    best = cleaned
    for rename in _prefix_candidates(list(cleaned), target_keys):
        candidate = _rename_without_collisions(list(cleaned), rename)
        overlap = len(targets & set(candidate))
        if overlap > best_overlap:
            best_overlap, best = overlap, {new: cleaned[old] for new, old in candidate.items()}
    return best


def _rename_without_collisions(keys: list[str], rename) -> dict[str, str]:
    renamed: dict[str, str] = {}
    for key in keys:
        new_key = rename(key)
        renamed[new_key if new_key not in renamed else key] = key
    return renamed


def _prefix_candidates(source_keys: list[str], target_keys: list[str]):
    """Renamings worth trying: drop a leading component of the source, or add the target's."""
    for prefix in _leading_components(source_keys):
        yield lambda key, prefix=prefix: key.removeprefix(prefix)
    for prefix in _leading_components(target_keys):
        yield lambda key, prefix=prefix: key if key.startswith(prefix) else prefix + key


def _leading_components(keys: list[str], min_share: float = 0.5) -> list[str]:
    """Leading components ('model.', 'model.backbone.') shared by at least half the keys, most common first."""
    counts: Counter[str] = Counter()
    for depth in (1, 2):
        counts.update(".".join(key.split(".")[:depth]) + "." for key in keys if key.count(".") > depth)
    return [prefix for prefix, count in counts.most_common(6) if count >= min_share * len(keys)]

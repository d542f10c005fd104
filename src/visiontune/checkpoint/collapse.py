"""Collapse long key lists for people: ``layer1.*, layer2.*, layer3.*, layer4.*`` -> ``layer{1..4}.*``."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

_DIGITS = re.compile(r"(\d+)")


def collapse_numbers(items: Sequence[str], tags: Sequence[Hashable] | None = None) -> list[str]:
    """Merge strings that differ in one number at a time into ranges, keeping first-seen order.

    Only strings with equal ``tags`` (for example equal shapes) are merged.
    """
    tags = list(tags) if tags is not None else [None] * len(items)
    entries = [(_DIGITS.split(item), tag) for item, tag in zip(items, tags)]
    max_tokens = max((len(tokens) for tokens, _ in entries), default=0)
    for position in range(max_tokens - 2, 0, -2):  # digit tokens sit at odd positions; last first
        entries = _merge_at(entries, position)
    return ["".join(tokens) for tokens, _ in entries]


def _merge_at(entries, position: int):
    groups: dict[tuple, list[str]] = {}
    order: list[tuple] = []
    for tokens, tag in entries:
        if len(tokens) <= position:
            key = (tuple(tokens), tag, None)
        else:
            key = (tuple(tokens[:position]), tuple(tokens[position + 1 :]), tag)
        if key not in groups:
            groups[key] = []
            order.append((key, tokens, tag))
        groups[key].append(tokens[position] if len(tokens) > position else "")
    merged = []
    for key, tokens, tag in order:
        values = groups[key]
        if len(values) > 1 and all(value.isdigit() for value in values):
            tokens = list(tokens)
            tokens[position] = _format_range([int(value) for value in values])
        merged.append((tokens, tag))
    return merged


def _format_range(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{{{numbers[0]}..{numbers[-1]}}}"
    return "{" + ",".join(str(number) for number in numbers) + "}"


def collapse_subtrees(selected: Iterable[str], universe: Sequence[str]) -> list[str]:
    """Name ``selected`` keys by the largest module prefixes they fill completely, then merge numbers.

    ``universe`` is every key of the same state dict, so ``layer1.*`` means "all of layer1".
    """
    chosen = set(selected)
    total: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    for key in universe:
        for prefix in _prefixes(key):
            total[prefix] += 1
            inside[prefix] += key in chosen
    patterns: list[str] = []
    for key in universe:
        if key not in chosen:
            continue
        prefix = next(p for p in _prefixes(key) if total[p] == inside[p])
        pattern = key if prefix == key else prefix + ".*"
        if not patterns or patterns[-1] != pattern:
            patterns.append(pattern)
    return collapse_numbers(list(dict.fromkeys(patterns)))


def _prefixes(key: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c'] (shortest first)."""
    parts = key.split(".")
    return [".".join(parts[: index + 1]) for index in range(len(parts))]

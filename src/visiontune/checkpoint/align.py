"""``match="auto"``: names first, then a structure-aware alignment for what is left.

Two implementations of one architecture (torchvision's and timm's EfficientNet, say) name their
tensors differently but build the same modules in nearly the same order. So the leftovers of both
sides are cut into *units* — one module's tensors (a conv's weight and bias, a BatchNorm's four
tensors) or one free-standing tensor (a class token) — and each unit gets a signature: its tensor
roles and shapes (size-1 dimensions ignored). The two sequences of units are then aligned by
order like two strings (a longest common subsequence over compatible signatures).

A wrong load is worse than no load, so a pairing is accepted only when the evidence leaves no
choice:

1. the pair belongs to *every* optimal alignment (we count the distinct optimal alignments
   through each pair; where two equal-shaped neighbours could swap there are two, and neither is
   taken);
2. between two accepted pairs, a unit whose signature occurs exactly once on each side is paired
   even if the order differs (a position embedding stored before or after the patch projection);
3. what is still left stays unloaded and the report says so. A last unit on each side of a gap
   with the same roles but other shapes (a 1000-class head against a 10-class one) is reported
   as mismatched, never loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise

from visiontune.checkpoint.keys import (
    NUM_BATCHES,
    OTHER,
    STANDARD_ROLES,
    Shape,
    module_of,
    role_of,
    shapes_compatible,
    squeezed,
)
from visiontune.checkpoint.match import Plan, ShapeMap, match_by_name

logger = logging.getLogger(__name__)

_ROLE_ORDER = {role: index for index, role in enumerate(STANDARD_ROLES + (OTHER,))}


@dataclass(frozen=True)
class Unit:
    """The tensors of one module (or one free-standing tensor), in state-dict order."""

    module: str
    keys: tuple[str, ...]
    roles: tuple[str, ...]
    shapes: tuple[Shape, ...]
    floating: bool
    signature: tuple  # see _signature


    @property
    def label(self) -> str:
        return self.keys[0] if len(self.keys) == 1 else f"{self.module}.*"


def match_auto(target: ShapeMap, source: ShapeMap, target_floating: dict[str, bool], source_floating: dict[str, bool]) -> Plan:
    """Names first; then align the leftovers by structure (see the module docstring)."""
    plan = match_by_name(target, source, whole_modules=True)
    used_targets = plan.decided_targets()
    used_sources = plan.used_sources()
    target_units = build_units({k: s for k, s in target.items() if k not in used_targets}, target_floating)
    source_units = build_units({k: s for k, s in source.items() if k not in used_sources}, source_floating)
    if target_units and source_units:
        plan.add(align_units(target_units, source_units))
    return plan


def build_units(shapes: ShapeMap, floating: dict[str, bool]) -> list[Unit]:
    """Cut an ordered state dict into units: consecutive tensors of one module, or a lone tensor."""
    units: list[Unit] = []
    current: list[str] = []

    def close() -> None:
        if current:
            units.append(_unit(current, shapes, floating))
            current.clear()

    for key in shapes:
        role = role_of(key)
        # the integer counter may come first (safetensors files store tensors grouped by dtype)
        numbers = next((other for other in current if role_of(other) != NUM_BATCHES), None)
        starts_new = (
            not current
            or role == OTHER
            or role_of(current[-1]) == OTHER
            or module_of(key) != module_of(current[-1])
            or role in {role_of(other) for other in current}
            or (role != NUM_BATCHES and numbers is not None and floating.get(key, True) != floating.get(numbers, True))
        )
        if starts_new:
            close()
        current.append(key)
    close()
    return units


def _unit(keys: list[str], shapes: ShapeMap, floating: dict[str, bool]) -> Unit:
    roles = tuple(role_of(key) for key in keys)
    unit_shapes = tuple(squeezed(shapes[key]) if role == OTHER else tuple(shapes[key]) for key, role in zip(keys, roles))
    # the integer num_batches_tracked does not make a BatchNorm an integer unit
    is_floating = next((floating.get(key, True) for key, role in zip(keys, roles) if role != NUM_BATCHES), True)
    return Unit(module_of(keys[0]), tuple(keys), roles, unit_shapes, is_floating, _signature(roles, unit_shapes, is_floating))


def _signature(roles: tuple[str, ...], shapes: tuple[Shape, ...], is_floating: bool) -> tuple:
    """Roles and shapes, ignoring num_batches_tracked (some checkpoints drop it; it carries no weights)."""
    parts = sorted((_ROLE_ORDER[role], role, shape) for role, shape in zip(roles, shapes) if role != NUM_BATCHES)
    return (is_floating, tuple((role, shape) for _, role, shape in parts))


class _Compatibility:
    """Memoised unit compatibility: a model has few distinct signatures, so this is cheap."""

    def __init__(self) -> None:
        self._cache: dict[tuple, bool] = {}

    def __call__(self, target: Unit, source: Unit) -> bool:
        key = (target.signature, source.signature)
        if key not in self._cache:
            self._cache[key] = _units_fit(target, source)
        return self._cache[key]


def _units_fit(target: Unit, source: Unit) -> bool:
    target_parts, source_parts = target.signature[1], source.signature[1]
    if target.floating != source.floating or [r for r, _ in target_parts] != [r for r, _ in source_parts]:
        return False
    return all(shapes_compatible(t, s, role) for (role, t), (_, s) in zip(target_parts, source_parts))


def _same_roles(target: Unit, source: Unit) -> bool:
    return [r for r, _ in target.signature[1]] == [r for r, _ in source.signature[1]]


def align_units(target_units: list[Unit], source_units: list[Unit]) -> Plan:
    fits = _Compatibility()
    anchors = extend_to_siblings(certain_pairs(target_units, source_units, fits), target_units, source_units, fits)
    plan = Plan()
    unit_pairs = list(anchors)
    mismatched_pairs: list[tuple[int, int]] = []
    bounds = [(-1, -1), *anchors, (len(target_units), len(source_units))]
    for (t_start, s_start), (t_end, s_end) in pairwise(bounds):
        gap_targets, gap_sources = list(range(t_start + 1, t_end)), list(range(s_start + 1, s_end))
        unique = _unique_pairs(gap_targets, gap_sources, target_units, source_units, fits)
        unit_pairs.extend(unique)
        left_targets = [t for t in gap_targets if t not in {p[0] for p in unique}]
        left_sources = [s for s in gap_sources if s not in {p[1] for p in unique}]
        if len(left_targets) == 1 and len(left_sources) == 1 and _same_roles(target_units[left_targets[0]], source_units[left_sources[0]]):
            mismatched_pairs.append((left_targets[0], left_sources[0]))
    for t, s in unit_pairs:
        _pair_tensors(target_units[t], source_units[s], plan.loaded)
    for t, s in mismatched_pairs:
        _pair_tensors(target_units[t], source_units[s], plan.mismatched)
    paired_targets = {t for t, _ in unit_pairs} | {t for t, _ in mismatched_pairs}
    _note_leftovers(plan, [u for i, u in enumerate(target_units) if i not in paired_targets], len(unit_pairs))
    return plan


def _pair_tensors(target: Unit, source: Unit, into: dict[str, str]) -> None:
    by_role = dict(zip(source.roles, source.keys))
    for role, key in zip(target.roles, target.keys):
        if role in by_role:
            into[key] = by_role[role]


def _note_leftovers(plan: Plan, left: list[Unit], aligned: int) -> None:
    if left:
        names = ", ".join(unit.label for unit in left[:8]) + (" ..." if len(left) > 8 else "")
        plan.notes.append(
            f"structure alignment paired {aligned} modules; {len(left)} model modules had no unambiguous partner and were left as they were: {names}"
        )


def certain_pairs(target_units: list[Unit], source_units: list[Unit], fits) -> list[tuple[int, int]]:
    """Pairs (target index, source index) present in every maximum order-preserving alignment."""
    n, m = len(target_units), len(source_units)
    if n == m and all(fits(t, s) for t, s in zip(target_units, source_units)):
        return [(i, i) for i in range(n)]  # same structure throughout: the only alignment matching all
    matrix = _fit_matrix(target_units, source_units, fits)
    forward_score, forward_count = _alignment_table(matrix, n, m)
    reversed_matrix = [row[::-1] for row in matrix[::-1]]
    backward_score, backward_count = _alignment_table(reversed_matrix, n, m)
    best, total = forward_score[n][m], forward_count[n][m]
    pairs = []
    for i in range(n):
        for j in range(m):
            if not matrix[i][j]:
                continue
            after_score = backward_score[n - i - 1][m - j - 1]  # suffixes i+1.., j+1..
            if forward_score[i][j] + 1 + after_score != best:
                continue
            if forward_count[i][j] * backward_count[n - i - 1][m - j - 1] == total:
                pairs.append((i, j))
    return pairs


def _fit_matrix(target_units: list[Unit], source_units: list[Unit], fits) -> list[list[bool]]:
    """matrix[i][j]: target unit i can take source unit j; computed once per pair of distinct signatures."""
    ids: dict[tuple, int] = {}
    target_ids = [ids.setdefault(unit.signature, len(ids)) for unit in target_units]
    source_ids = [ids.setdefault(unit.signature, len(ids)) for unit in source_units]
    examples = {ids[unit.signature]: unit for unit in target_units + source_units}
    table = {(a, b): fits(examples[a], examples[b]) for a in set(target_ids) for b in set(source_ids)}
    return [[table[a, b] for b in source_ids] for a in target_ids]


def _alignment_table(matrix: list[list[bool]], n: int, m: int) -> tuple[list[list[int]], list[list[int]]]:
    """Longest common subsequence length and the number of *distinct* optimal pair sets, per prefix.

    Counting sets (not paths) needs inclusion-exclusion: the sets that skip the last target unit
    and the sets that skip the last source unit overlap in those that skip both.
    """
    score = [[0] * (m + 1) for _ in range(n + 1)]
    count = [[1] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above = score[i], score[i - 1]
        crow, cabove = count[i], count[i - 1]
        fits_row = matrix[i - 1]
        for j in range(1, m + 1):
            diagonal = above[j - 1] + 1 if fits_row[j - 1] else -1
            best = max(above[j], row[j - 1], diagonal)
            total = 0
            if diagonal == best:
                total += cabove[j - 1]
            if above[j] == best:
                total += cabove[j]
            if row[j - 1] == best:
                total += crow[j - 1]
            if above[j - 1] == best:
                total -= cabove[j - 1]
            row[j], crow[j] = best, total
    return score, count


def extend_to_siblings(pairs, target_units: list[Unit], source_units: list[Unit], fits) -> list[tuple[int, int]]:
    """Grow accepted pairs into their neighbours when module boundaries settle what order could not.

    A conv's BatchNorm is the next unit inside the same parent module (``conv3.conv`` -> ``conv3.bn``
    in timm, ``f.c.0`` -> ``f.c.1`` in torchvision). When the units next to an accepted pair are
    such siblings on both sides, fit each other, and no other unpaired sibling could take either
    one, they are paired too.
    """
    paired_targets = dict(pairs)
    paired_sources = {s: t for t, s in pairs}
    frontier = list(pairs)
    while frontier:
        t, s = frontier.pop()
        for step in (1, -1):
            nt, ns = t + step, s + step
            if not (0 <= nt < len(target_units) and 0 <= ns < len(source_units)):
                continue
            if nt in paired_targets or ns in paired_sources or not fits(target_units[nt], source_units[ns]):
                continue
            target_siblings = _unpaired_siblings(t, target_units, paired_targets)
            source_siblings = _unpaired_siblings(s, source_units, paired_sources)
            if [c for c in target_siblings if fits(target_units[c], source_units[ns])] != [nt]:
                continue
            if [c for c in source_siblings if fits(target_units[nt], source_units[c])] != [ns]:
                continue
            paired_targets[nt], paired_sources[ns] = ns, nt
            frontier.append((nt, ns))
    return sorted(paired_targets.items())


def _unpaired_siblings(index: int, units: list[Unit], paired: dict[int, int]) -> list[int]:
    parent = _parent(units[index].module)
    return [i for i, unit in enumerate(units) if i != index and i not in paired and _parent(unit.module) == parent]


def _parent(module: str) -> str:
    return module.rpartition(".")[0]


def _unique_pairs(gap_targets, gap_sources, target_units, source_units, fits) -> list[tuple[int, int]]:
    """Within one gap, pair units whose signature fits exactly one unit on the other side, and vice versa."""
    pairs = []
    for t in gap_targets:
        candidates = [s for s in gap_sources if fits(target_units[t], source_units[s])]
        if len(candidates) != 1:
            continue
        rivals = [other for other in gap_targets if fits(target_units[other], source_units[candidates[0]])]
        if rivals == [t]:
            pairs.append((t, candidates[0]))
    return pairs

"""Matching strategies: decide which checkpoint tensor fills which model tensor.

Every strategy is a pure function of two ordered ``{key: shape}`` maps (the model's and the
checkpoint's) and returns a :class:`Plan`; nothing here touches tensors, so each is cheap to test
and ``dry_run`` is free. A pair whose shapes cannot fit goes to ``mismatched`` and is never loaded.

- ``"name"``: same name, fitting shape (the tutorial's first recipe).
- ``"order"``: the i-th model tensor takes the i-th checkpoint tensor (the second recipe).
- a mapping ``{model_key: checkpoint_key}`` (the third recipe), then names for the rest; regex
  rules ``[(pattern, replacement)]`` rename checkpoint keys before matching by name.
- ``"auto"`` lives in :mod:`visiontune.checkpoint.align`.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.checkpoint.keys import (
    NUM_BATCHES,
    Shape,
    module_of,
    role_of,
    shapes_compatible,
)
from visiontune.checkpoint.transforms import Transform, parse_expression, shape_fits
from visiontune.safe_yaml import load_yaml_file
from visiontune.errors import CheckpointError, ConfigError, shown

logger = logging.getLogger(__name__)

ShapeMap = dict[str, Shape]  # ordered key -> shape
NAMED_STRATEGIES = ("auto", "name", "order")


@dataclass
class Plan:
    """Which source key fills which target key; everything else is derived by the report."""

    loaded: dict[str, str] = field(default_factory=dict)  # target key -> source key
    mismatched: dict[str, str] = field(default_factory=dict)  # target key -> source key whose shape cannot fit
    held_back: dict[str, str] = field(default_factory=dict)  # fits, but a sibling in its module does not
    notes: list[str] = field(default_factory=list)
    # source keys that are built, not read: {virtual key: Transform over real checkpoint keys}
    transforms: dict[str, Transform] = field(default_factory=dict)

    def used_sources(self) -> set[str]:
        """Source keys this plan has decided about (loaded, mismatched or held back)."""
        return set(self.loaded.values()) | set(self.mismatched.values()) | set(self.held_back.values())

    def decided_targets(self) -> set[str]:
        return set(self.loaded) | set(self.mismatched) | set(self.held_back)

    def add(self, other: Plan) -> None:
        self.loaded.update(other.loaded)
        self.mismatched.update(other.mismatched)
        self.held_back.update(other.held_back)
        self.notes.extend(other.notes)
        self.transforms.update(other.transforms)


@dataclass(frozen=True)
class Strategy:
    """A parsed ``match=`` argument."""

    kind: str  # "auto", "name", "order", "mapping" or "rules"
    mapping: dict[str, str | None] | None = None
    rules: list[tuple[str, str | None]] | None = None
    origin: str = "the match argument"  # where a mapping or rules came from, for messages


def pair(target: ShapeMap, source: ShapeMap, target_key: str, source_key: str, plan: Plan) -> None:
    """Record one pairing: loaded when the shapes fit, mismatched otherwise."""
    fits = shapes_compatible(target[target_key], source[source_key], role_of(target_key))
    (plan.loaded if fits else plan.mismatched)[target_key] = source_key


def match_by_name(target: ShapeMap, source: ShapeMap, whole_modules: bool = False) -> Plan:
    """Same name, fitting shape. With ``whole_modules``, a module loads all or nothing: a head's
    bias is not taken from a checkpoint whose head weight does not fit (1000 classes either way,
    but from another feature width)."""
    plan = Plan()
    for key in target:
        if key in source:
            pair(target, source, key, key, plan)
    if whole_modules and plan.mismatched:
        _hold_back_partners(plan)
    return plan


def _hold_back_partners(plan: Plan) -> None:
    broken = {module_of(key) for key in plan.mismatched}
    plan.held_back = {t: s for t, s in plan.loaded.items() if module_of(t) in broken}
    plan.loaded = {t: s for t, s in plan.loaded.items() if t not in plan.held_back}
    if plan.held_back:
        plan.notes.append(
            f"not loaded although their shapes fit, because other tensors of their module do not: {', '.join(plan.held_back)}"
        )


def match_by_order(target: ShapeMap, source: ShapeMap) -> Plan:
    """Pair tensors by position, checking shapes as it goes; a misfit is reported, never forced in."""
    target_keys, source_keys = list(target), list(source)
    # One side saving num_batches_tracked and the other not would shift every pair after the first BN.
    if _has_batch_counters(target_keys) != _has_batch_counters(source_keys):
        target_keys = [key for key in target_keys if role_of(key) != NUM_BATCHES]
        source_keys = [key for key in source_keys if role_of(key) != NUM_BATCHES]
    plan = Plan()
    for target_key, source_key in zip(target_keys, source_keys):
        pair(target, source, target_key, source_key, plan)
    if len(target_keys) != len(source_keys):
        plan.notes.append(f"the model has {len(target_keys)} tensors and the checkpoint {len(source_keys)}: pairing by order stopped at the shorter")
    if plan.mismatched:
        first = next(iter(plan.mismatched))
        plan.notes.append(f"pairing by order hit a shape mismatch first at {first!r}: the orders probably diverge there")
    return plan


def _has_batch_counters(keys: list[str]) -> bool:
    return any(role_of(key) == NUM_BATCHES for key in keys)


def match_by_mapping(target: ShapeMap, source: ShapeMap, strategy: Strategy, aliases: dict[str, str]) -> Plan:
    """Explicit pairs first (``None`` keeps a model tensor as it is), then names for the rest.

    ``aliases`` maps original checkpoint names to cleaned ones, so the user may write either. A
    value may also be a transform over checkpoint keys, ``cat(q, k, v)`` (see :mod:`.transforms`).
    """
    mapping = strategy.mapping or {}
    plan = Plan()
    source = dict(source)
    resolved: dict[str, str | None] = {}
    for key, value in mapping.items():
        expression = parse_expression(value, strategy.origin) if value is not None else None
        if expression is None:
            resolved[key] = aliases.get(value, value) if value is not None else None
            continue
        expression = Transform(expression.op, tuple(aliases.get(name, name) for name in expression.sources), expression.args)
        _check_names_exist({}, {f"{key} <- {value}": name for name in expression.sources}, target, source, strategy.origin)
        problem = shape_fits(expression, source)
        if problem:
            raise CheckpointError(f"The mapping in {strategy.origin} asks for {value} for {key!r}, but {problem}; fix the mapping.")
        virtual = expression.describe()
        source[virtual], plan.transforms[virtual], resolved[key] = expression.shape(source), expression, virtual
    _check_names_exist(mapping, resolved, target, source, strategy.origin)
    for target_key, source_key in resolved.items():
        if source_key is not None:
            pair(target, source, target_key, source_key, plan)
    rest_target = {key: shape for key, shape in target.items() if key not in resolved}
    used = plan.used_sources() | {name for transform in plan.transforms.values() for name in transform.sources}
    plan.add(match_by_name(rest_target, {key: shape for key, shape in source.items() if key not in used and key not in plan.transforms}))
    return plan


def _check_names_exist(mapping, resolved, target: ShapeMap, source: ShapeMap, origin: str) -> None:
    problems = [f"model key {shown(key)}{_suggest(key, target)}" for key in mapping if key not in target]
    problems += [
        f"checkpoint key {shown(mapping.get(key, value))}{_suggest(value, source)}"
        for key, value in resolved.items()
        if value is not None and value not in source
    ]
    if problems:
        raise CheckpointError(
            f"The mapping in {origin} names keys that do not exist: {'; '.join(problems[:6])}"
            f"{' ...' if len(problems) > 6 else ''}. Run 'visiontune inspect' on the checkpoint to list its keys "
            "(and model.state_dict().keys() for the model's), and fix the mapping."
        )


def _suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def rename_by_rules(keys: list[str], strategy: Strategy) -> tuple[dict[str, str], list[str]]:
    """Rename checkpoint keys with regex rules applied in order; a ``None`` replacement drops the key.

    Returns ``{new name: original name}`` and notes (rules that matched nothing, likely typos).
    """
    compiled = [(_compile(pattern, strategy.origin), replacement) for pattern, replacement in strategy.rules or []]
    renamed: dict[str, str] = {}
    used_rules: set[int] = set()
    for key in keys:
        new_key: str | None = key
        for index, (pattern, replacement) in enumerate(compiled):
            if new_key is None or not pattern.search(new_key):
                continue
            used_rules.add(index)
            new_key = None if replacement is None else _substitute(pattern, replacement, new_key, strategy.origin)
        if new_key is not None:
            renamed.setdefault(new_key, key)
    unused = [pattern.pattern for index, (pattern, _) in enumerate(compiled) if index not in used_rules]
    notes = [f"rules in {strategy.origin} that matched no checkpoint key: {unused}"] if unused else []
    return renamed, notes


def _compile(pattern: str, origin: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ConfigError(f"Rule pattern {shown(pattern)} in {origin} is not a valid regular expression ({error}).") from None


def _substitute(pattern: re.Pattern, replacement: str, key: str, origin: str) -> str:
    """``pattern.sub`` with a bad group reference (``\\2`` in a one-group pattern, ``\\g<name>`` that
    does not exist) reported as the rule's mistake; re only finds it when the rule first matches."""
    try:
        return pattern.sub(replacement, key)
    except (re.error, IndexError) as error:
        raise ConfigError(f"Rule [{shown(pattern.pattern)}, {shown(replacement)}] in {origin} has a replacement that "
                          f"does not fit its pattern ({error}); refer only to groups the pattern has, as \\1 or \\g<name>.") from None


def parse_strategy(match) -> Strategy:
    """Turn ``match=`` ("auto", "name", "order", a dict, a list of rules, or a YAML/JSON file) into a Strategy."""
    if isinstance(match, Strategy):
        return match
    if isinstance(match, str) and match in NAMED_STRATEGIES:
        return Strategy(match)
    if isinstance(match, dict):
        return _strategy_from_data(match, "the mapping passed as match=")
    if isinstance(match, (list, tuple)):
        return _strategy_from_data(list(match), "the rules passed as match=")
    if isinstance(match, (str, Path)) and Path(match).is_file():
        return _strategy_from_file(Path(match))
    raise ConfigError(
        f"match={shown(match)} is not a strategy or an existing file. Use one of {', '.join(NAMED_STRATEGIES)}, "
        "a dict {model_key: checkpoint_key}, a list of (regex, replacement) rules, or the path of a YAML/JSON file holding either."
    )


def _strategy_from_file(path: Path) -> Strategy:
    data = load_yaml_file(path, what="mapping file")  # JSON is YAML; aliases bounded, one-line errors
    return _strategy_from_data(data, f"'{path}'")


def _strategy_from_data(data, origin: str) -> Strategy:
    if isinstance(data, dict) and set(data) <= {"mapping", "rules"} and data:
        mapping, rules = data.get("mapping"), data.get("rules")
        if mapping is not None and rules is not None:
            raise ConfigError(f"{origin} holds both 'mapping' and 'rules'; give one of them.")
        data = mapping if mapping is not None else rules
    if isinstance(data, dict):
        bad = [key for key, value in data.items() if not isinstance(key, str) or not (value is None or isinstance(value, str))]
        if bad:
            raise ConfigError(f"{origin}: a mapping must be {{model_key: checkpoint_key or null}} with string keys; bad entries: {shown(bad[:5])}.")
        return Strategy("mapping", mapping=dict(data), origin=origin)
    if isinstance(data, list):
        return Strategy("rules", rules=[_rule(item, origin) for item in data], origin=origin)
    raise ConfigError(f"{origin} must hold a mapping {{model_key: checkpoint_key}} or a list of [pattern, replacement] rules, not {type(data).__name__}.")


def _rule(item, origin: str) -> tuple[str, str | None]:
    if isinstance(item, dict) and "pattern" in item:
        item = (item["pattern"], item.get("replacement"))
    if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and (item[1] is None or isinstance(item[1], str)):
        return item[0], item[1]
    raise ConfigError(f"{origin}: each rule must be [pattern, replacement] (replacement null to drop the key), not {shown(item)}.")

"""``load_weights``: read safely -> unwrap -> clean prefixes -> match keys -> copy -> report.

Each step is a dict -> dict function of its own module; this one only chains them. Nothing is
written into the model until the whole plan is known and every pair is known to fit, so an error
(or ``dry_run=True``) leaves the model exactly as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from visiontune.checkpoint.align import match_auto
from visiontune.checkpoint.clean import clean_keys
from visiontune.checkpoint.finite import require_finite
from visiontune.checkpoint.hf_layout import timm_names
from visiontune.checkpoint.io import read_checkpoint, sniff_format
from visiontune.checkpoint.match import (
    Plan,
    Strategy,
    match_by_mapping,
    match_by_name,
    match_by_order,
    parse_strategy,
    rename_by_rules,
)
from visiontune.checkpoint.readings import resolve_mismatches, with_attention_readings
from visiontune.checkpoint.report import LoadReport
from visiontune.checkpoint.trace import build_source_model, dataflow_order, reorder
from visiontune.checkpoint.unwrap import unwrap
from visiontune.errors import CheckpointError

logger = logging.getLogger(__name__)


def load_weights(model, source, match="auto", dry_run: bool = False, allow_unsafe: bool = False, prefer_ema: bool = False,
                 source_model=None) -> LoadReport:
    """Fill ``model``'s tensors from ``source`` and return a :class:`LoadReport` of what happened.

    ``source``: a checkpoint path (``.pth``/``.pt``/``.bin``/``.ckpt`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``) or an in-memory state dict / wrapping
    dict. ``match``: ``"auto"`` (names, then structure), ``"name"``, ``"order"``, a mapping
    ``{model_key: checkpoint_key or None}``, a list of ``(regex, replacement or None)`` rules, or
    the path of a YAML/JSON file holding either. ``allow_unsafe`` permits unpickling arbitrary
    objects (a whole saved model); ``prefer_ema`` picks EMA weights when a checkpoint has both.
    ``source_model``: the architecture the checkpoint was saved from (a torchvision name, ``timm:NAME``,
    or the model itself; a model passed as ``source`` counts too): with ``match="auto"`` both models
    are traced and their tensors aligned in data-flow order (see :mod:`.trace`).

    A tensor whose shape cannot fit is never loaded; it is reported. Raises CheckpointError when
    nothing fits, leaving the model untouched; so does ``dry_run=True``, always.
    """
    strategy = parse_strategy(match)
    raw, source_format, source_name = _read_source(source, allow_unsafe)
    unwrapped = unwrap(raw, prefer_ema=prefer_ema, origin=f"checkpoint {source_name}")
    checkpoint = unwrapped.state_dict
    model_state = model.state_dict()

    renamed_by_rules, rule_notes = _rules_step(strategy, list(checkpoint))
    before_layout = renamed_by_rules
    target_names, renamed_by_rules, layout_notes = _layouts(strategy, list(model_state), renamed_by_rules)
    translated = {name for name, key in renamed_by_rules.items() if before_layout.get(name) != key}
    model_view = {name: model_state[key] for name, key in target_names.items()}  # the same tensors, maybe other names
    cleaned = clean_keys(list(renamed_by_rules), list(model_view))  # cleaned name -> name after rules
    original = {new: renamed_by_rules[old] for new, old in cleaned.items()}  # cleaned name -> name in the file
    tensors = {new: checkpoint[name] for new, name in original.items()}
    trace_notes = []
    if source_model is None and isinstance(source, nn.Module):
        source_model = source
    if strategy.kind == "auto" and source_model is not None:
        model_view, tensors, trace_notes = _in_dataflow_order(model, source_model, model_view, tensors, target_names)

    plan = _with_model_names(_plan(strategy, model_view, tensors, original), target_names)
    plan.notes[:0] = rule_notes + layout_notes + trace_notes
    removed = _removed_prefixes(cleaned)  # by cleaning only, not by rules or layout translation
    _materialize_transforms(plan, tensors, original)
    translated = {new for new, name in cleaned.items() if name in translated}
    report = _report(plan, model_state, tensors, original, list(checkpoint), strategy, source_format, unwrapped.unwrapped_from, source_name, dry_run, removed, translated)
    if not plan.loaded:
        raise CheckpointError(_nothing_fits_message(source_name, strategy, model_state, checkpoint))
    _reject_wrong_kinds(model_state, tensors, plan.loaded, original, source_name)
    require_finite({original[source]: tensors[source] for source in plan.loaded.values()},
                   f"Checkpoint {source_name}", "so the model was left unchanged")
    if not dry_run:
        _copy(model_state, tensors, plan.loaded)
    logger.info("%s", report)
    return report


def _read_source(source, allow_unsafe: bool) -> tuple[object, str, str]:
    import torch

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        file_format = sniff_format(path)
        return read_checkpoint(path, allow_unsafe=allow_unsafe), file_format, f"'{path}'"
    if isinstance(source, torch.nn.Module):
        return source, "module", "<in-memory model>"
    if isinstance(source, dict):
        return source, "in-memory", "<in-memory dict>"
    raise CheckpointError(f"load_weights() takes a checkpoint path or a state dict as source, not {type(source).__name__}.")


def _rules_step(strategy: Strategy, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    if strategy.kind != "rules":
        return {key: key for key in keys}, []
    return rename_by_rules(keys, strategy)


def _plan(strategy: Strategy, model_state: dict, tensors: dict, original: dict[str, str]) -> Plan:
    target = {key: tuple(tensor.shape) for key, tensor in model_state.items()}
    source = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    if strategy.kind == "auto":
        return _plan_auto(model_state, tensors)
    if strategy.kind == "order":
        return match_by_order(target, source)
    if strategy.kind == "mapping":
        aliases = {name: cleaned for cleaned, name in original.items()}
        return match_by_mapping(target, source, strategy, aliases)
    plan = match_by_name(target, source, whole_modules=True)  # "name", and "rules" after renaming
    resolve_mismatches(plan, target, source)
    return plan


def _plan_auto(model_state: dict, tensors: dict) -> Plan:
    """Names, fused/split attention readings, structure, then resampling what can only be resampled."""
    target = {key: tuple(tensor.shape) for key, tensor in model_state.items()}
    source = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    source, transforms = with_attention_readings(target, source)
    floating = lambda tensor: tensor.is_floating_point() or tensor.is_complex()
    target_floating = {key: floating(tensor) for key, tensor in model_state.items()}
    source_floating = {key: floating(tensors[transforms[key].sources[0] if key in transforms else key]) for key in source}
    plan = match_auto(target, source, target_floating, source_floating)
    plan.transforms.update(transforms)
    resolve_mismatches(plan, target, source)
    return plan


def _in_dataflow_order(model, source_model, model_view: dict, tensors: dict, target_names: dict[str, str]) -> tuple[dict, dict, list[str]]:
    """Both sides' tensors in the data-flow order of their traced models (trace.py), or unchanged with a note why not."""
    label = source_model if isinstance(source_model, str) else type(source_model).__name__
    if isinstance(source_model, str):
        source_model = build_source_model(source_model)
    if not isinstance(source_model, nn.Module):
        raise CheckpointError(f"source_model must be a model or a model name, not {type(source_model).__name__}.")
    source_keys = set(source_model.state_dict())
    if sum(key in source_keys for key in tensors) * 2 < len(tensors):
        return model_view, tensors, [f"the checkpoint's names are mostly not those of source model {label}; its tensors were aligned in stored order"]
    target_order, source_order = dataflow_order(model), dataflow_order(source_model)
    if target_order is None or source_order is None:
        which = "the model" if target_order is None else f"source model {label}"
        return model_view, tensors, [f"{which} could not be traced with torch.fx; tensors were aligned in registration order"]
    view_of = {key: name for name, key in target_names.items()}
    model_view = {view_of[key]: model_view[view_of[key]] for key in reorder(dict.fromkeys(target_names.values()), target_order)}
    tensors = {key: tensors[key] for key in reorder(dict.fromkeys(tensors), source_order)}
    return model_view, tensors, [f"both models were traced (source model {label}): tensors were aligned in data-flow order"]


def _layouts(strategy: Strategy, model_keys: list[str], renamed: dict[str, str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """With match="auto", a side in ``transformers``' layout gets timm's names (hf_layout) before
    prefixes are cleaned: ``{model name used for matching: model key}``, the checkpoint's
    ``{name: original name}``, and a note for the report."""
    identity = {key: key for key in model_keys}
    if strategy.kind != "auto":
        return identity, renamed, []
    target_names, target_family = timm_names(model_keys)
    source_names, source_family = timm_names(list(renamed))
    if bool(target_family) == bool(source_family):  # neither, or both transformers: their own names line up best
        return identity, renamed, []
    if target_family:
        return target_names, renamed, [f"the model is in transformers' {target_family} layout; its names were translated to timm's to match the checkpoint's"]
    return identity, {name: renamed[key] for name, key in source_names.items()}, [
        f"the checkpoint is in transformers' {source_family} layout; its names were translated to timm's to match the model's"
    ]


def _with_model_names(plan: Plan, target_names: dict[str, str]) -> Plan:
    """The plan with the model's real keys, where matching used translated ones."""
    if all(name == key for name, key in target_names.items()):
        return plan
    return Plan(
        loaded={target_names[t]: s for t, s in plan.loaded.items()},
        mismatched={target_names[t]: s for t, s in plan.mismatched.items()},
        held_back={target_names[t]: s for t, s in plan.held_back.items()},
        notes=plan.notes,
        transforms=plan.transforms,
    )


def _removed_prefixes(original: dict[str, str]) -> list[str]:
    return sorted({name[: len(name) - len(cleaned)] for cleaned, name in original.items() if name.endswith(cleaned) and name != cleaned})


def _materialize_transforms(plan: Plan, tensors: dict, original: dict[str, str]) -> None:
    """Build the tensors of the plan's transforms (only those it uses), named in the report by what they do."""
    used = set(plan.loaded.values()) | set(plan.mismatched.values())
    for virtual, transform in plan.transforms.items():
        if virtual in used:
            tensors[virtual] = transform.apply(tensors)
            original[virtual] = transform.describe(original)


def _report(plan: Plan, model_state, tensors, original, checkpoint_keys, strategy, source_format, unwrapped_from, source_name, dry_run, removed,
            translated: set[str]) -> LoadReport:
    used = {
        original[name]
        for source in [*plan.loaded.values(), *plan.mismatched.values()]
        for name in (plan.transforms[source].sources if source in plan.transforms else (source,))
    }
    return LoadReport(
        loaded={target: original[source] for target, source in plan.loaded.items()},
        missing=[key for key in model_state if key not in plan.loaded and key not in plan.mismatched],
        unexpected=[key for key in checkpoint_keys if key not in used],  # includes keys dropped by rules
        mismatched={
            target: (tuple(model_state[target].shape), tuple(tensors[source].shape)) for target, source in plan.mismatched.items()
        },
        renamed={target: original[source] for target, source in plan.loaded.items()
                 if (target != source or source in translated) and source not in plan.transforms},
        transformed={target: original[source] for target, source in plan.loaded.items() if source in plan.transforms},
        source_format=source_format,
        unwrapped_from=unwrapped_from,
        source=source_name,
        match=strategy.kind if strategy.kind in ("auto", "name", "order") else f"{strategy.kind} from {strategy.origin}",
        dry_run=dry_run,
        mismatched_from={target: original[source] for target, source in plan.mismatched.items()},
        removed_prefixes=removed,
        notes=plan.notes,
        model_keys=list(model_state),
        checkpoint_keys=list(checkpoint_keys),
    )


def _copy(model_state: dict, tensors: dict, loaded: dict[str, str]) -> None:
    """Write each planned tensor into the model's own storage (state_dict() tensors share it)."""
    import torch

    with torch.no_grad():
        for target, source in loaded.items():
            destination = model_state[target]
            destination.copy_(tensors[source].reshape(destination.shape))


def _reject_wrong_kinds(model_state: dict, tensors: dict, loaded: dict[str, str], original: dict[str, str], source_name: str) -> None:
    """copy_ would silently cast integers into float weights (or floats into counters); a file whose
    tensors are the wrong kind of number is damaged or not weights, so it is refused. Float widths
    (fp16/bf16 into fp32) are fine: that is how many checkpoints are shipped."""
    wrong = [
        f"{original[source]} ({str(tensors[source].dtype).replace('torch.', '')} for "
        f"{str(model_state[target].dtype).replace('torch.', '')})"
        for target, source in loaded.items()
        if tensors[source].is_floating_point() != model_state[target].is_floating_point()
        or tensors[source].is_complex() != model_state[target].is_complex()
    ]
    if wrong:
        shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise CheckpointError(
            f"Checkpoint {source_name} holds {len(wrong)} tensor(s) of the wrong data type for the model: {shown}. "
            "The file is damaged or does not hold weights; the model was left unchanged."
        )


def _nothing_fits_message(source_name: str, strategy: Strategy, model_state: dict, checkpoint: dict) -> str:
    def sample(keys) -> str:
        keys = list(keys)
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") if keys else "(none)"

    return (
        f"No tensor of checkpoint {source_name} ({len(checkpoint)} tensors: {sample(checkpoint)}) fits the model "
        f"({len(model_state)} tensors: {sample(model_state)}) with match={strategy.kind!r}; the model was left unchanged. "
        "Check that the checkpoint is for this architecture (visiontune inspect shows what it holds); if only the names differ, "
        "try match='order' or give an explicit mapping {model_key: checkpoint_key}."
    )

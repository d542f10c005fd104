"""What a checkpoint holds, for ``visiontune inspect`` and for guessing a model's class count."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.checkpoint.collapse import collapse_numbers
from visiontune.checkpoint.io import read_checkpoint, sniff_format
from visiontune.checkpoint.keys import (
    NUM_BATCHES,
    RUNNING_MEAN,
    RUNNING_VAR,
    WEIGHT,
    leaf_of,
    module_of,
    role_of,
)
from visiontune.checkpoint.unwrap import unwrap

HEAD_NAMES = ("fc", "_fc", "classifier", "head", "heads", "last_linear", "logits", "linear")
_BUFFER_ROLES = (RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES)


@dataclass(frozen=True)
class Head:
    key: str
    shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return self.shape[0]


@dataclass
class CheckpointSummary:
    path: str
    file_format: str
    unwrapped_from: str | None
    wrapper_keys: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    dtypes: Counter = field(default_factory=Counter)
    num_parameters: int = 0  # numbers in weights and biases
    num_buffer_values: int = 0  # BatchNorm statistics and other bookkeeping
    head: Head | None = None

    def key_table(self) -> list[tuple[str, str]]:
        """(key pattern, shape) rows: a module whose tensors share one shape (a BatchNorm) is one
        ``module.*`` row, and rows differing only in numbers with equal shapes merge (``layer{1..4}``)."""
        rows: list[tuple[str, str]] = []
        for module, keys in _by_module(self.shapes).items():
            shapes = {self.shapes[key] for key in keys if role_of(key) != NUM_BATCHES}
            if len(keys) > 1 and len(shapes) == 1:
                rows.append((f"{module}.*" if module else "*", str(shapes.pop())))
            else:
                rows.extend((key, str(self.shapes[key])) for key in keys)
        patterns = collapse_numbers([pattern for pattern, _ in rows], tags=[shape for _, shape in rows])
        merged_shapes = _shapes_of_merged(rows)
        return list(zip(patterns, merged_shapes))


def _by_module(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for key in shapes:
        modules.setdefault(module_of(key), []).append(key)
    return modules


def _shapes_of_merged(rows: list[tuple[str, str]]) -> list[str]:
    """collapse_numbers keeps each merged group at its first member: recover the groups' shapes in order."""
    merged = collapse_numbers([f"{pattern}\0{shape}" for pattern, shape in rows], tags=[shape for _, shape in rows])
    return [text.partition("\0")[2] for text in merged]


def summarize_checkpoint(path: str | os.PathLike, allow_unsafe: bool = False) -> CheckpointSummary:
    path = Path(path)
    file_format = sniff_format(path)
    unwrapped = unwrap(read_checkpoint(path, allow_unsafe=allow_unsafe), origin=f"checkpoint '{path}'")
    tensors = unwrapped.state_dict
    summary = CheckpointSummary(
        path=str(path),
        file_format=file_format,
        unwrapped_from=unwrapped.unwrapped_from,
        wrapper_keys=unwrapped.wrapper_keys,
        shapes={key: tuple(tensor.shape) for key, tensor in tensors.items()},
        dtypes=Counter(str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()),
        head=guess_head({key: tuple(tensor.shape) for key, tensor in tensors.items() if tensor.is_floating_point()}),
    )
    for key, tensor in tensors.items():
        if role_of(key) in _BUFFER_ROLES or not tensor.is_floating_point():
            summary.num_buffer_values += tensor.numel()
        else:
            summary.num_parameters += tensor.numel()
    return summary


def guess_head(shapes: dict[str, tuple[int, ...]]) -> Head | None:
    """The classifier: the last linear (or 1x1 conv) weight under a head-like name, else the last linear weight."""
    candidates = [
        key for key, shape in shapes.items()
        if role_of(key) == WEIGHT and leaf_of(key) == "weight" and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)))
    ]
    named = [key for key in candidates if set(module_of(key).split(".")) & set(HEAD_NAMES)]
    chosen = named[-1] if named else (candidates[-1] if candidates else None)
    return Head(chosen, shapes[chosen]) if chosen else None

"""The vocabulary of the data package: a labelled sample, a train/val split, and the seeded
per-class split that both the folder layouts (:mod:`.datasets`) and CSV manifests (:mod:`.manifest`)
use, so neither has to import the other for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.errors import ConfigError, DataError, shown

DEFAULT_VAL_SPLIT = 0.2  # the fraction of each class kept for validation when no val/ folder says


@dataclass
class Sample:
    """One labelled image: its file and the index of its class in ``DatasetSplit.classes``."""

    path: Path
    label: int


@dataclass
class DatasetSplit:
    """The classes and the train/val samples of a dataset, and how they were found."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    source: str  # "folders" (train/ + val/), "split" (one tree split by val_split) or "csv"
    split_info: dict = field(default_factory=dict)  # JSON-safe record of how val was chosen


def resolve_val_split(val_split: float | None) -> float:
    value = DEFAULT_VAL_SPLIT if val_split is None else float(val_split)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"val_split must be between 0 and 1 (exclusive), got {shown(val_split)}; 0.2 keeps a fifth for validation")
    return value


def stratified_split(
    labelled: dict[int, list[Path]], classes: list[str], val_split: float | None, seed: int, where: Path
) -> tuple[list[Sample], list[Sample]]:
    """Split each class's (sorted) paths: ``round(n * val_split)`` to val, at least one on each side.

    Each class is shuffled by its own ``random.Random(f"{seed}/{class name}")``, so a class's
    split depends only on the seed, its name and its files, not on other classes."""
    fraction = resolve_val_split(val_split)
    train, val = [], []
    for label in sorted(labelled):
        paths = sorted(labelled[label])
        if len(paths) < 2:
            raise DataError(
                f"class {shown(classes[label])} in {where} has only {len(paths)} image(s); a train/val split needs "
                "at least 2 per class (add images or provide a val/ folder)"
            )
        shuffled = paths[:]
        random.Random(f"{seed}/{classes[label]}").shuffle(shuffled)
        num_val = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
        chosen = set(shuffled[:num_val])
        train += [Sample(p, label) for p in paths if p not in chosen]
        val += [Sample(p, label) for p in paths if p in chosen]
    return train, val


def relative_posix(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a manifest may name files outside its folder
        return path.as_posix()

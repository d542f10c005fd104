"""Multi-label data: CSV manifests whose images carry any number of labels, and their split.

Two layouts are read, both with a header row:

* ``path,labels`` (``labels``, ``label``, ``tags``, ...): names separated by ``|`` (``cat|dog``);
  an empty cell is a valid negative (no label at all);
* ``path,cat,dog,car``: one 0/1 column per class (the layout of many public sets).

An optional ``split`` column (``train`` / ``val`` / ``test``) works as in single-label manifests.

An image's labels travel as ONE int64 bit mask (bit ``c`` set = class ``c`` present), so the
decoded-image cache, the feature cache, the seeded sampler and the distributed gathers, all
written for one integer label per image, carry them unchanged; :func:`multi_hot` turns masks into
0/1 vectors where the loss and the metrics need them. Hence at most :data:`MAX_CLASSES` classes.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import torch

from visiontune.data.samples import DatasetSplit, Sample, relative_posix, resolve_val_split
from visiontune.errors import DataError, shown

logger = logging.getLogger(__name__)

MAX_CLASSES = 63  # bits of an int64 below the sign bit
SEPARATOR = "|"
_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "filepath")
_LABELS_COLUMNS = ("labels", "label", "tags", "classes", "class", "target", "targets", "category", "categories")
_SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SHOW = 5


# -- label masks ----------------------------------------------------------------------------------


def mask_of(indices) -> int:
    """The bit mask of a set of class indices."""
    mask = 0
    for index in indices:
        mask |= 1 << int(index)
    return mask


def indices_of(mask: int) -> list[int]:
    return [bit for bit in range(MAX_CLASSES) if mask >> bit & 1]


def multi_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) int64 bit masks -> (N, num_classes) float32 0/1 vectors, on the masks' device."""
    bits = torch.arange(num_classes, device=masks.device)
    return ((masks.long()[:, None] >> bits) & 1).float()


# -- reading a manifest ---------------------------------------------------------------------------


class _Row:
    __slots__ = ("path", "labels", "split", "line")

    def __init__(self, path: Path, labels: list[str], split: str | None, line: int):
        self.path, self.labels, self.split, self.line = path, labels, split, line


def looks_multilabel(csv_path: Path) -> bool:
    """Whether ``--task auto`` reads this manifest as multi-label: it has 0/1 class columns, or a
    row whose labels cell holds several names or none."""
    try:
        header, lines = _lines(csv_path)
        names = [cell.strip().lower() for cell in header]
        if not any(name in _PATH_COLUMNS for name in names):
            return False  # no header: the single-label 'path,label' rows
        layout = _layout(csv_path, header)
    except DataError:  # empty or unreadable: the single-label reader says what is wrong
        return False
    if layout[0] == "columns":
        return True
    label_col = layout[2]
    cells = [cells[label_col].strip() if label_col < len(cells) else "" for _, cells in lines]
    return any(SEPARATOR in cell or not cell for cell in cells)


def read_multilabel_manifest(csv_path: Path, val_split: float | None = None, seed: int = 0) -> DatasetSplit:
    """Classes and train/val samples (labels as bit masks): by the split column, else iteratively
    stratified so that each label keeps its share in both parts."""
    rows = [row for row in _rows(csv_path) if row.split != "test"]
    has_split = any(row.split is not None for row in rows)
    train_rows = [row for row in rows if row.split in (None, "train")]
    if not train_rows:
        raise DataError(f"manifest {csv_path} has no training rows; add rows with split 'train' (or drop the split column)")
    classes = class_names(csv_path, train_rows)
    index = {name: i for i, name in enumerate(classes)}
    info = {"manifest": str(csv_path), "task": "multilabel"}
    if has_split:
        val_rows = [row for row in rows if row.split == "val"]
        if not val_rows:
            raise DataError(f"manifest {csv_path} has a split column but no 'val' rows; mark some rows val or drop the column")
        return DatasetSplit(classes, _samples(csv_path, train_rows, index), _samples(csv_path, val_rows, index),
                            source="csv", split_info={**info, "split_column": True})
    samples = _samples(csv_path, sorted(train_rows, key=lambda row: str(row.path)), index)
    chosen = iterative_stratification([indices_of(sample.label) for sample in samples],
                                      resolve_val_split(val_split), seed)
    train = [sample for i, sample in enumerate(samples) if i not in chosen]
    val = [sample for i, sample in enumerate(samples) if i in chosen]
    return DatasetSplit(classes, train, val, source="csv", split_info={
        **info, "split_column": False, "val_split": resolve_val_split(val_split), "seed": seed,
        "stratification": "iterative", "val_files": [relative_posix(s.path, csv_path.parent) for s in val]})


def read_multilabel_all(csv_path: Path) -> tuple[list[str], list[Sample]]:
    """Classes and samples of every train row (all rows but val and test), for ``--val-data``."""
    rows = [row for row in _rows(csv_path) if row.split in (None, "train")]
    if not rows:
        raise DataError(f"manifest {csv_path} has no training rows; add rows with split 'train' (or drop the split column)")
    classes = class_names(csv_path, rows)
    return classes, _samples(csv_path, rows, {name: i for i, name in enumerate(classes)})


def read_multilabel_rows(csv_path: Path, classes: list[str], *, only_val: bool = True) -> list[Sample]:
    """Samples of a manifest labelled by ``classes`` (the run's): its val rows if it has a split
    column (``only_val``), else all rows but the test ones."""
    rows = [row for row in _rows(csv_path) if row.split != "test"]
    if only_val and any(row.split == "val" for row in rows):
        rows = [row for row in rows if row.split == "val"]
    if not rows:
        raise DataError(f"manifest {csv_path} lists no images")
    return _samples(csv_path, rows, {name: i for i, name in enumerate(classes)})


def class_names(csv_path: Path, rows: list[_Row]) -> list[str]:
    header, _ = _lines(csv_path)
    layout = _layout(csv_path, header)
    if layout[0] == "columns":
        names = [header[i].strip() for i in layout[2]]
    else:
        names = sorted({label for row in rows for label in row.labels},
                       key=lambda name: (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name))
    if len(names) < 2:
        raise DataError(f"manifest {csv_path} has {len(names)} label(s) ({', '.join(map(shown, names))}); "
                        "a multi-label classifier needs at least two")
    if len(names) > MAX_CLASSES:
        raise DataError(f"manifest {csv_path} has {len(names)} labels; multi-label training supports at most "
                        f"{MAX_CLASSES}; merge rare labels or drop some")
    return names


def _samples(csv_path: Path, rows: list[_Row], index: dict[str, int]) -> list[Sample]:
    unknown = [(row, label) for row in rows for label in row.labels if label not in index]
    if unknown:
        listed = "; ".join(f"line {row.line}: {shown(label)}" for row, label in unknown[:_SHOW])
        raise DataError(f"manifest {csv_path} has {len(unknown)} label(s) the classes do not include "
                        f"(known: {', '.join(index)}): {listed}")
    return [Sample(row.path, mask_of(index[label] for label in row.labels)) for row in rows]


def _lines(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            lines = [(n, cells) for n, cells in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in cells)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read manifest {csv_path}: {error}") from None
    if not lines:
        raise DataError(f"manifest {csv_path} is empty; expected a header 'path,labels' or 'path,<class>,<class>...'")
    return lines[0][1], lines[1:]


def _layout(csv_path: Path, header: list[str]):
    """``("names", path column, labels column, split column)`` or ``("columns", path column,
    class columns, split column)``."""
    names = [cell.strip().lower() for cell in header]
    path_col = next((i for i, name in enumerate(names) if name in _PATH_COLUMNS), None)
    if path_col is None:
        raise DataError(f"manifest {csv_path}: a multi-label manifest needs a header naming its path column "
                        f"({', '.join(_PATH_COLUMNS)}); got {shown(','.join(header))}")
    split_col = names.index("split") if "split" in names else None
    label_col = next((i for i, name in enumerate(names) if name in _LABELS_COLUMNS), None)
    if label_col is not None:
        return "names", path_col, label_col, split_col
    class_cols = [i for i in range(len(names)) if i not in (path_col, split_col)]
    if not class_cols:
        raise DataError(f"manifest {csv_path} has no labels column and no class columns; use 'path,labels' "
                        "with labels like cat|dog, or 'path,<class>,<class>...' with 0/1 values")
    return "columns", path_col, class_cols, split_col


def _rows(csv_path: Path) -> list[_Row]:
    header, lines = _lines(csv_path)
    kind, path_col, labels_at, split_col = _layout(csv_path, header)
    rows = []
    for line, cells in lines:
        def cell(index):
            return cells[index].strip() if index is not None and index < len(cells) else ""

        if not cell(path_col):
            raise DataError(f"manifest {csv_path} line {line} has no path: {shown(','.join(cells))}")
        if kind == "names":
            labels = sorted({part.strip() for part in cell(labels_at).split(SEPARATOR) if part.strip()})
        else:
            values = [cell(i) for i in labels_at]
            wrong = [value for value in values if value not in ("0", "1", "0.0", "1.0", "")]
            if wrong:
                raise DataError(f"manifest {csv_path} line {line}: class columns hold 0 or 1, got {shown(wrong[0])}")
            labels = [header[i].strip() for i, value in zip(labels_at, values) if value in ("1", "1.0")]
        split_text = cell(split_col).lower()
        if split_col is not None and split_text not in _SPLIT_VALUES:
            raise DataError(f"manifest {csv_path} line {line}: unknown split {shown(cell(split_col))}; "
                            "use one of train, val, test")
        path = Path(cell(path_col)).expanduser()
        rows.append(_Row(path if path.is_absolute() else csv_path.parent / path, labels,
                         _SPLIT_VALUES[split_text] if split_col is not None else None, line))
    missing = [row for row in rows if not row.path.is_file()]
    if missing:
        listed = "; ".join(f"line {row.line}: {row.path}" for row in missing[:_SHOW])
        raise DataError(f"manifest {csv_path} names {len(missing)} file(s) that do not exist: {listed}")
    seen: dict[Path, _Row] = {}
    for row in rows:
        first = seen.setdefault(row.path.resolve(), row)
        if first is not row and (first.labels, first.split) != (row.labels, row.split):
            raise DataError(f"manifest {csv_path} lists {row.path.name} on lines {first.line} and {row.line} with "
                            "different labels or splits; keep one row per image")
    return list(seen.values())


# -- splitting ------------------------------------------------------------------------------------


def iterative_stratification(label_sets: list[list[int]], fraction: float, seed: int) -> set[int]:
    """Indices chosen for validation so that each label keeps about ``fraction`` of its images there
    (Sechidis, Tsoumakas and Vlahavas, 2011: take the rarest remaining label, give each of its
    images to the part that most lacks that label, ties to the part that lacks most images).

    Deterministic for a seed and list; at least one image on each side."""
    if len(label_sets) < 2:
        raise DataError(f"a train/val split needs at least 2 images, got {len(label_sets)}; add images or use --val-data")
    rng = random.Random(f"{seed}/iterative-stratification")
    parts = (1.0 - fraction, fraction)  # train, val
    wanted = [len(label_sets) * share for share in parts]
    counts: dict[int, int] = {}
    for labels in label_sets:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    wanted_per_label = [{label: count * share for label, count in counts.items()} for share in parts]
    remaining = set(range(len(label_sets)))
    chosen: set[int] = set()

    def assign(index: int, part: int) -> None:
        remaining.discard(index)
        wanted[part] -= 1
        for label in label_sets[index]:
            wanted_per_label[part][label] -= 1
        if part == 1:
            chosen.add(index)

    while remaining:
        left: dict[int, list[int]] = {}
        for index in sorted(remaining):
            for label in label_sets[index]:
                left.setdefault(label, []).append(index)
        if not left:  # only images without labels remain
            for index in sorted(remaining, key=lambda _: rng.random()):
                assign(index, 0 if wanted[0] >= wanted[1] else 1)
            break
        rarest = min(left, key=lambda label: (len(left[label]), rng.random()))
        for index in sorted(left[rarest], key=lambda _: rng.random()):
            lack = [wanted_per_label[part][rarest] for part in (0, 1)]
            if lack[0] != lack[1]:
                part = 0 if lack[0] > lack[1] else 1
            elif wanted[0] != wanted[1]:
                part = 0 if wanted[0] > wanted[1] else 1
            else:
                part = rng.randrange(2)
            assign(index, part)
    if not chosen:
        chosen.add(min(range(len(label_sets)), key=lambda i: len(label_sets[i])))
    if len(chosen) == len(label_sets):
        chosen.discard(min(chosen))
    return chosen


def require_trainable_multilabel(classes: list[str], train_masks: list[int], val_masks: list[int]) -> None:
    """What is left after unreadable files are dropped: images on both sides; a label no training
    image carries cannot be learnt (warned, not refused: it stays a class of the model)."""
    if not train_masks:
        raise DataError("no readable training image left; replace the unreadable files or add images")
    if not val_masks:
        raise DataError("no readable validation image left; replace the unreadable files or add validation images")
    seen = 0
    for mask in train_masks:
        seen |= mask
    never = [name for i, name in enumerate(classes) if not seen >> i & 1]
    if never:
        logger.warning("no training image carries label(s) %s; the model cannot learn them", ", ".join(never))

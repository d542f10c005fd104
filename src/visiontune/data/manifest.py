"""CSV manifests: ``path,label[,split]`` rows naming images relative to the CSV's folder.

A header row is optional (recognised by its column names); without one the columns are path,
label and, optionally, split (``train`` / ``val``; ``test`` rows are left out). Labels are class
names; numeric labels are ordered numerically so that class ``10`` comes after class ``9``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from visiontune.data.samples import DatasetSplit, Sample, relative_posix, resolve_val_split, stratified_split
from visiontune.errors import DataError, shown

logger = logging.getLogger(__name__)

_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "filepath")
_LABEL_COLUMNS = ("label", "labels", "class", "target", "category")
_SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SHOW = 5  # offending rows quoted in an error message


@dataclass
class ManifestRow:
    path: Path
    label: str
    split: str | None  # "train" | "val" | "test" | None when the manifest has no split column
    line: int  # 1-based line number in the CSV, for error messages


def read_manifest(csv_path: Path, val_split: float | None = None, seed: int = 0) -> DatasetSplit:
    """Classes and train/val samples of a manifest: by its split column, else a seeded stratified split."""
    rows = [row for row in _read_rows(csv_path) if row.split != "test"]
    has_split = any(row.split is not None for row in rows)
    train_rows = [row for row in rows if row.split in (None, "train")]
    if not train_rows:
        raise DataError(f"manifest {csv_path} has no training rows; add rows with split 'train' (or drop the split column)")
    classes = _sorted_labels({row.label for row in train_rows})
    if len(classes) < 2:
        raise DataError(f"manifest {csv_path} has only one label ({shown(classes[0])}); a classifier needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    if has_split:
        val_rows = [row for row in rows if row.split == "val"]
        if not val_rows:
            raise DataError(f"manifest {csv_path} has a split column but no 'val' rows; mark some rows val or drop the column")
        _reject_unknown_labels(csv_path, val_rows, index, "labels that no training row has")
        train = [Sample(row.path, index[row.label]) for row in train_rows]
        val = [Sample(row.path, index[row.label]) for row in val_rows]
        return DatasetSplit(classes, train, val, source="csv", split_info={"manifest": str(csv_path), "split_column": True})
    labelled: dict[int, list[Path]] = {}
    for row in train_rows:
        labelled.setdefault(index[row.label], []).append(row.path)
    train, val = stratified_split(labelled, classes, val_split, seed, where=csv_path)
    return DatasetSplit(
        classes,
        train,
        val,
        source="csv",
        split_info={
            "manifest": str(csv_path),
            "split_column": False,
            "val_split": resolve_val_split(val_split),
            "seed": seed,
            "val_files": [relative_posix(sample.path, csv_path.parent) for sample in val],
        },
    )


def read_manifest_all(csv_path: Path) -> tuple[list[str], list[Sample]]:
    """Classes and samples of every row but the val and test ones (``--val-data`` gives validation)."""
    rows = [row for row in _read_rows(csv_path) if row.split in (None, "train")]
    if not rows:
        raise DataError(f"manifest {csv_path} has no training rows; add rows with split 'train' (or drop the split column)")
    classes = _sorted_labels({row.label for row in rows})
    if len(classes) < 2:
        raise DataError(f"manifest {csv_path} has only one label ({shown(classes[0])}); a classifier needs at least two")
    index = {name: i for i, name in enumerate(classes)}
    return classes, [Sample(row.path, index[row.label]) for row in rows]


def read_manifest_rows(csv_path: Path, classes: list[str]) -> list[Sample]:
    """Samples of a manifest labelled by ``classes``: its val rows if it has a split column, else all rows."""
    rows = [row for row in _read_rows(csv_path) if row.split != "test"]
    if any(row.split == "val" for row in rows):
        rows = [row for row in rows if row.split == "val"]
    index = {name: i for i, name in enumerate(classes)}
    _reject_unknown_labels(csv_path, rows, index, f"labels the model does not know (known: {', '.join(classes)})")
    if not rows:
        raise DataError(f"manifest {csv_path} lists no images")
    return [Sample(row.path, index[row.label]) for row in rows]


def _read_rows(csv_path: Path) -> list[ManifestRow]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            lines = [(number, cells) for number, cells in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in cells)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read manifest {csv_path}: {error}") from None
    if not lines:
        raise DataError(f"manifest {csv_path} is empty; expected rows 'path,label'")
    has_header, path_col, label_col, split_col = _columns(lines[0][1])
    if has_header:
        lines = lines[1:]
    rows = [_parse_row(csv_path, number, cells, path_col, label_col, split_col) for number, cells in lines]
    missing = [row for row in rows if not row.path.is_file()]
    if missing:
        listed = "; ".join(f"line {row.line}: {row.path}" for row in missing[:_SHOW])
        more = f" (and {len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
        raise DataError(f"manifest {csv_path} names {len(missing)} file(s) that do not exist: {listed}{more}")
    return _without_duplicates(csv_path, rows)


def _without_duplicates(csv_path: Path, rows: list[ManifestRow]) -> list[ManifestRow]:
    """Keep the first of rows that repeat an image with the same label and split (a warning); an image
    listed with two labels, or in two splits, is an error naming the lines: no choice would be right,
    and a repeated image would otherwise be split into train and val at once."""
    by_file: dict[Path, list[ManifestRow]] = {}
    for row in rows:
        by_file.setdefault(row.path.resolve(), []).append(row)
    conflicts = [group for group in by_file.values() if len({(row.label, row.split) for row in group}) > 1]
    if conflicts:
        named = "; ".join(
            f"{group[0].path.name} on lines {', '.join(str(row.line) for row in group[:_SHOW])} as "
            f"{' / '.join(sorted({_describe_row(row) for row in group}))}" for group in conflicts[:_SHOW])
        more = f" (and {len(conflicts) - _SHOW} more)" if len(conflicts) > _SHOW else ""
        raise DataError(f"manifest {csv_path} lists {len(conflicts)} image(s) more than once with different labels "
                        f"or splits: {named}{more}; keep one row per image")
    repeated = [group for group in by_file.values() if len(group) > 1]
    if repeated:
        example = repeated[0]
        logger.warning("manifest %s lists %d image(s) more than once (e.g. %s on lines %s); each is used once",
                       csv_path, len(repeated), example[0].path.name, ", ".join(str(row.line) for row in example[:_SHOW]))
    return [group[0] for group in by_file.values()]


def _describe_row(row: ManifestRow) -> str:
    label = shown(row.label)
    return f"{label} ({row.split})" if row.split else label


def _columns(first_row: list[str]) -> tuple[bool, int, int, int | None]:
    """(is the first row a header?, path, label and split column indices)."""
    names = [cell.strip().lower() for cell in first_row]
    path_col = next((i for i, name in enumerate(names) if name in _PATH_COLUMNS), None)
    label_col = next((i for i, name in enumerate(names) if name in _LABEL_COLUMNS), None)
    if path_col is not None and label_col is not None:
        return True, path_col, label_col, names.index("split") if "split" in names else None
    return False, 0, 1, 2 if len(first_row) >= 3 else None


def _parse_row(csv_path: Path, line: int, cells: list[str], path_col: int, label_col: int, split_col: int | None) -> ManifestRow:
    def cell(index: int | None) -> str:
        return cells[index].strip() if index is not None and index < len(cells) else ""

    path_text, label = cell(path_col), cell(label_col)
    if not path_text or not label:
        raise DataError(f"manifest {csv_path} line {line} needs a path and a label, got {shown(','.join(cells))}")
    split_text = cell(split_col).lower()
    if split_col is not None and split_text not in _SPLIT_VALUES:
        raise DataError(
            f"manifest {csv_path} line {line}: unknown split {shown(cell(split_col))}; use one of train, val, test"
        )
    path = Path(path_text).expanduser()
    return ManifestRow(
        path=path if path.is_absolute() else csv_path.parent / path,
        label=label,
        split=_SPLIT_VALUES[split_text] if split_col is not None else None,
        line=line,
    )


def _reject_unknown_labels(csv_path: Path, rows: list[ManifestRow], index: dict[str, int], what: str) -> None:
    unknown = [row for row in rows if row.label not in index]
    if unknown:
        listed = "; ".join(f"line {row.line}: {shown(row.label)}" for row in unknown[:_SHOW])
        raise DataError(f"manifest {csv_path} has {len(unknown)} row(s) with {what}: {listed}")


def _sorted_labels(labels: set[str]) -> list[str]:
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)

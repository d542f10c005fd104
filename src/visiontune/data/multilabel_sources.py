"""Which task a dataset trains (``--task auto|single|multilabel``) and where its validation images
come from (``--val-split`` of ``--data``, or a separate ``--val-data`` folder or manifest)."""

from __future__ import annotations

import logging
from pathlib import Path

from visiontune.data.datasets import discover, discover_all, scan_labelled
from visiontune.data.multilabel import (looks_multilabel, read_multilabel_all, read_multilabel_manifest,
                                        read_multilabel_rows)
from visiontune.data.samples import DatasetSplit
from visiontune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TASKS = ("auto", "single", "multilabel")


def resolve_task(data: str | Path, task: str) -> str:
    """``single`` or ``multilabel``: ``auto`` reads a CSV manifest as multi-label when its rows carry
    several labels (or none, or 0/1 class columns), and says so; folders are single-label."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    path = Path(data).expanduser()
    is_csv = path.is_file() and path.suffix.lower() == ".csv"
    if task == "multilabel" and not is_csv:
        raise ConfigError(f"--task multilabel reads a CSV manifest ('path,labels' with labels like cat|dog, or "
                          f"'path,<class>,...' with 0/1 columns); {path} is not one")
    if task != "auto":
        return task
    if is_csv and looks_multilabel(path):
        logger.info("%s: rows carry several labels (or none): training a multi-label classifier "
                    "(--task single to refuse)", path)
        return "multilabel"
    return "single"


def discover_for_task(data: str | Path, task: str, *, val_data: str | Path | None = None,
                      val_split: float | None = None, seed: int = 0) -> DatasetSplit:
    """The classes and train/val samples of ``data`` for ``task`` (``single`` or ``multilabel``):
    validation from ``val_data`` when given, else from ``data`` as :func:`discover` finds it."""
    if task == "multilabel":
        manifest = Path(data).expanduser().absolute()
        if val_data is None:
            return read_multilabel_manifest(manifest, val_split, seed)
        classes, train = read_multilabel_all(manifest)
        val_path = _val_manifest(val_data)
        val = read_multilabel_rows(val_path, classes, only_val=False)
        return DatasetSplit(classes, train, val, source="csv",
                            split_info={"manifest": str(manifest), "task": "multilabel", "val_data": str(val_path)})
    if val_data is None:
        return discover(data, val_split=val_split, seed=seed)
    split = discover_all(data)
    val = scan_labelled(val_data, split.classes)
    if val_split is not None:
        logger.info("--val-data %s gives the validation images; ignoring val_split=%s", val_data, val_split)
    return DatasetSplit(split.classes, split.train, val, source=split.source,
                        split_info={**split.split_info, "val_data": str(Path(val_data).expanduser().absolute())})


def _val_manifest(val_data: str | Path) -> Path:
    path = Path(val_data).expanduser().absolute()
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        raise DataError(f"--val-data {path}: a multi-label run validates on a CSV manifest like its --data")
    return path

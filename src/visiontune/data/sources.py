"""Which kind of source ``--data`` / ``--val-data`` name, and the datasets of a streamed run.

Kinds: ``folder`` and ``csv`` (listed by :mod:`.datasets`), ``shards`` (WebDataset, streamed by
:mod:`.shards`) and ``hf`` (``hf:PATH``, Hugging Face ``datasets``, by :mod:`.hf_datasets`). A run
streams when its training data are shards; its validation then comes from ``--val-data`` (any
kind) or from the validation shards ``visiontune shard`` wrote beside the training ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from visiontune.data.datasets import ImageDataset, scan_labelled
from visiontune.data.hf_datasets import load_hf
from visiontune.data.images import check_images
from visiontune.data.samples import Sample
from visiontune.data.shard_stream import ShardStream
from visiontune.data.shards import is_shard_source, list_samples, open_shards, val_pattern_beside
from visiontune.data.hf_datasets import HF_PREFIX
from visiontune.errors import ConfigError, DataError, shown


def source_kind(data: str | Path | None) -> str:
    """``shards``, ``hf``, ``csv`` or ``folder`` (what a local path that is not a shard pattern is)."""
    text = "" if data is None else str(data)
    if text.startswith(HF_PREFIX):
        return "hf"
    if is_shard_source(text):
        return "shards"
    return "csv" if text.lower().endswith(".csv") else "folder"


def is_local_path(data: str | None) -> bool:
    """A folder or CSV (made absolute for the saved config); patterns, URLs and hf: names stay as given."""
    return data is not None and source_kind(data) in ("folder", "csv") or (
        source_kind(data) == "shards" and "://" not in str(data) and not str(data).startswith("pipe:"))

# report.json: where the images of a split come from, by the kind of its source
VAL_PATHS = {"shards": "streamed from shards", "hf": "read per image from the dataset's memory-mapped Arrow files",
             "folder": "files (decoded every epoch)", "csv": "files (decoded every epoch)"}


@dataclass
class StreamedData:
    """What :func:`streamed_datasets` builds for the training set-up."""

    classes: list[str]
    train_set: Dataset
    val_set: Dataset
    val_samples: list[Sample]
    bad: list[tuple[str, str]] = field(default_factory=list)
    split_info: dict = field(default_factory=dict)


def streamed_datasets(data: str, val_data: str | None, train_transform: Callable, eval_transform: Callable, *,
                      seed: int, epoch_samples: int | None, rank: int, world: int, on_bad_image: str,
                      balance: bool) -> StreamedData:
    """Training shards streamed, validation from ``val_data`` or the shards' own val split."""
    if balance:
        raise ConfigError("--balance needs every training label before the first step, which streamed shards do not "
                          "give; leave --balance out (or train from a folder or CSV)")
    train_shards = open_shards(data)
    classes = train_shards.classes
    train_set = ShardStream(train_shards, train_transform, seed=seed, epoch_samples=epoch_samples, rank=rank,
                            world=world, on_bad_image=on_bad_image)
    val_source = val_data or val_pattern_beside(train_shards)
    if val_source is None:
        raise ConfigError(f"--data {shown(data)} streams shards and has no validation shards beside it; give "
                          "--val-data (a folder, a CSV, shards or hf:)")
    val_set, val_samples, bad = validation_dataset(val_source, classes, eval_transform, on_bad_image)
    split_info = {"train_shards": len(train_shards.urls), "epoch_samples": train_set.epoch_samples,
                  "train_pattern": data, "val_data": val_source, "val_kind": source_kind(val_source),
                  "train_path": "streamed from shards", "val_path": VAL_PATHS[source_kind(val_source)]}
    return StreamedData(classes, train_set, val_set, val_samples, bad, split_info)


def validation_dataset(source: str, classes: list[str], eval_transform: Callable, on_bad_image: str, *,
                       image_column: str | None = None,
                       label_column: str | None = None) -> tuple[Dataset, list[Sample], list[tuple[str, str]]]:
    """``--val-data`` of any kind, labelled with the run's ``classes``."""
    kind = source_kind(source)
    if kind == "shards":
        shards = open_shards(source, classes=classes)
        listed = list_samples(shards)
        if not listed:
            raise DataError(f"--val-data {shown(source)}: the shards hold no samples")
        stream = ShardStream(shards, eval_transform, epoch_samples=len(listed), train=False,
                             targets=[label for _, label in listed])
        return stream, [Sample(Path(key), label) for key, label in listed], []
    if kind == "hf":
        hf = load_hf(source, classes=classes, image_column=image_column, label_column=label_column)
        val = hf.val if hf.split_info.get("val_split") is None else _all_rows(hf)  # its own val split, else all
        val.transform = eval_transform
        return val, val.row_samples(), []
    samples = scan_labelled(source, classes)
    kept, bad = check_images(samples, on_bad_image)
    if not kept:
        raise DataError(f"--val-data {shown(source)}: no readable image")
    return ImageDataset(kept, eval_transform), kept, bad



def hf_datasets(data: str, val_data: str | None, train_transform: Callable, eval_transform: Callable, *,
                seed: int, val_split: float | None, on_bad_image: str, image_column: str | None,
                label_column: str | None) -> StreamedData:
    """``--data hf:PATH``: its train split trains; its own validation split, or ``val_data``, validates."""
    hf = load_hf(data, image_column=image_column, label_column=label_column, val_split=val_split, seed=seed)
    hf.train.transform = train_transform
    info = {**hf.split_info, "train_path": VAL_PATHS["hf"], "val_path": VAL_PATHS[source_kind(val_data or data)]}
    if val_data is None:
        hf.val.transform = eval_transform
        return StreamedData(hf.classes, hf.train, hf.val, hf.val.row_samples(), [], info)
    train = hf.train if hf.split_info.get("val_split") is None else _all_rows(hf)  # no own val split: all trains
    val_set, val_samples, bad = validation_dataset(val_data, hf.classes, eval_transform, on_bad_image)
    return StreamedData(hf.classes, train, val_set, val_samples, bad,
                        {**info, "val_data": val_data, "val_kind": source_kind(val_data)})


def _all_rows(hf):
    """The train part grown by the rows a seeded split had set aside (both index the same split)."""
    hf.train.indices, hf.train.targets = hf.train.indices + hf.val.indices, hf.train.targets + hf.val.targets
    return hf.train

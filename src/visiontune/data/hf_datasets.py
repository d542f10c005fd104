"""``--data hf:PATH``: a Hugging Face ``datasets`` dataset as the training (and validation) data.

``PATH`` may be a folder written by ``save_to_disk`` (a ``DatasetDict`` or one ``Dataset``), a local
folder ``load_dataset`` understands (``imagefolder``, parquet files), a ``.parquet`` file, or a Hub
name (online only). The ``train`` split trains; ``validation``/``val``/``valid``/``test`` validates,
else the training split is divided with ``--val-split`` as a folder would be. The image and label
columns are the ones named (``--image-column``/``--label-column``) or found: the ``Image`` feature,
and the ``ClassLabel`` feature (whose names become the classes) or a column called ``label``.
Rows are read through the dataset's memory-mapped Arrow files on each access, never all decoded.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch.utils.data

from visiontune.data.images import DEFAULT_BACKGROUND, RGB, load_image_bytes, to_rgb
from visiontune.data.samples import Sample, resolve_val_split
from visiontune.errors import ConfigError, DataError, shown

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TRAIN_SPLIT = "train"
VAL_SPLITS = ("validation", "val", "valid", "test")
LABEL_NAMES = ("label", "labels", "class", "category", "target")
_HF_EXTRA = "pip install 'visiontune[hf]'"


def _datasets():
    """The ``datasets`` module, imported only for ``hf:`` data (an optional extra)."""
    try:
        import datasets  # noqa: PLC0415 - optional extra, imported where it is needed
    except ImportError:
        raise ConfigError(f"--data hf:... needs the Hugging Face datasets package: {_HF_EXTRA}") from None
    return datasets


@dataclass
class HFData:
    """The classes and the train/val parts of an ``hf:`` source."""

    classes: list[str]
    train: HFImageDataset | None
    val: HFImageDataset | None
    split_info: dict = field(default_factory=dict)


def load_hf(spec: str, *, image_column: str | None = None, label_column: str | None = None,
            val_split: float | None = None, seed: int = 0, classes: list[str] | None = None) -> HFData:
    """Open ``hf:PATH`` and find its train and validation parts (``classes``: the run's, for --val-data)."""
    name = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    if not name:
        raise ConfigError("--data hf: needs a path or a Hub name after 'hf:', e.g. hf:./my_dataset")
    splits = _open(name)
    train_name = TRAIN_SPLIT if TRAIN_SPLIT in splits else next(iter(splits))
    val_name = next((split for split in VAL_SPLITS if split in splits and split != train_name), None)
    train = splits[train_name]
    image_column = _image_column(train, image_column, name)
    label_column = _label_column(train, label_column, image_column, name)
    found = _class_names(train, label_column)
    classes = list(classes) if classes is not None else found
    if len(classes) < 2:
        raise DataError(f"hf:{name} has {len(classes)} class(es) in column {shown(label_column)}; a classifier needs two")
    info = {"hf": name, "image_column": image_column, "label_column": label_column, "train_split": train_name}
    if val_name is not None:
        info["val_split_name"] = val_name
        parts = (range(len(train)), range(len(splits[val_name])))
        val_rows = splits[val_name]
    else:
        parts = _seeded_split(_labels(train, label_column, found, classes, name), val_split, seed, name)
        info.update(val_split=resolve_val_split(val_split), seed=seed)
        val_rows = train
    make = HFImageDataset
    return HFData(classes, make(train, image_column, label_column, found, classes, parts[0], f"hf:{name}/{train_name}"),
                  make(val_rows, image_column, label_column, _class_names(val_rows, label_column)
                       if val_name is not None else found, classes, parts[1],
                       f"hf:{name}/{val_name or train_name}"), info)


def _open(name: str) -> dict:
    """``{split name: Dataset}`` of a saved, local or Hub dataset."""
    datasets = _datasets()
    path = Path(name).expanduser()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a dataset opens in a second; its bars would only clutter the run's output
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files={TRAIN_SPLIT: str(path)})
        elif path.exists():
            loaded = datasets.load_dataset(str(path))
        elif _offline():
            raise DataError(f"hf:{name} is not a local folder or file, and the Hugging Face Hub is offline "
                            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); give a save_to_disk folder or go online")
        else:
            loaded = datasets.load_dataset(name)
    except DataError:
        raise
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot load hf:{name}: {first}; give a save_to_disk folder, an imagefolder/parquet "
                        "folder or a Hub name (online)") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        return {TRAIN_SPLIT: loaded}
    if not len(loaded):
        raise DataError(f"hf:{name} has no split")
    return dict(loaded)


def _offline() -> bool:
    return any(os.environ.get(variable, "").lower() in ("1", "true", "yes")
               for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _image_column(dataset, asked: str | None, name: str) -> str:
    datasets = _datasets()
    columns = list(dataset.features)
    if asked is not None:
        if asked not in columns:
            raise ConfigError(f"--image-column {shown(asked)} is not a column of hf:{name}; its columns: {', '.join(columns)}")
        return asked
    images = [column for column, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not images:
        guess = [column for column in columns if column in ("image", "img", "pixel_values")]
        if guess:
            return guess[0]
        raise DataError(f"hf:{name} has no Image column (columns: {', '.join(columns)}); name it with --image-column")
    return images[0]


def _label_column(dataset, asked: str | None, image_column: str, name: str) -> str:
    datasets = _datasets()
    columns = [column for column in dataset.features if column != image_column]
    if asked is not None:
        if asked not in dataset.features:
            raise ConfigError(f"--label-column {shown(asked)} is not a column of hf:{name}; its columns: {', '.join(columns)}")
        return asked
    labelled = [column for column in columns if isinstance(dataset.features[column], datasets.ClassLabel)]
    named = [column for column in columns if column.lower() in LABEL_NAMES]
    if labelled or named:
        return (labelled or named)[0]
    raise DataError(f"hf:{name}: no ClassLabel column and none called {'/'.join(LABEL_NAMES)} (columns: "
                    f"{', '.join(columns)}); name it with --label-column")


def _class_names(dataset, label_column: str) -> list[str]:
    """ClassLabel names, else the sorted distinct values (strings, or integers as text)."""
    datasets = _datasets()
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = sorted(set(dataset[label_column]), key=lambda value: (not isinstance(value, int), value))
    if values and all(isinstance(value, int) for value in values):
        return [str(value) for value in range(max(values) + 1)]
    return [str(value) for value in values]


def _labels(dataset, label_column: str, own: list[str], classes: list[str], name: str) -> list[int]:
    return [_index(value, own, classes, name) for value in dataset[label_column]]


def _index(value, own: list[str], classes: list[str], name: str) -> int:
    """A row's label as an index into ``classes``, by name (``own``: the column's own class names)."""
    text = own[value] if isinstance(value, int) and 0 <= value < len(own) else str(value)
    if text not in classes:
        raise DataError(f"hf:{name} has label {shown(text)}, which is not one of the run's classes "
                        f"({', '.join(map(shown, classes[:5]))}...)")
    return classes.index(text)


def _seeded_split(labels: list[int], val_split: float | None, seed: int, name: str) -> tuple[list[int], list[int]]:
    """Per class, ``round(n * val_split)`` rows (at least one, never all) to validation, seeded."""
    fraction = resolve_val_split(val_split)
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_class.setdefault(label, []).append(row)
    train, val = [], []
    for label, rows in sorted(by_class.items()):
        if len(rows) < 2:
            raise DataError(f"hf:{name}: class {label} has {len(rows)} row(s); a train/val split needs 2 per class")
        shuffled = rows[:]
        random.Random(f"{seed}/hf/{label}").shuffle(shuffled)
        count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
        val += sorted(shuffled[:count])
        train += sorted(shuffled[count:])
    return sorted(train), sorted(val)


class HFImageDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (transform(image), label)`` over chosen rows of a ``datasets.Dataset``."""

    def __init__(self, rows, image_column: str, label_column: str, own_classes: list[str], classes: list[str],
                 indices, where: str, transform: Callable | None = None, background: RGB = DEFAULT_BACKGROUND):
        self.rows, self.image_column, self.where = rows, image_column, where
        self.indices = list(indices)
        labels = rows[label_column]
        self.targets = [_index(labels[row], own_classes, classes, where) for row in self.indices]
        self.transform, self.background = transform, background

    def __len__(self) -> int:
        return len(self.indices)

    def row_samples(self) -> list[Sample]:
        """Where each image came from (``hf:NAME/SPLIT#ROW``), for predictions and reports."""
        return [Sample(Path(f"{self.where}#{row}"), label) for row, label in zip(self.indices, self.targets)]

    def __getitem__(self, index: int):
        row = self.indices[index]
        value = self.rows[row][self.image_column]
        image = _as_image(value, f"{self.where}#{row}", self.background)
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def _as_image(value, where: str, background: RGB):
    """A decoded PIL image, an undecoded ``{"bytes": ...}`` cell or raw bytes -> RGB PIL image."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return load_image_bytes(bytes(value), where, background)
    if hasattr(value, "mode"):
        return to_rgb(value, background)
    raise DataError(f"{where}: the image column holds {type(value).__name__}, not an image; name the image "
                    "column with --image-column")

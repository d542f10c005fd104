"""Finding the labelled images of a dataset: folder trees, a seeded split, or a CSV manifest.

Three layouts are understood (see :func:`discover`). Everything is sorted so that the same folder
gives the same classes, labels and split on every machine, and every layout that cannot train a
classifier stops here with a :class:`~visiontune.errors.DataError` that names the problem.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from pathlib import Path

import torch.utils.data

from visiontune.data.images import IMAGE_EXTENSIONS, RGB, is_image_file, load_image
from visiontune.data.manifest import read_manifest, read_manifest_all, read_manifest_rows
from visiontune.data.samples import DatasetSplit, Sample, relative_posix, resolve_val_split, stratified_split
from visiontune.errors import DataError, shown

logger = logging.getLogger(__name__)

TRAIN_DIR = "train"
VAL_DIRS = ("val", "valid", "validation")
_IGNORED_DIRS = frozenset({"__MACOSX"})  # macOS zip leftovers, never a class
_EXTENSIONS_HINT = ", ".join(sorted(IMAGE_EXTENSIONS))


def discover(data: str | Path, val_split: float | None = None, seed: int = 0) -> DatasetSplit:
    """Find the classes and train/val samples under ``data``.

    Layouts, tried in this order:

    * ``data`` is a ``.csv`` file: a manifest ``path,label[,split]`` (see :func:`read_manifest`);
    * ``data/train/<class>/*`` and ``data/val/<class>/*`` (``valid``/``validation`` also work):
      used as they are; ``val_split`` is ignored;
    * ``data/<class>/*`` (or ``data/train/<class>/*`` without a val folder): split per class with
      ``val_split`` (default 0.2), seeded by ``seed``, every class in both parts.
    """
    root = _existing_path(data)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"--data {root} is a file but not a .csv manifest; give a folder of class sub-folders or a CSV 'path,label'")
        return read_manifest(root, val_split, seed)
    train_dir, val_dir = root / TRAIN_DIR, _find_val_dir(root)
    if train_dir.is_dir() and val_dir is not None:
        if val_split is not None:
            logger.info("%s has %s/ and %s/ folders; ignoring val_split=%s", root, TRAIN_DIR, val_dir.name, val_split)
        return _from_train_val_folders(root, train_dir, val_dir)
    if val_dir is not None:
        raise DataError(f"{root} has a {val_dir.name}/ folder but no {TRAIN_DIR}/ folder; put the training images in {root / TRAIN_DIR}/<class>/")
    tree = train_dir if train_dir.is_dir() else root
    return _from_single_tree(root, tree, val_split, seed)


def discover_all(data: str | Path) -> DatasetSplit:
    """Every labelled image of ``data`` as training samples (``val`` empty), for ``--val-data``: a
    manifest's train rows, ``data/train/<class>/*`` when that folder exists, else ``data/<class>/*``."""
    root = _existing_path(data)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"--data {root} is a file but not a .csv manifest; give a folder of class sub-folders or a CSV 'path,label'")
        classes, samples = read_manifest_all(root)
        return DatasetSplit(classes, samples, [], source="csv", split_info={"manifest": str(root)})
    tree = root / TRAIN_DIR if (root / TRAIN_DIR).is_dir() else root
    images = _scan_tree(tree)
    classes = sorted(images)
    _require_two_classes(classes, tree)
    return DatasetSplit(classes, [Sample(p, classes.index(name)) for name, paths in sorted(images.items()) for p in paths],
                        [], source="folders", split_info={"train_dir": str(tree)})


def scan_labelled(data: str | Path, classes: list[str]) -> list[Sample]:
    """Labelled samples for evaluation, labelled by their index in ``classes`` (the run's classes).

    Accepts ``data/<class>/*``; if ``data`` instead holds a ``val/`` (or ``valid``/``validation``)
    folder and no class of that name, ``data/val/<class>/*`` is used; a ``.csv`` manifest gives
    its val rows when it has a split column, else all rows. Class folders may be a subset of
    ``classes``; a folder or label not in ``classes`` raises DataError."""
    root = _existing_path(data)
    if root.is_file():
        return read_manifest_rows(root, classes)
    val_dir = _find_val_dir(root)
    if val_dir is not None and val_dir.name not in classes:
        root = val_dir
    folders = _class_folders(root)
    unknown = [folder.name for folder in folders if folder.name not in classes]
    if unknown:
        raise DataError(
            f"{root} has class folder(s) the model does not know: {', '.join(map(shown, unknown))}; "
            f"known classes: {', '.join(map(shown, classes))}"
        )
    samples = [Sample(path, classes.index(folder.name)) for folder in folders for path in list_images(folder)]
    if not samples:
        raise DataError(f"no images found in {root}; expected {root}/<class>/<image> with extensions {_EXTENSIONS_HINT}")
    return samples


def list_images(path: str | Path) -> list[Path]:
    """Image files in a folder and its sub-folders (sorted, hidden files and folders skipped), or
    ``[path]`` for a single file. Used for class folders and by ``predict`` on folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = []
    for candidate in path.rglob("*"):
        relative_parts = candidate.relative_to(path).parts
        if any(part.startswith(".") or part in _IGNORED_DIRS for part in relative_parts):
            continue
        if candidate.is_file() and is_image_file(candidate):
            found.append(candidate)
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _existing_path(data: str | Path) -> Path:
    path = Path(data).expanduser().absolute()
    if not path.exists():
        raise DataError(f"data path {path} does not exist; give a folder of class sub-folders or a CSV manifest")
    if not (path.is_dir() or path.is_file()):  # a device, FIFO or socket: reading it would hang or fail
        raise DataError(f"data path {path} is neither a folder nor a file; give a folder of class sub-folders "
                        "or a CSV manifest")
    return path


def _find_val_dir(root: Path) -> Path | None:
    for name in VAL_DIRS:
        if (root / name).is_dir():
            return root / name
    return None


def _class_folders(root: Path) -> list[Path]:
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED_DIRS]
    return sorted(folders, key=lambda p: p.name)


def _scan_tree(tree: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for ``tree/<class>/*``; raises if it cannot train."""
    folders = _class_folders(tree)
    if not folders:
        loose = [p.name for p in tree.iterdir() if p.is_file() and is_image_file(p)]
        hint = f" ({len(loose)} image(s) lie directly in it; move them into one folder per class)" if loose else ""
        raise DataError(f"no class sub-folders in {tree}{hint}; expected {tree}/<class>/<image>")
    loose = [p.name for p in tree.iterdir() if p.is_file() and is_image_file(p)]
    if loose:
        logger.warning("ignoring %d image(s) directly in %s (not in a class folder), e.g. %s", len(loose), tree, loose[0])
    images = {folder.name: list_images(folder) for folder in folders}
    if not any(images.values()):
        raise DataError(f"no images at all in {tree}: its class folders hold no files with extensions {_EXTENSIONS_HINT}")
    empty = [name for name, paths in images.items() if not paths]
    if empty:
        raise DataError(f"empty class folder(s) in {tree}: {', '.join(empty)}; add images to them or remove them")
    return images


def _require_two_classes(classes: list[str], where: Path) -> None:
    if len(classes) < 2:
        raise DataError(f"only one class ({shown(classes[0])}) in {where}; a classifier needs at least two class sub-folders")


def _from_train_val_folders(root: Path, train_dir: Path, val_dir: Path) -> DatasetSplit:
    train_images = _scan_tree(train_dir)
    val_images = _scan_tree(val_dir)
    classes = sorted(train_images)
    _require_two_classes(classes, train_dir)
    unknown = sorted(set(val_images) - set(train_images))
    if unknown:
        raise DataError(
            f"{val_dir} has class folder(s) that {train_dir} lacks: {', '.join(unknown)}; "
            "every validation class needs training images"
        )
    missing = sorted(set(train_images) - set(val_images))
    if missing:
        logger.warning("%s has no folder for class(es) %s; they are not validated", val_dir, ", ".join(missing))
    index = {name: i for i, name in enumerate(classes)}
    return DatasetSplit(
        classes=classes,
        train=[Sample(p, index[name]) for name, paths in sorted(train_images.items()) for p in paths],
        val=[Sample(p, index[name]) for name, paths in sorted(val_images.items()) for p in paths],
        source="folders",
        split_info={"train_dir": train_dir.relative_to(root).as_posix(), "val_dir": val_dir.relative_to(root).as_posix()},
    )


def _from_single_tree(root: Path, tree: Path, val_split: float | None, seed: int) -> DatasetSplit:
    images = _scan_tree(tree)
    classes = sorted(images)
    _require_two_classes(classes, tree)
    labelled = {classes.index(name): paths for name, paths in images.items()}
    train, val = stratified_split(labelled, classes, val_split, seed, where=tree)
    return DatasetSplit(
        classes=classes,
        train=train,
        val=val,
        source="split",
        split_info=_split_record(val_split, seed, val, root),
    )


def require_trainable(split: DatasetSplit, train_labels: list[int], val_labels: list[int], num_bad: int) -> None:
    """Check what is left once unreadable files are dropped: every class keeps at least one training
    image and validation keeps at least one image; a class left without validation images is only
    warned about. :func:`discover` cannot know this, since it never decodes a file."""
    counts = collections.Counter(train_labels)
    skipped = (f" ({num_bad} unreadable file(s) were skipped; run with --on-bad-image error to stop at the first)"
               if num_bad else "")
    empty = [index for index, _ in enumerate(split.classes) if counts[index] == 0]
    if empty:
        named = "; ".join(f"class {shown(split.classes[index])} ({_class_origin(split, index)})" for index in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise DataError(f"no readable training image left for {len(empty)} class(es): {named}{more}{skipped}; "
                        "replace the unreadable files or remove the class")
    if not val_labels:
        raise DataError(f"no readable validation image left in {_data_origin(split)}{skipped}; "
                        "replace the unreadable files or add validation images")
    unvalidated = sorted(set(range(len(split.classes))) - set(val_labels))
    if unvalidated and num_bad:  # without bad files, discover has already warned or split every class
        logger.warning("no readable validation image left for class(es) %s; they are not validated",
                       ", ".join(split.classes[index] for index in unvalidated))


def _class_origin(split: DatasetSplit, label: int) -> str:
    """Where a class's files were listed: its folder(s), or the manifest."""
    if split.source == "csv":
        return f"manifest {split.split_info.get('manifest')}"
    folders = sorted({str(sample.path.parent) for sample in split.train + split.val if sample.label == label})
    return ", ".join(folders[:2]) + (" ..." if len(folders) > 2 else "") if folders else "no files"


def _data_origin(split: DatasetSplit) -> str:
    if split.source == "csv":
        return f"manifest {split.split_info.get('manifest')}"
    folders = sorted({str(sample.path.parent.parent) for sample in split.val})
    return ", ".join(folders[:2]) if folders else "the data"


def _split_record(val_split: float | None, seed: int, val: list[Sample], root: Path) -> dict:
    return {
        "val_split": resolve_val_split(val_split),
        "seed": seed,
        "val_files": [relative_posix(sample.path, root) for sample in val],
    }


class ImageDataset(torch.utils.data.Dataset):
    """Samples read from disk on every access: ``dataset[i] -> (transform(image), label)``.

    Run :func:`~visiontune.data.check_images` first: a file that cannot be read here raises
    :class:`~visiontune.data.BadImageError` (in a data-loader worker that ends the epoch)."""

    def __init__(self, samples: list[Sample], transform: Callable | None, background: RGB = (255, 255, 255)):
        self.samples = list(samples)
        self.transform = transform
        self.background = background
        self.targets = [sample.label for sample in self.samples]  # what samplers and class weights read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.path, self.background)
        return (self.transform(image) if self.transform is not None else image), sample.label

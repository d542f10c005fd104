"""discover / scan_labelled / manifests: layouts, the seeded stratified split, and every bad layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from visiontune.data import ImageDataset, Sample, discover, list_images, scan_labelled
from visiontune.errors import ConfigError, DataError


def write_image(path: Path, color=(10, 20, 30), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """``root/<class>/<class>_<i>.png`` with ``counts[class]`` images each."""
    for name, count in counts.items():
        for index in range(count):
            write_image(root / name / f"{name}_{index}.png")
    return root


def names(samples: list[Sample]) -> list[str]:
    return [sample.path.name for sample in samples]


def test_train_val_folders(image_folder: Path):
    split = discover(image_folder)
    assert split.classes == ["blue", "green", "red"]
    assert split.source == "folders"
    assert len(split.train) == 24 and len(split.val) == 9
    assert all(split.classes[s.label] == s.path.parent.name for s in split.train + split.val)
    assert all(s.path.parent.parent.name == "train" for s in split.train)
    assert names(split.train)[:2] == ["blue_0.png", "blue_1.png"]  # sorted, deterministic
    json.dumps(split.split_info)


def test_valid_folder_name_and_ignored_files(tmp_path: Path):
    root = tmp_path / "data"
    make_tree(root / "train", {"cat": 2, "dog": 2})
    make_tree(root / "valid", {"cat": 1, "dog": 1})
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    write_image(root / "train" / "cat" / "._cat_0.png")  # macOS resource-fork twin
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    write_image(root / "train" / ".hidden_class" / "x.png")
    split = discover(root, val_split=0.5)  # ignored: the layout has its own val folder
    assert split.classes == ["cat", "dog"]
    assert names(split.train) == ["cat_0.png", "cat_1.png", "dog_0.png", "dog_1.png"]
    assert split.split_info["val_dir"] == "valid"


def test_split_is_stratified_seeded_and_reproducible(tmp_path: Path):
    counts = {"a": 10, "b": 5, "c": 3}
    first = discover(make_tree(tmp_path / "one", counts), val_split=0.2, seed=7)
    again = discover(make_tree(tmp_path / "two", counts), val_split=0.2, seed=7)
    other = discover(tmp_path / "one", val_split=0.2, seed=8)

    assert first.source == "split"
    per_class = [sum(s.label == label for s in first.val) for label in range(3)]
    assert per_class == [2, 1, 1]  # round(n * 0.2), at least one: every class is validated
    assert len(first.train) + len(first.val) == 18
    assert not {s.path for s in first.train} & {s.path for s in first.val}
    assert first.split_info["val_files"] == again.split_info["val_files"]  # same seed, same files
    assert first.split_info["val_files"] != other.split_info["val_files"]
    assert first.split_info["val_split"] == 0.2 and first.split_info["seed"] == 7
    assert all(not Path(f).is_absolute() for f in first.split_info["val_files"])


def test_default_split_and_train_folder_without_val(tmp_path: Path):
    split = discover(make_tree(tmp_path / "data" / "train", {"x": 5, "y": 5}).parent)
    assert split.source == "split" and split.split_info["val_split"] == 0.2
    assert len(split.val) == 2


@pytest.mark.parametrize("val_split", [0, 1, 1.5, -0.1])
def test_val_split_out_of_range(tmp_path: Path, val_split: float):
    with pytest.raises(ConfigError, match="val_split"):
        discover(make_tree(tmp_path / "data", {"x": 5, "y": 5}), val_split=val_split)


def test_non_ascii_names_and_spaces(tmp_path: Path):
    root = make_tree(tmp_path / "données", {"café au lait": 3, "thé vert": 3})
    write_image(root / "café au lait" / "ü b c.png")
    split = discover(root)
    assert split.classes == ["café au lait", "thé vert"]
    assert "ü b c.png" in names(split.train + split.val)


# --- layouts that cannot work -------------------------------------------------------------------


def test_missing_folder(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "missing")


def test_no_images_at_all(tmp_path: Path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    (tmp_path / "data" / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images at all"):
        discover(tmp_path / "data")


def test_no_class_folders(tmp_path: Path):
    write_image(tmp_path / "data" / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders.*1 image"):
        discover(tmp_path / "data")


def test_empty_class_folder(tmp_path: Path):
    root = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    (root / "bird").mkdir()
    with pytest.raises(DataError, match="empty class folder.*bird"):
        discover(root)


def test_val_class_missing_from_train(image_folder: Path):
    write_image(image_folder / "val" / "purple" / "p.png")
    with pytest.raises(DataError, match="purple"):
        discover(image_folder)


def test_single_class(tmp_path: Path):
    with pytest.raises(DataError, match="only one class.*'cat'"):
        discover(make_tree(tmp_path / "data", {"cat": 4}))


def test_class_too_small_to_split(tmp_path: Path):
    with pytest.raises(DataError, match="'dog'.*only 1 image"):
        discover(make_tree(tmp_path / "data", {"cat": 4, "dog": 1}))


def test_val_without_train_and_non_csv_file(tmp_path: Path):
    make_tree(tmp_path / "data" / "val", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="no train/ folder"):
        discover(tmp_path / "data")
    (tmp_path / "list.txt").write_text("a.png,a\n")
    with pytest.raises(DataError, match="not a .csv"):
        discover(tmp_path / "list.txt")


# --- CSV manifests ------------------------------------------------------------------------------


def make_manifest_images(root: Path) -> list[str]:
    relative = [f"img/{label}_{i}.png" for label in ("2", "10") for i in range(5)]
    for path in relative:
        write_image(root / path)
    return relative


def test_csv_without_header_splits_by_val_split(tmp_path: Path):
    relative = make_manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    manifest.write_text("".join(f"{p},{p.split('/')[1].split('_')[0]}\n" for p in relative))
    split = discover(manifest, val_split=0.4, seed=1)
    assert split.source == "csv"
    assert split.classes == ["2", "10"]  # numeric labels in numeric order
    assert len(split.val) == 4 and {s.label for s in split.val} == {0, 1}
    assert all(s.path.is_file() and s.path.is_absolute() for s in split.train)
    assert split.split_info["val_files"][0].startswith("img/")


def test_csv_with_header_and_split_column(tmp_path: Path):
    relative = make_manifest_images(tmp_path)
    rows = ["label,path,split"] + [f"{p.split('/')[1].split('_')[0]},{p},{'val' if p.endswith('0.png') else 'train'}" for p in relative]
    manifest = tmp_path / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    split = discover(manifest)
    assert len(split.val) == 2 and len(split.train) == 8
    assert split.split_info["split_column"] is True
    assert scan_labelled(manifest, split.classes) == split.val  # evaluation uses the val rows


def test_csv_missing_paths_are_named(tmp_path: Path):
    make_manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\nimg/2_0.png,2\nimg/ghost.png,10\n")
    with pytest.raises(DataError, match=r"do not exist: line 3: .*ghost\.png"):
        discover(manifest)


def test_csv_unknown_val_labels_and_empty_labels(tmp_path: Path):
    make_manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    manifest.write_text("img/2_0.png,2,train\nimg/2_1.png,2,val\nimg/10_0.png,10,train\nimg/10_1.png,99,val\n")
    with pytest.raises(DataError, match="line 4: '99'"):
        discover(manifest)
    manifest.write_text("img/2_0.png,2\nimg/2_1.png,\n")
    with pytest.raises(DataError, match="line 2 needs a path and a label"):
        discover(manifest)
    manifest.write_text("img/2_0.png,2,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        discover(manifest)


# --- evaluation folders and the torch dataset ---------------------------------------------------


def test_scan_labelled_uses_run_classes_and_val_folder(image_folder: Path):
    classes = ["red", "green", "blue", "yellow"]  # the run's order, not sorted
    samples = scan_labelled(image_folder / "val", classes)
    assert len(samples) == 9 and all(classes[s.label] == s.path.parent.name for s in samples)
    assert scan_labelled(image_folder, classes) == samples  # DIR with val/ inside -> DIR/val
    with pytest.raises(DataError, match="does not know: 'blue'"):
        scan_labelled(image_folder / "val", ["red", "green"])


def test_list_images_for_files_and_folders(tmp_path: Path):
    a = write_image(tmp_path / "f" / "b.png")
    write_image(tmp_path / "f" / "sub" / "a.jpg")
    (tmp_path / "f" / ".DS_Store").write_bytes(b"x")
    assert [p.relative_to(tmp_path / "f").as_posix() for p in list_images(tmp_path / "f")] == ["b.png", "sub/a.jpg"]
    assert list_images(a) == [a]


def test_image_dataset_reads_and_transforms(tmp_path: Path):
    root = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=2, val_per_class=1)
    split = discover(root)
    dataset = ImageDataset(split.train, transform=lambda image: torch.tensor(image.getpixel((0, 0))))
    image, label = dataset[0]
    assert len(dataset) == 4 and dataset.targets == [0, 0, 1, 1]
    assert label == 0 and image[2] > image[0]  # the first class sorted is "blue"

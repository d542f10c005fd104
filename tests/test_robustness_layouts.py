"""Layouts that cannot work stop before training (before a model is even built) with a one-line
message naming the problem. ``discover``'s own messages are tested in test_data_datasets.py;
here each goes through ``visiontune train`` end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_image, make_image_folder
from visiontune.cli import main

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--workers", "0",
        "--device", "cpu", "--quiet", "--epochs", "1"]


def empty_class_folder(root: Path) -> tuple[Path, list[str]]:
    data = make_image_folder(root, classes=("red", "blue"), per_class=2, val_per_class=1)
    (data / "train" / "green").mkdir()
    return data, ["empty", "green"]


def no_images_at_all(root: Path) -> tuple[Path, list[str]]:
    for name in ("red", "blue"):
        (root / name).mkdir(parents=True)
        (root / name / "readme.txt").write_text("photos go here\n")
    return root, ["no images", str(root)]


def val_classes_train_lacks(root: Path) -> tuple[Path, list[str]]:
    data = make_image_folder(root, classes=("red", "blue"), per_class=2, val_per_class=1)
    make_image(data / "val" / "purple" / "p.png", (120, 0, 120))
    return data, ["purple"]


def a_single_class(root: Path) -> tuple[Path, list[str]]:
    data = make_image_folder(root, classes=("red",), per_class=3, val_per_class=None)
    return data, ["one class", "red"]


def csv_with_unknown_paths(root: Path) -> tuple[Path, list[str]]:
    make_image(root / "img" / "a.png", (200, 0, 0))
    make_image(root / "img" / "b.png", (0, 0, 200))
    manifest = root / "list.csv"
    manifest.write_text("path,label,split\nimg/a.png,red,train\nimg/ghost.png,blue,train\nimg/b.png,blue,val\n")
    return manifest, ["do not exist", "ghost.png"]


def csv_with_unknown_labels(root: Path) -> tuple[Path, list[str]]:
    for name in ("a", "b", "c"):
        make_image(root / "img" / f"{name}.png", (200, 0, 0))
    manifest = root / "list.csv"
    manifest.write_text("img/a.png,red,train\nimg/b.png,blue,train\nimg/c.png,purple,val\n")
    return manifest, ["purple", "line 3"]


LAYOUTS = [empty_class_folder, no_images_at_all, val_classes_train_lacks, a_single_class, csv_with_unknown_paths,
           csv_with_unknown_labels]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.__name__ for layout in LAYOUTS])
def test_an_impossible_layout_stops_before_training_naming_the_problem(layout, tmp_path, capsys, monkeypatch):
    import visiontune.model.create

    def no_model_please(*args, **kwargs):
        raise AssertionError("a model was built for a layout that cannot work")

    monkeypatch.setattr(visiontune.model.create, "create_model", no_model_please)
    data, words = layout(tmp_path / "data")
    run_dir = tmp_path / "run"
    status = main(["train", "--data", str(data), *TINY, "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not run_dir.exists()

"""``--data hf:PATH`` (issue 17): save_to_disk dataset dicts, parquet, named columns, offline Hub names."""

from __future__ import annotations

import csv
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from visiontune.cli import main

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "16", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "1"]
COLOURS = {"cat": (220, 30, 30), "dog": (30, 40, 220)}


def _rows(per_class: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name, colour in COLOURS.items():
        for _ in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (16, 16, 3)), 0, 255).astype("uint8")
            images.append(Image.fromarray(pixels, "RGB"))
            labels.append(name)
    return images, labels


def _dataset(per_class: int, seed: int, *, class_label: bool, image="image", label="label") -> datasets.Dataset:
    images, labels = _rows(per_class, seed)
    if class_label:
        features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=list(COLOURS))})
        return datasets.Dataset.from_dict({image: images, label: [list(COLOURS).index(n) for n in labels]},
                                          features=features)
    features = datasets.Features({image: datasets.Image(), label: datasets.Value("string")})
    return datasets.Dataset.from_dict({image: images, label: labels}, features=features)


def test_a_save_to_disk_dataset_dict_trains_with_its_class_label_names_and_validation_split(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=_dataset(6, 0, class_label=True),
                         validation=_dataset(2, 1, class_label=True)).save_to_disk(str(saved))
    assert main(["train", "--data", f"hf:{saved}", *TINY, "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["classes"] == ["cat", "dog"]
    assert report["data"]["val_split_name"] == "validation" and report["data"]["label_column"] == "label"
    rows = list(csv.DictReader(open(tmp_path / "run" / "val_predictions.csv")))
    assert len(rows) == 4 and rows[0]["path"].endswith("/validation#0") and rows[0]["label"] == "cat"


def test_a_parquet_file_with_named_columns_and_text_labels_is_split_by_val_split(tmp_path):
    table = _dataset(5, 2, class_label=False, image="picture", label="kind")
    table.to_parquet(str(tmp_path / "train.parquet"))
    argv = ["train", "--data", f"hf:{tmp_path / 'train.parquet'}", *TINY, "--val-split", "0.4",
            "--image-column", "picture", "--label-column", "kind", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["classes"] == ["cat", "dog"] and report["data"]["image_column"] == "picture"
    assert report["final"]["num_images"] == 4  # round(5 * 0.4) = 2 per class


@pytest.mark.parametrize("argv, message", [
    (["--image-column", "nope"], "--image-column 'nope' is not a column"),
    (["--label-column", "nope"], "--label-column 'nope' is not a column"),
])
def test_wrong_columns_are_one_line_errors(tmp_path, capsys, argv, message):
    saved = tmp_path / "saved"
    _dataset(3, 0, class_label=True).save_to_disk(str(saved))
    capsys.readouterr()  # the datasets library's own progress lines
    assert main(["train", "--data", f"hf:{saved}", *TINY, *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_hub_name_offline_is_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--data", "hf:someone/some-dataset", *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and err.count("\n") == 1


@pytest.mark.slow
def test_hf_validates_streamed_shards(tmp_path, capsys):
    folder = tmp_path / "data"
    images, labels = _rows(4, 3)
    for index, (image, label) in enumerate(zip(images, labels)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        image.save(folder / label / f"{index}.png")
    assert main(["shard", "--data", str(folder), "--out", str(tmp_path / "shards"), "--val-split", "0.25"]) == 0
    saved = tmp_path / "saved"
    datasets.DatasetDict(validation=_dataset(2, 4, class_label=True)).save_to_disk(str(saved))
    capsys.readouterr()
    argv = ["train", "--data", str(tmp_path / "shards" / "train-{000000..000000}.tar"), "--val-data", f"hf:{saved}",
            *TINY, "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["val_kind"] == "hf" and report["final"]["num_images"] == 4
    assert report["classes"] == ["cat", "dog"]  # the shards' classes.json, matched by name in the hf rows

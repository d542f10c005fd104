"""Multi-label data: both CSV layouts, --task auto, iterative stratification, --val-data."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image, make_image_folder
from visiontune.data.multilabel import (MAX_CLASSES, indices_of, iterative_stratification, looks_multilabel, mask_of,
                                        multi_hot, read_multilabel_manifest, read_multilabel_rows)
from visiontune.data.multilabel_sources import discover_for_task, resolve_task
from visiontune.demo import write_digit_mosaics
from visiontune.errors import ConfigError, DataError


def _images(folder, count):
    for index in range(count):
        make_image(folder / f"img{index}.png", (index * 20 % 255, 80, 160), size=16, noise_seed=index)
    return [f"img{index}.png" for index in range(count)]


def test_masks_round_trip_and_become_multi_hot_vectors():
    assert indices_of(mask_of([0, 3, 62])) == [0, 3, 62]
    assert mask_of([]) == 0
    vectors = multi_hot(torch.tensor([mask_of([1, 2]), 0, mask_of([0])]), 3)
    assert vectors.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert MAX_CLASSES == 63  # int64 bits below the sign bit


def test_names_layout_reads_several_labels_and_empty_negatives(tmp_path):
    names = _images(tmp_path, 6)
    labels = ["cat|dog", "dog", "", "car|cat", "dog | car", "cat"]
    (tmp_path / "m.csv").write_text("path,labels\n" + "".join(f"{n},{lab}\n" for n, lab in zip(names, labels)))
    assert looks_multilabel(tmp_path / "m.csv")
    split = read_multilabel_manifest(tmp_path / "m.csv", val_split=0.34, seed=0)
    assert split.classes == ["car", "cat", "dog"]
    by_name = {s.path.name: indices_of(s.label) for s in split.train + split.val}
    assert by_name == {"img0.png": [1, 2], "img1.png": [2], "img2.png": [], "img3.png": [0, 1],
                       "img4.png": [0, 2], "img5.png": [1]}
    assert split.split_info["task"] == "multilabel" and split.split_info["stratification"] == "iterative"


def test_column_layout_and_split_column(tmp_path):
    names = _images(tmp_path, 4)
    rows = ["1,0,1,train", "0,1,0,train", "0,0,0,val", "1,1,0,test"]
    (tmp_path / "m.csv").write_text("file,cat,dog,car,split\n" + "".join(f"{n},{r}\n" for n, r in zip(names, rows)))
    assert resolve_task(tmp_path / "m.csv", "auto") == "multilabel"
    split = read_multilabel_manifest(tmp_path / "m.csv")
    assert split.classes == ["cat", "dog", "car"]  # the columns' order
    assert [indices_of(s.label) for s in split.train] == [[0, 2], [1]]
    assert [indices_of(s.label) for s in split.val] == [[]]  # test rows are left out
    assert len(read_multilabel_rows(tmp_path / "m.csv", split.classes)) == 1  # its val rows


def test_column_layout_refuses_values_other_than_0_and_1(tmp_path):
    names = _images(tmp_path, 2)
    (tmp_path / "m.csv").write_text(f"path,cat,dog\n{names[0]},1,0\n{names[1]},yes,0\n")
    with pytest.raises(DataError, match="line 3.*0 or 1"):
        read_multilabel_manifest(tmp_path / "m.csv")


def test_auto_keeps_single_label_manifests_and_folders_single(tmp_path):
    names = _images(tmp_path, 4)
    (tmp_path / "single.csv").write_text("path,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    (tmp_path / "headerless.csv").write_text("".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    assert resolve_task(tmp_path / "single.csv", "auto") == "single"
    assert resolve_task(tmp_path / "headerless.csv", "auto") == "single"
    folder = make_image_folder(tmp_path / "folder", per_class=2, val_per_class=1)
    assert resolve_task(folder, "auto") == "single"
    with pytest.raises(ConfigError, match="--task multilabel reads a CSV"):
        resolve_task(folder, "multilabel")


def test_auto_says_it_chose_multilabel(tmp_path, caplog):
    manifest = write_digit_mosaics(tmp_path, count=6, image_size=16, digits=4)
    with caplog.at_level("INFO", logger="visiontune.data.multilabel_sources"):
        assert resolve_task(manifest, "auto") == "multilabel"
    assert "multi-label" in caplog.text


def test_iterative_stratification_keeps_each_labels_share():
    generator = torch.Generator().manual_seed(0)
    # 400 images, 6 labels of very different frequencies (5% .. 60%), some images without a label.
    frequencies = torch.tensor([0.6, 0.4, 0.25, 0.15, 0.08, 0.05])
    label_sets = [torch.nonzero(torch.rand(6, generator=generator) < frequencies).flatten().tolist()
                  for _ in range(400)]
    chosen = iterative_stratification(label_sets, 0.25, seed=0)
    assert chosen == iterative_stratification(label_sets, 0.25, seed=0)  # seeded
    assert abs(len(chosen) - 100) <= 2
    for label in range(6):
        total = sum(label in labels for labels in label_sets)
        in_val = sum(label in label_sets[i] for i in chosen)
        # The rarest-first greedy places each label's images one by one towards its target:
        # off by at most one image per label from round(total * 0.25).
        assert abs(in_val - total * 0.25) <= 1, (label, total, in_val)


def test_iterative_stratification_needs_two_images_and_leaves_one_on_each_side():
    with pytest.raises(DataError, match="at least 2 images"):
        iterative_stratification([[0]], 0.5, 0)
    chosen = iterative_stratification([[0], [1]], 0.99, 0)
    assert len(chosen) == 1


def test_val_data_gives_validation_for_single_label_folders_and_multilabel_manifests(tmp_path):
    train = make_image_folder(tmp_path / "train_set", per_class=3, val_per_class=None)
    val = make_image_folder(tmp_path / "val_set", per_class=2, val_per_class=None)
    split = discover_for_task(train, "single", val_data=val)
    assert len(split.train) == 9 and len(split.val) == 6 and split.split_info["val_data"].endswith("val_set")
    manifest = write_digit_mosaics(tmp_path / "a", count=8, image_size=16, digits=4, seed=0)
    other = write_digit_mosaics(tmp_path / "b", count=5, image_size=16, digits=4, seed=1)
    split = discover_for_task(manifest, "multilabel", val_data=other)
    assert (len(split.train), len(split.val)) == (8, 5)
    with pytest.raises(DataError, match="validates on a CSV"):
        discover_for_task(manifest, "multilabel", val_data=val)


def test_digit_mosaics_hold_two_or_three_distinct_digits(tmp_path):
    manifest = write_digit_mosaics(tmp_path, count=20, image_size=24, digits=5, seed=2)
    lines = manifest.read_text().splitlines()
    assert lines[0] == "path,labels" and len(lines) == 21
    for line in lines[1:]:
        path, labels = line.split(",")
        digits = labels.split("|")
        assert 2 <= len(digits) <= 3 and len(set(digits)) == len(digits) and all(d in "01234" for d in digits)
        assert (tmp_path / path).is_file()

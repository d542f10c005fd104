"""``visiontune audit``: out-of-fold probes + cleanlab find planted label errors, file hashes and
feature cosine find planted duplicates, copies across train/val are leaks, and clean.csv trains.

The scoring is tested on synthetic feature matrices (planted flips and copies, exact answers); one
end-to-end CLI test runs a random-init tiny timm model over a generated colour-class folder."""

from __future__ import annotations

import csv
import html.parser
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import visiontune
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.features.audit import (nearest_neighbours, out_of_fold_probabilities, outliers, score_labels,
                                       stratified_folds, unit_rows)
from visiontune.features.audit_duplicates import duplicate_groups, file_digest

from conftest import CLASS_COLORS, make_image

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


def clustered(per_class: int = 40, classes: int = 3, dim: int = 16, seed: int = 0):
    """Features around well-separated class centres (centre spacing ~4x the noise): a linear probe
    classifies them all right, so only planted flips can look wrong."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 4
    labels = torch.arange(per_class * classes) % classes
    return centres[labels] + torch.randn(len(labels), dim, generator=generator), labels.numpy()


# -- scoring on features ----------------------------------------------------------------------------


def test_stratified_folds_deal_every_class_over_every_fold_and_are_seeded():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 7)
    folds = stratified_folds(labels, 5, seed=3)
    for label in range(3):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # dealt round-robin: an even share each
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    with pytest.raises(ConfigError, match="at least 2"):
        stratified_folds(labels, 1, seed=0)


@pytest.mark.slow  # a few seconds: the first test to import cleanlab (and scikit-learn) pays for it
def test_out_of_fold_probes_and_cleanlab_find_the_planted_flips():
    features, labels = clustered()
    planted = [3, 17, 50, 88, 101, 118]
    noisy = labels.copy()
    noisy[planted] = (labels[planted] + 1) % 3
    probs = out_of_fold_probabilities(features, noisy, 3, folds=5, seed=0)
    assert probs.shape == (len(labels), 3)
    # Each row is a softmax: sums to 1 up to float32 rounding of 3 terms (~1e-7), far inside 1e-5.
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    scores = score_labels(probs, noisy)
    # The planted flips score lowest, and their true class is suggested.
    assert set(np.argsort(scores.quality)[:len(planted)]) == set(planted)
    assert np.array_equal(scores.suggested[planted], labels[planted])
    # cleanlab flags nothing else on separable clusters; it may spare one flip whose out-of-fold
    # probability for its true class sits under that class's confident threshold (the mean of the class).
    assert set(scores.ranked_issues) <= set(planted) and len(scores.ranked_issues) >= len(planted) - 1


def test_duplicates_by_hash_and_by_cosine_and_leaks_across_the_split(tmp_path):
    features, _ = clustered(per_class=20)
    features[5] = features[30]  # a near copy: same features, different file bytes
    features[7] = features[8] * 1.0001  # ... and one within rounding of scale
    paths = []
    for index in range(len(features)):
        path = tmp_path / f"{index}.bin"
        path.write_bytes(b"copy" if index in (10, 40) else f"image {index}".encode())  # 10 and 40: exact copies
        paths.append(path)
    is_val = np.zeros(len(features), dtype=bool)
    is_val[[30, 40]] = True  # 5 (train) ~ 30 (val) and 10 (train) = 40 (val) cross the split; 7 ~ 8 do not
    distances, neighbours = nearest_neighbours(unit_rows(features), 10)
    groups = duplicate_groups([file_digest(p) for p in paths], distances, neighbours, is_val)
    found = {group.members: (group.exact, group.leak) for group in groups}
    assert found == {(5, 30): (False, True), (10, 40): (True, True), (7, 8): (False, False)}
    assert [group.leak for group in groups] == [True, True, False]  # leaks first


def test_an_image_far_from_all_others_is_an_outlier():
    features, _ = clustered(per_class=30)
    features[12] = torch.full((features.shape[1],), 50.0) * torch.tensor([1.0, -1.0] * 8)
    distances, _ = nearest_neighbours(unit_rows(features), 10)
    flags, _ = outliers(distances)
    # Flagged, and the most isolated of all (a Gaussian cluster's tail may also cross the IQR limit).
    assert flags[12] and distances.mean(axis=1).argmax() == 12


def test_missing_cleanlab_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)  # import cleanlab.filter raises ImportError
    assert main(["audit", "--data", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'visiontune[audit]'" in err


@pytest.mark.parametrize("argv, words", [
    (["--data", "D"], ["--model", "--run"]),
    (["--data", "D", "--model", "timm:test_resnet", "--run", "R"], ["exactly one"]),
])
def test_model_or_run_exactly_one(argv, words, capsys):
    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(word in err for word in words)


def test_folds_below_two_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["audit", "--data", "D", "--model", "m", "--folds", "1"])
    assert exit.value.code == 2 and "--folds" in capsys.readouterr().err


# -- end to end -------------------------------------------------------------------------------------


def planted_folder(root: Path) -> tuple[Path, set[Path], set[Path]]:
    """train/val colour classes (12 train + 4 val each, 24 px) with 2 images filed under the wrong
    colour and 2 val images copied byte for byte into train; returns (root, wrong, copies)."""
    seed = 0
    for split, count in (("train", 12), ("val", 4)):
        for name in ("red", "green", "blue"):
            for index in range(count):
                make_image(root / split / name / f"{name}_{index}.png", CLASS_COLORS[name], size=24, noise_seed=seed)
                seed += 1
    wrong = {make_image(root / "train" / "green" / "looks_red.png", CLASS_COLORS["red"], size=24, noise_seed=900),
             make_image(root / "train" / "red" / "looks_blue.png", CLASS_COLORS["blue"], size=24, noise_seed=901)}
    copies = set()
    for name in ("green", "blue"):
        copy = root / "train" / name / f"copy_of_val_{name}_1.png"
        shutil.copyfile(root / "val" / name / f"{name}_1.png", copy)
        copies.add(copy)
    return root, wrong, copies


class _Sections(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.headings, self.images, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


@pytest.mark.slow  # ~6 s: three audits and a one-epoch training run on 54 tiny images
def test_audit_cli_finds_planted_errors_and_leaks_and_clean_csv_trains(tmp_path, capsys):
    data, wrong, copies = planted_folder(tmp_path / "data")
    before = {path: path.read_bytes() for path in data.rglob("*.png")}
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(data), *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("LEAKAGE: 2 validation image(s)")  # printed first, loudly

    rows = {Path(row["path"]): row for row in csv.DictReader(open(out / "audit.csv"))}
    assert len(rows) == len(before)
    for path in wrong:
        assert "label" in rows[path]["issues"].split()
    assert rows[data / "train" / "green" / "looks_red.png"]["suggested_label"] == "red"
    for copy in copies:
        original = data / "val" / copy.parent.name / copy.name.removeprefix("copy_of_val_")
        assert {"leak", "duplicate"} <= set(rows[copy]["issues"].split()) and "leak" in rows[original]["issues"]
    summary = json.loads((out / "audit.json").read_text())
    assert summary["counts"]["leak"] == 4 and summary["counts"]["label"] >= 2
    assert sorted(map(sorted, summary["leaks"])) == sorted(
        sorted([str(copy), str(data / "val" / copy.parent.name / copy.name.removeprefix("copy_of_val_"))])
        for copy in copies)

    clean = list(csv.DictReader(open(out / "clean.csv")))
    kept = {Path(row["path"]) for row in clean}
    assert not kept & (wrong | copies)  # the wrong labels and the training copies of val images are gone
    assert all(data / "val" / c.parent.name / c.name.removeprefix("copy_of_val_") in kept for c in copies)
    assert {row["split"] for row in clean} == {"train", "val"}  # the folders' own val set is kept
    assert {path: path.read_bytes() for path in data.rglob("*.png")} == before  # the user's files untouched

    page = _Sections()
    page.feed((out / "audit.html").read_text())
    assert page.headings[0].startswith("Leakage: 2")
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)

    assert main(["train", "--data", str(out / "clean.csv"), "--model", "timm:test_resnet", "--weights", "none",
                 "--image-size", "24", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "best.safetensors").is_file()

    # The same audit again reads the features back from the cache, and finds the same.
    again = visiontune.audit(data, "timm:test_resnet", weights="none", image_size=32, batch_size=8, device="cpu",
                             out=tmp_path / "again")
    assert again.feature_cache_hit
    assert [row.issues for row in again.rows] == [rows[row.path]["issues"].split() for row in again.rows]

    # A finished run's backbone gives the features with --run (its own preprocessing, 24 px).
    assert main(["audit", "--data", str(data), "--run", str(tmp_path / "run"), "--device", "cpu",
                 "--out", str(tmp_path / "from-run")]) == 0
    from_run = json.loads((tmp_path / "from-run" / "audit.json").read_text())
    assert from_run["settings"]["run"] == str(tmp_path / "run") and from_run["settings"]["image_size"] == 24
    assert from_run["counts"]["leak"] == 4  # the exact copies are found by their bytes whatever the features

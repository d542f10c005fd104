"""The plots are real PNG files with something drawn on them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.run.plots import _phase_changes, plot_confusion, plot_curves


def assert_drawn_png(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, "the image is blank"
    return pixels


def test_plot_curves_from_csv_strings(tmp_path):
    rows = [
        {"epoch": "1", "phase": "head", "train_loss": "1.2", "val_loss": "1.0", "train_acc": "0.4", "val_acc": "0.5"},
        {"epoch": "2", "phase": "head", "train_loss": "0.8", "val_loss": "0.7", "train_acc": "0.6", "val_acc": "0.7"},
        {"epoch": "3", "phase": "all", "train_loss": "0.4", "val_loss": "", "train_acc": "0.9", "val_acc": ""},
    ]
    path = plot_curves(rows, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    assert_drawn_png(path)


def test_phase_changes_are_found():
    rows = [{"epoch": 1, "phase": "head"}, {"epoch": 2, "phase": "head"}, {"epoch": 3, "phase": "all"}]
    assert _phase_changes(rows, [1, 2, 3]) == [(3, "all")]
    assert _phase_changes([{"epoch": 1}, {"epoch": 2}], [1, 2]) == []


def test_plot_curves_with_a_single_epoch(tmp_path):
    assert_drawn_png(plot_curves([{"epoch": 0, "train_loss": 0.5, "val_acc": 0.9}], tmp_path / "c.png"))


@pytest.mark.parametrize("num_classes", [3, 50])
def test_plot_confusion(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, (num_classes, num_classes)) + np.eye(num_classes, dtype=int) * 20
    classes = [f"class_{i}" for i in range(num_classes)]
    pixels = assert_drawn_png(plot_confusion(confusion.tolist(), classes, tmp_path / "confusion.png"))
    assert min(pixels.shape) >= 400  # large enough to read


def test_plot_confusion_rejects_a_mismatched_matrix(tmp_path):
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "x.png")

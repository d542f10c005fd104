"""--budget without --image-size: the budget chooses the image size too (arithmetic, then a fake clock)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_image_folder
from visiontune.config import TrainConfig
from visiontune.training.budget import CANDIDATE_SIZES, SMALLEST_SIZE, TARGET_EPOCHS, choose_image_size
from visiontune.training.engine import train

TINY = dict(model="timm:test_resnet", weights="none", batch_size=8, workers=0, seed=0, device="cpu", lr=1e-3)
NATIVE = 160  # timm's test_resnet pretrained configuration: 160 px


def test_the_weights_own_size_is_kept_when_its_epochs_fit():
    choice = choose_image_size(epoch_seconds=2.0, measured_size=224, budget_seconds=100.0, fixed_overhead=10.0,
                               largest=224)
    assert choice.image_size == 224 and "224 px" in choice.explanation


def test_a_tight_budget_chooses_the_largest_size_whose_epochs_fit():
    # 40 s an epoch at 224 px, scaled by the pixels: (s / 224)^2 * 40 * 5 <= 100 -> s <= 158 px.
    choice = choose_image_size(epoch_seconds=40.0, measured_size=224, budget_seconds=100.0, fixed_overhead=0.0,
                               largest=224)
    assert choice.image_size == max(size for size in CANDIDATE_SIZES if size <= 158)
    assert choice.predicted_epoch_seconds * TARGET_EPOCHS <= 100.0
    assert choice.predicted_epoch_seconds == pytest.approx(40.0 * (choice.image_size / 224) ** 2)


def test_nothing_fits_gives_the_smallest_size_and_says_so():
    choice = choose_image_size(epoch_seconds=1000.0, measured_size=224, budget_seconds=60.0, fixed_overhead=0.0,
                               largest=224)
    assert choice.image_size == SMALLEST_SIZE and "smallest" in choice.explanation


def test_never_larger_than_the_weights_own_size():
    choice = choose_image_size(epoch_seconds=0.001, measured_size=96, budget_seconds=1000.0, fixed_overhead=0.0,
                               largest=96)
    assert choice.image_size == 96


@pytest.mark.slow
def test_a_budget_without_image_size_trains_at_the_size_it_chose(tmp_path):
    # Fake clock: each reading is 1 s, so a probed step or validation batch "takes" 1 s; an epoch
    # at 160 px (3 steps, 2 validation batches) 5 s: 5 epochs (25 s) cannot fit 40 s less the
    # set-up counted twice, so a smaller size must be chosen (still >= 64 px).
    data = make_image_folder(tmp_path / "data", per_class=8, val_per_class=3)
    ticks = iter(range(1, 10**6))
    config = TrainConfig(data=str(data), strategy="full", budget="40s", out=str(tmp_path / "run"), **TINY)
    result = train(config, clock=lambda: float(next(ticks)))
    budget = json.loads((result.run_dir / "report.json").read_text())["budget"]
    chosen = budget["image_size"]
    assert SMALLEST_SIZE <= chosen < NATIVE and chosen in CANDIDATE_SIZES
    assert f"image size {chosen} px" in budget["image_size_explanation"]
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["image_size"] == chosen
    assert config.image_size is None  # the caller's config is left as it was

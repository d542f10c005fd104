"""One RAM budget per run, shared by the decoded-image cache and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import make_image_folder

from visiontune.config import TrainConfig
from visiontune.data import decoded_bytes, fits_in_memory
from visiontune.features.store import allocate_features
from visiontune.memory import MemoryBudget
from visiontune.training.phase_inputs import PhaseInputs
from visiontune.training.setup import build_training
from visiontune.training.strategies import apply_phase

FEATURE_SHAPE = (6,)
FEATURE_BYTES = 2 * 4 * 6 * 4  # 2 views x 4 images x 6 float32 features


def test_claims_are_refused_past_the_total_and_given_back():
    budget = MemoryBudget(total_bytes=100)
    assert budget.claim(60, "a") and budget.free_bytes == 40
    assert not budget.claim(41, "b") and budget.claimed_bytes == 60  # a refused claim takes nothing
    assert budget.claim(40, "c") and budget.free_bytes == 0
    budget.release(40)
    assert budget.free_bytes == 40
    budget.force(50, "asked for memory")  # recorded even over the total, so later claims see it
    assert budget.claimed_bytes == 110 and budget.free_bytes == 0 and not budget.fits(1)


def test_the_budget_is_a_fraction_of_the_available_ram():
    assert MemoryBudget.from_available(0.5).total_bytes >= MemoryBudget.from_available(0.25).total_bytes > 0


def test_features_go_to_disk_when_the_decoded_images_took_the_budget(tmp_path: Path):
    images = decoded_bytes(4, 8)
    entry = tmp_path / "features" / "key"
    alone = MemoryBudget(total_bytes=FEATURE_BYTES)
    buffer, staging = allocate_features(2, 4, FEATURE_SHAPE, entry, "auto", alone)
    assert isinstance(buffer, torch.Tensor) and staging is None and alone.claimed_bytes == FEATURE_BYTES

    # The same total shared: the decoded images claim first, the features no longer fit beside them.
    shared = MemoryBudget(total_bytes=FEATURE_BYTES + images - 1)
    assert fits_in_memory(4, 8, shared) and shared.claim(images, "decoded images")
    buffer, staging = allocate_features(2, 4, FEATURE_SHAPE, entry, "auto", shared)
    assert isinstance(buffer, np.memmap) and staging is not None and staging.parent == entry.parent
    assert shared.claimed_bytes == images  # memory-mapped features claim no RAM


def test_a_run_counts_its_decoded_images_and_features_in_one_budget(tmp_path: Path):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=16)
    config = TrainConfig(data=str(data), model="timm:test_resnet", weights="none", image_size=16, strategy="gradual",
                         freeze_epochs=1, epochs=2, batch_size=4, augment="none", workers=0, device="cpu",
                         out=str(tmp_path / "run"))
    setup = build_training(config)
    budget = setup.memory_budget
    images = decoded_bytes(len(setup.train_loader.dataset) + len(setup.val_loader.dataset),
                           setup.preprocessing.resize_size)
    assert budget.claimed_bytes == images  # 18 tiny images fit any machine's budget

    inputs = PhaseInputs(setup)
    head_phase = inputs.for_epoch(0, 0)
    assert head_phase.model is not setup.model  # the head trains on cached features ...
    train_features = head_phase.train_loader.dataset.cache.memory_bytes
    assert train_features > 0 and budget.claimed_bytes > images + train_features  # ... train and val, both counted

    apply_phase(setup.model, setup.phases[1])
    assert inputs.for_epoch(1, 1).model is setup.model  # the whole model trains: the features are dropped
    assert budget.claimed_bytes == images

"""Memory honesty (issue 17): decoded images over the memory budget spill to a memory-mapped file,
and report.json says which path each split used."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_image_folder
from visiontune import train
from visiontune.config import config_from_dict
from visiontune.data import decode_to_uint8, discover
from visiontune.training import setup as training_setup


def test_spilled_images_equal_the_in_memory_ones_and_leave_no_file(tmp_path):
    split = discover(make_image_folder(tmp_path / "data", per_class=3, val_per_class=1, size=20))
    in_memory = decode_to_uint8(split.train, 16, crop_size=16)
    spilled = decode_to_uint8(split.train, 16, crop_size=16, spill_dir=tmp_path / "spill")
    assert torch.equal(in_memory.images, spilled.images) and torch.equal(in_memory.labels, spilled.labels)
    assert list((tmp_path / "spill").iterdir()) == []  # unlinked once mapped: a crash leaves nothing behind


def _run(tmp_path, name: str) -> dict:
    config = config_from_dict({"data": str(tmp_path / "data"), "model": "timm:test_resnet", "weights": "none",
                               "image_size": 16, "batch_size": 8, "workers": 0, "device": "cpu", "epochs": 1,
                               "seed": 2, "out": str(tmp_path / name)})
    train(config)
    return json.loads((tmp_path / name / "report.json").read_text())


@pytest.mark.slow
def test_a_run_over_the_memory_budget_memory_maps_its_images_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))
    make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=16)
    memory = _run(tmp_path, "memory")
    assert memory["data"]["train_path"] == memory["data"]["val_path"] == "memory (decoded once)"
    monkeypatch.setattr("visiontune.data.fits_in_memory", lambda *args, **kwargs: False)
    spilled = _run(tmp_path, "spilled")
    assert spilled["data"]["train_path"].startswith("disk (decoded once, memory-mapped")
    # The same uint8 pixels in the same seeded order: the same training, to the bit.
    assert spilled["final"]["loss"] == memory["final"]["loss"]
    monkeypatch.setattr("visiontune.data.fits_on_disk", lambda *args, **kwargs: False)
    with caplog.at_level("WARNING", logger=training_setup.__name__):
        files = _run(tmp_path, "files")
    assert files["data"]["train_path"] == "files (decoded every epoch)"
    assert any("fit neither the memory budget nor the free disk" in record.getMessage() for record in caplog.records)

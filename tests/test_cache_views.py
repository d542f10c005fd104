"""The feature cache's automatic views: on by default in a frozen phase with augmentation,
K chosen from the phase's epochs and the memory budget, overridable, and exact on resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.commands.train import ConsoleReporter
from visiontune.features import views as views_module
from visiontune.features.views import MIN_AUTO_VIEWS, choose_cache_views
from visiontune.memory import MemoryBudget
from visiontune.training import phase_inputs
from visiontune.training import setup as training_setup

# Default flags except what keeps the run tiny and offline: --augment is left at its default (basic,
# a random transform), --cache-views and --feature-cache are left unset.
PROBE = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--workers", "0", "--seed", "3", "--device", "cpu", "--quiet", "--strategy", "linear-probe"]
MIB = 2**20


def _train(tmp_path, monkeypatch, *flags, name="run") -> dict:
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))  # never the user's cache folder
    data = tmp_path / "data"
    if not data.exists():
        make_image_folder(data, per_class=6, val_per_class=2)
    assert main(["train", "--data", str(data), *PROBE, *flags, "--out", str(tmp_path / name)]) == 0
    return json.loads((tmp_path / name / "report.json").read_text())


def _tiny_budget(monkeypatch, nbytes: int = 1) -> None:
    monkeypatch.setattr(training_setup.MemoryBudget, "from_available", classmethod(lambda cls: MemoryBudget(nbytes)))


# -- the arithmetic ---------------------------------------------------------------------------------


def test_auto_views_are_one_per_ten_epochs_at_least_two_at_most_the_epochs():
    plenty = 10**12
    assert choose_cache_views(20, bytes_per_view=MIB, free_bytes=plenty)[0] == 2
    assert choose_cache_views(50, bytes_per_view=MIB, free_bytes=plenty)[0] == 5
    assert choose_cache_views(3, bytes_per_view=MIB, free_bytes=plenty)[0] == MIN_AUTO_VIEWS
    assert choose_cache_views(1, bytes_per_view=MIB, free_bytes=plenty)[0] == 1  # a second view no epoch uses
    views, why = choose_cache_views(50, bytes_per_view=MIB, free_bytes=plenty)
    assert "5 augmented views" in why and "50 epoch" in why


def test_auto_views_respect_the_memory_budget():
    views, why = choose_cache_views(60, bytes_per_view=MIB, free_bytes=3 * MIB + MIB // 2)  # 6 wanted, 3 fit
    assert views == 3 and "only 3 fit in memory" in why
    views, why = choose_cache_views(60, bytes_per_view=MIB, free_bytes=MIB)  # not even the minimum fits
    assert views == MIN_AUTO_VIEWS and "disk" in why
    with pytest.raises(ValueError, match="at least one epoch"):
        choose_cache_views(0, bytes_per_view=MIB, free_bytes=MIB)


# -- training with default flags --------------------------------------------------------------------


@pytest.mark.slow
def test_a_default_linear_probe_with_augmentation_trains_on_cached_views(tmp_path, monkeypatch, caplog):
    built = []
    real = phase_inputs.build_feature_cache

    def spy(model, dataset, *, views=1, **options):
        built.append(views)
        return real(model, dataset, views=views, **options)

    monkeypatch.setattr(phase_inputs, "build_feature_cache", spy)
    with caplog.at_level(logging.INFO, logger="visiontune"):
        report = _train(tmp_path, monkeypatch, "--epochs", "3")
    plan = report["feature_cache"]["head"]
    assert (plan["mode"], plan["views"]) == ("views", 2)
    assert "caching 2 augmented views" in plan["reason"] and "memory budget" in plan["reason"]
    assert built == [2, 1]  # the training images twice (two views), the validation images once
    assert any("feature cache views" in record.getMessage() and "caching 2" in record.getMessage()
               for record in caplog.records)


@pytest.mark.slow
def test_a_tiny_memory_budget_caps_the_views(tmp_path, monkeypatch):
    # Every epoch would get its own view (3), but the budget holds none: the minimum goes to disk.
    monkeypatch.setattr(views_module, "EPOCHS_PER_AUTO_VIEW", 1)
    monkeypatch.setattr("visiontune.data.fits_in_memory", lambda *args, **kwargs: False)  # files: a disk key
    monkeypatch.setattr(training_setup, "fits_in_memory", lambda *args, **kwargs: False, raising=False)
    _tiny_budget(monkeypatch)
    plan = _train(tmp_path, monkeypatch, "--epochs", "3")["feature_cache"]["head"]
    assert (plan["mode"], plan["views"]) == ("views", MIN_AUTO_VIEWS)
    assert "do not fit in memory" in plan["reason"]
    assert any((tmp_path / "cache" / "features").iterdir())  # the views were written to disk


@pytest.mark.slow
def test_cache_views_still_overrides(tmp_path, monkeypatch):
    plan = _train(tmp_path, monkeypatch, "--epochs", "2", "--cache-views", "3", name="three")["feature_cache"]["head"]
    assert (plan["mode"], plan["views"]) == ("views", 3)
    plan = _train(tmp_path, monkeypatch, "--epochs", "2", "--cache-views", "0", name="off")["feature_cache"]["head"]
    assert (plan["mode"], plan["views"]) == ("off", 0) and "cache_views is 0" in plan["reason"]


@pytest.mark.slow
def test_gradual_caches_views_in_its_head_phase_only(tmp_path, monkeypatch):
    cache = _train(tmp_path, monkeypatch, "--strategy", "gradual", "--epochs", "3", "--freeze-epochs", "2")
    assert cache["feature_cache"]["head"]["mode"] == "views" and cache["feature_cache"]["head"]["views"] == 2
    assert cache["feature_cache"]["full"]["mode"] == "off"


# -- exact resume -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_cached_views_is_exact_and_keeps_the_chosen_views(tmp_path, monkeypatch, capsys):
    # One view per epoch (3) when the run starts.
    monkeypatch.setattr(views_module, "EPOCHS_PER_AUTO_VIEW", 1)
    flags = ["--epochs", "3", "--lr", "0.05"]
    _train(tmp_path, monkeypatch, *flags, name="straight")

    def interrupt_in_epoch_3(self, images):
        if self.epoch_number == 3:
            raise KeyboardInterrupt

    original_start = ConsoleReporter.start_epoch

    def remember_epoch(self, epoch, epochs, num_batches, phase):
        self.epoch_number = epoch
        original_start(self, epoch, epochs, num_batches, phase)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(ConsoleReporter, "start_epoch", remember_epoch)
        patch.setattr(ConsoleReporter, "advance", interrupt_in_epoch_3)
        assert main(["train", "--data", str(tmp_path / "data"), *PROBE, *flags, "--out", str(interrupted)]) == 130
    assert torch.load(interrupted / "last.ckpt", weights_only=True)["feature_cache"]["head"]["views"] == 3

    # Choosing again would now give 2 views (one per 10 epochs, at least 2); the resume must keep 3.
    # (The budget is left alone: a smaller one would also move the images from memory to files,
    # whose augmented crops differ by design, see visiontune.data.decoded_cache.)
    monkeypatch.setattr(views_module, "EPOCHS_PER_AUTO_VIEW", 10)
    assert main(["train", "--resume", str(interrupted)]) == 0

    expected = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    resumed = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert resumed["feature_cache"]["head"]["views"] == expected["feature_cache"]["head"]["views"] == 3
    assert resumed["epoch"] == expected["epoch"] == 3 and resumed["step"] == expected["step"]
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key  # bit for bit: same views, same order
    for key, value in expected["optimizer"]["state"].items():
        assert all(torch.equal(value[name], resumed["optimizer"]["state"][key][name]) for name in value)

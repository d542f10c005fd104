"""Exact resume: an interrupted-and-resumed run ends with the same weights as a straight one."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.commands.train import ConsoleReporter

# gradual: the optimizer is rebuilt at the phase switch (after epoch 1); the interruption comes in
# epoch 3, so the resume must restore the SECOND phase's optimizer. Mixup and augmentation draw
# from the RNGs, which must be restored too.
RECIPE = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
          "--seed", "3", "--device", "cpu", "--quiet", "--strategy", "gradual", "--epochs", "3", "--lr", "0.001",
          "--mixup", "0.2", "--augment", "trivial", "--warmup-epochs", "0.5"]
TIMING_COLUMNS = ("seconds", "images_per_s")


def _metrics_without_timings(run_dir):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["plain", "ema"])
def test_interrupted_and_resumed_run_matches_a_straight_run_bit_for_bit(tmp_path, monkeypatch, capsys, extra):
    data = make_image_folder(tmp_path / "data", per_class=6, val_per_class=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    recipe = [*RECIPE, *extra]
    assert main(["train", "--data", str(data), *recipe, "--out", str(straight)]) == 0

    def interrupt_in_epoch_3(self, images):
        if self.epoch_number == 3:
            raise KeyboardInterrupt

    original_start = ConsoleReporter.start_epoch

    def remember_epoch(self, epoch, epochs, num_batches, phase):
        self.epoch_number = epoch
        original_start(self, epoch, epochs, num_batches, phase)

    with monkeypatch.context() as patch:
        patch.setattr(ConsoleReporter, "start_epoch", remember_epoch)
        patch.setattr(ConsoleReporter, "advance", interrupt_in_epoch_3)
        assert main(["train", "--data", str(data), *recipe, "--out", str(interrupted)]) == 130
    assert f"--resume {interrupted}" in capsys.readouterr().err
    saved = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["phase"]) == (2, 1)

    assert main(["train", "--resume", str(interrupted)]) == 0  # no other flag needed

    expected = torch.load(straight / "last.ckpt", weights_only=True)
    resumed = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 3 and resumed["step"] == expected["step"]
    assert expected["model"].keys() == resumed["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in expected["optimizer"]["state"].items():
        assert all(torch.equal(value[name], resumed["optimizer"]["state"][key][name]) for name in value)
    assert ("ema" in expected) == ("ema" in resumed) == bool(extra)
    for key, value in expected.get("ema", {}).items():  # --ema: the average resumes exactly too
        assert torch.equal(value, resumed["ema"][key]), key
    assert expected["best_weights"] == resumed["best_weights"]
    assert _metrics_without_timings(straight) == _metrics_without_timings(interrupted)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "last.ckpt does not exist" in capsys.readouterr().err

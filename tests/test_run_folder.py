"""The run folder (run/folder.py): creating it, and last.ckpt's training state written and read back."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from visiontune.cli import main
from visiontune.errors import CheckpointError, ConfigError
from visiontune.run.folder import (LAST_CHECKPOINT, capture_rng_state, check_run_dir, default_run_dir,
                                   load_training_state, prepare_run_dir, read_metrics_csv, restore_rng_state,
                                   save_training_state, write_metrics_csv)
from visiontune.training.state import STATE_FORMAT, ResumePoint, TrainingState


def _trained_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model after one AdamW step, so the optimizer holds per-parameter state to round-trip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state() -> TrainingState:
    return TrainingState(epoch=2, step=6, phase=1, phase_start_step=3, best_accuracy=0.75, best_epoch=1,
                         epochs_without_improvement=1, train_seconds=1.5, stopped_early=False,
                         history=[{"epoch": 1, "phase": "head", "val_acc": 0.75}, {"epoch": 2, "phase": "full"}],
                         feature_cache={0: {"mode": "memory"}})


def _save(run_dir, state: TrainingState, model: nn.Module, optimizer) -> None:
    resume = ResumePoint(config={"model": "m", "lr": 0.01}, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=capture_rng_state())
    save_training_state(run_dir, state.to_checkpoint(resume))


# -- creating the folder -------------------------------------------------------------------------


def test_default_run_dir_is_the_model_name_made_safe_and_a_timestamp(tmp_path):
    path = default_run_dir("timm:convnext_tiny", root=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("timm-convnext_tiny-")
    assert default_run_dir("::", root=tmp_path).name.startswith("model-")


def test_check_run_dir_refuses_a_file_and_a_folder_with_files(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "file")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_run_dir(tmp_path / "used")
    # --overwrite replaces only a run's own files: a folder of someone else's files is no run folder
    with pytest.raises(ConfigError, match="not a visiontune run folder"):
        check_run_dir(tmp_path / "used", overwrite=True)
    (tmp_path / "used" / "config.yaml").write_text("model: resnet18\n")
    assert check_run_dir(tmp_path / "used", overwrite=True) == tmp_path / "used"


def test_prepare_run_dir_with_overwrite_removes_only_visiontune_files(tmp_path):
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir)
    assert run_dir.is_dir()
    (run_dir / "config.yaml").write_text("model: resnet18\n")
    (run_dir / "metrics.csv").write_text("old")
    (run_dir / LAST_CHECKPOINT).write_bytes(b"old")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "notes.txt").write_text("the user's own")
    with pytest.raises(ConfigError):
        prepare_run_dir(run_dir)
    prepare_run_dir(run_dir, overwrite=True)
    assert sorted(path.name for path in run_dir.iterdir()) == ["notes.txt"]


def test_metrics_csv_round_trip_keeps_the_columns_and_rows(tmp_path):
    rows = [{"epoch": 1, "phase": "head", "lr": 0.001, "train_loss": 0.5, "val_acc": 0.25},
            {"epoch": 2, "phase": "full", "lr": 0.0005, "train_loss": 0.25, "val_acc": 0.5}]
    write_metrics_csv(tmp_path, rows)
    read = read_metrics_csv(tmp_path)
    assert [(row["epoch"], row["phase"], row["val_acc"]) for row in read] == [("1", "head", "0.25"), ("2", "full", "0.5")]
    assert read[0]["val_top5"] == ""  # columns a row lacks stay empty


# -- the training state --------------------------------------------------------------------------


def test_training_state_round_trips_through_last_ckpt(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    _save(tmp_path, _state(), model, optimizer)
    checkpoint = load_training_state(tmp_path)
    state, resume = TrainingState.from_checkpoint(checkpoint, tmp_path / LAST_CHECKPOINT)
    assert state == _state()
    assert resume.config == {"model": "m", "lr": 0.01} and resume.scaler is None
    assert resume.model.keys() == model.state_dict().keys()
    assert all(torch.equal(value, resume.model[key]) for key, value in model.state_dict().items())
    restored, _ = _trained_model_and_optimizer()
    again = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    again.load_state_dict(resume.optimizer)
    for key, value in optimizer.state_dict()["state"].items():
        assert all(torch.equal(value[name], again.state_dict()["state"][key][name]) for name in value)


def test_last_ckpt_loads_without_pickled_code_and_has_no_dead_entries(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    _save(tmp_path, _state(), model, optimizer)
    raw = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)  # tensors and plain values only
    assert raw["format"] == STATE_FORMAT and (raw["epoch"], raw["step"], raw["phase"]) == (2, 6, 1)
    assert "scheduler" not in raw and "scaler" not in raw  # the schedule is a function of the step; no fp16 here


def test_rng_state_round_trip_repeats_every_generator(tmp_path):
    saved = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(7), np.random.rand(7), random.random()  # move every stream on
    restore_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_an_old_format_checkpoint_is_refused_with_what_to_do(tmp_path):
    model, _ = _trained_model_and_optimizer()
    old = {"format": 1, "epoch": 1, "model": model.state_dict(), "scheduler": {"step": 3}}  # visiontune's first layout
    torch.save(old, tmp_path / LAST_CHECKPOINT)
    with pytest.raises(CheckpointError) as error:
        TrainingState.from_checkpoint(load_training_state(tmp_path), tmp_path / LAST_CHECKPOINT)
    message = str(error.value)
    assert str(tmp_path / LAST_CHECKPOINT) in message and "format 1" in message and "--weights" in message
    assert "\n" not in message


def test_resuming_an_old_format_run_is_a_one_line_error(tmp_path, capsys):
    model, _ = _trained_model_and_optimizer()
    torch.save({"format": 1, "epoch": 1, "model": model.state_dict()}, tmp_path / LAST_CHECKPOINT)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "format 1" in err and "cannot be resumed" in err


@pytest.mark.parametrize("checkpoint, expected", [
    ({"model": {"weight": torch.zeros(1)}}, "not a visiontune training checkpoint"),  # someone else's file
    ({"format": STATE_FORMAT + 1, "model": {}}, "upgrade visiontune"),
    ({"format": STATE_FORMAT, "epoch": 1, "model": {}}, "incomplete"),
])
def test_foreign_newer_and_incomplete_checkpoints_are_named(tmp_path, checkpoint, expected):
    torch.save(checkpoint, tmp_path / LAST_CHECKPOINT)
    with pytest.raises(CheckpointError, match=expected) as error:
        TrainingState.from_checkpoint(load_training_state(tmp_path), tmp_path / LAST_CHECKPOINT)
    assert str(tmp_path / LAST_CHECKPOINT) in str(error.value)


def test_a_file_without_model_state_is_not_a_training_checkpoint(tmp_path):
    torch.save({"format": STATE_FORMAT, "epoch": 1}, tmp_path / LAST_CHECKPOINT)
    with pytest.raises(CheckpointError, match="no model state"):
        load_training_state(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "elsewhere")

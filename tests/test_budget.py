"""``--budget``: parsing, the epoch arithmetic, and the engine driven by a fake clock (never wall time)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.commands.train import process_started
from visiontune.config import TrainConfig
from visiontune.errors import ConfigError
from visiontune.training.budget import MAX_EPOCHS, TOLERANCE, choose_epochs, parse_budget, time_is_up
from visiontune.training.engine import LogReporter, TrainingInterrupted, resume, train

TINY = dict(model="timm:test_resnet", weights="none", image_size=32, batch_size=8, workers=0, seed=0, device="cpu",
            lr=1e-3)
TINY_FLAGS = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
              "--workers", "0", "--device", "cpu", "--quiet"]


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1h", 3600), ("1h30m", 5400), ("1m30s", 90),
                                           ("180", 180), ("2.5m", 150), (" 3M ", 180), ("0.5", 0.5), (45, 45)])
def test_budgets_parse_to_seconds(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "3x", "m", "h30", "1m1h", "0", "0s", "-5", "nan", "inf", "3 minutes"])
def test_a_wrong_budget_is_a_one_line_error_naming_it(text):
    with pytest.raises(ConfigError) as error:
        parse_budget(text)
    message = str(error.value)
    assert "--budget" in message and "1h30m" in message and "\n" not in message


# -- the arithmetic -----------------------------------------------------------------------------


def test_the_epochs_fill_the_budget_after_the_overhead():
    # 20 steps x 0.5 s + 2 s validation = 12 s per epoch; 180 s - 24 s overhead = 156 s = 13 epochs exactly
    choice = choose_epochs(0.5, 20, 2.0, 180.0, 24.0)
    assert choice.epochs == 13 and choice.epoch_seconds == 12.0 and choice.predicted_seconds == 180.0
    assert "13 epoch(s)" in choice.explanation and "12 s per epoch" in choice.explanation


def test_the_epoch_count_nearest_the_budget_wins():
    # 153 s left: 12 epochs end 9 s early, 13 end 3 s late (within the 10 %): 13
    assert choose_epochs(0.5, 20, 2.0, 180.0, 27.0).epochs == 13
    # 159 s left: 13 epochs end 3 s early, 14 would end 9 s late: 13
    assert choose_epochs(0.5, 20, 2.0, 180.0, 21.0).epochs == 13


def test_an_epoch_that_would_pass_the_tolerance_is_not_planned():
    # 100 s epochs in 180 s: 2 epochs are nearer (200 s) but 11 % over, so 1
    assert choose_epochs(1.0, 90, 10.0, 180.0, 0.0).epochs == 1
    # 91 s epochs in 180 s: 2 epochs (182 s) are 1 % over, so 2
    assert choose_epochs(1.0, 81, 10.0, 180.0, 0.0).epochs == 2
    # 88 s epochs and 10 s overhead: 186 s is 3.3 % over, nearer than 98 s: 2, within half the tolerance
    assert choose_epochs(1.0, 78, 10.0, 180.0, 10.0).epochs == 2
    # 93 s epochs and 10 s overhead: 196 s is 8.9 % over, within the tolerance but not the plan's half: 1
    assert choose_epochs(1.0, 83, 10.0, 180.0, 10.0).epochs == 1


def test_the_fewest_epochs_are_chosen_and_explained_when_nothing_fits():
    choice = choose_epochs(10.0, 30, 5.0, 60.0, 10.0, min_epochs=2)  # gradual needs two
    assert choice.epochs == 2 and "even 2 epoch(s)" in choice.explanation and "more than the 60 s" in choice.explanation


def test_a_free_step_is_capped():
    assert choose_epochs(0.0, 10, 0.0, 60.0, 1.0).epochs == MAX_EPOCHS


@pytest.mark.parametrize("seconds_per_step", [0.01, 0.037, 0.2, 1.3])
@pytest.mark.parametrize("budget", [60.0, 180.0, 3600.0])
def test_the_prediction_is_within_half_the_tolerance_whenever_ten_epochs_fit(seconds_per_step, budget):
    steps, eval_seconds, overhead = 40, 3.0, 0.1 * budget
    choice = choose_epochs(seconds_per_step, steps, eval_seconds, budget, overhead)
    if 10 * choice.epoch_seconds <= budget - overhead and choice.epochs < MAX_EPOCHS:
        # an epoch is <= 10 % of the budget here: the nearer of the two whole epoch counts around
        # the budget is at most half an epoch, 5 %, away, and is the one chosen
        assert abs(choice.predicted_seconds - budget) <= TOLERANCE / 2 * budget


def test_time_is_up_when_another_epoch_would_pass_the_tolerance():
    assert not time_is_up(100.0, 50.0, 10.0, 160.0)  # 160 s: on budget
    assert not time_is_up(100.0, 60.0, 15.0, 160.0)  # 175 s <= 176 s
    assert time_is_up(100.0, 60.0, 17.0, 160.0)  # 177 s > 176 s


# -- the engine, with a fake clock ----------------------------------------------------------------


class FakeClock:
    """Every reading advances it by ``tick`` seconds; ``now`` may also be moved by hand."""

    def __init__(self, tick: float = 1.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class SlowEpochs(LogReporter):
    """Makes every training batch cost ``seconds_per_batch`` on the fake clock."""

    def __init__(self, clock: FakeClock, seconds_per_batch: float):
        self.clock, self.seconds_per_batch = clock, seconds_per_batch

    def advance(self, images: int) -> None:
        self.clock.now += self.seconds_per_batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 24 training images in batches of 8: 3 steps per epoch; 9 validation images: 2 batches
    return make_image_folder(tmp_path_factory.mktemp("budget") / "data", per_class=8, val_per_class=3)


def _report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def test_the_budget_chooses_the_epochs_from_the_measured_steps_and_says_why(data, tmp_path):
    # The fake clock advances 1 s per reading, and the probe reads it once per step: 1 s per step
    # and per validation batch, so an epoch is estimated at 3 x 1 s + 2 x 1 s = 5 s.
    clock = FakeClock(tick=1.0)
    config = TrainConfig(data=str(data), strategy="linear-probe", budget="30s", out=str(tmp_path / "run"), **TINY)
    result = train(config, clock=clock)
    budget = _report(result.run_dir)["budget"]
    assert budget["seconds_per_step"] == 1.0 and budget["steps_per_epoch"] == 3
    assert budget["validation_seconds"] == 2.0 and budget["epoch_seconds"] == 5.0
    assert budget["final_seconds"] > budget["validation_seconds"]  # the final evaluation and writing the report
    expected = choose_epochs(1.0, 3, 2.0, 30.0, budget["setup_seconds"] + budget["final_seconds"])
    assert budget["epochs"] == expected.epochs > 1 and budget["explanation"] == expected.explanation
    assert abs(budget["predicted_seconds"] - 30.0) <= TOLERANCE * 30.0
    # The run trained exactly the chosen epochs, which its config records, and never stopped for time.
    assert result.epochs_completed == budget["epochs"] and not budget["stopped_for_time"]
    assert f"epochs: {budget['epochs']}" in (result.run_dir / "config.yaml").read_text()
    assert budget["budget"] == "30s" and budget["budget_seconds"] == 30.0
    assert config.epochs == 10  # the caller's config is left as it was


@pytest.mark.parametrize("strategy", ["full", "gradual"])
def test_the_timed_steps_leave_no_trace(data, tmp_path, strategy):
    """A budgeted run trains exactly what the same run with its chosen epochs trains: the probe's
    steps are undone (weights, BatchNorm statistics, optimizer state, random generators, and
    gradual's trainable set, timed in both phases)."""
    budgeted = train(TrainConfig(data=str(data), strategy=strategy, budget="32s", out=str(tmp_path / "a"), **TINY),
                     clock=FakeClock())
    epochs = budgeted.epochs_completed
    plain = train(TrainConfig(data=str(data), strategy=strategy, epochs=epochs, out=str(tmp_path / "b"), **TINY))
    assert epochs >= 3
    phases = {"full": ["full"], "gradual": ["head", "full"]}[strategy]
    assert list(_report(budgeted.run_dir)["budget"]["seconds_per_step_by_phase"]) == phases
    for row, same in zip(budgeted.history, plain.history, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            # Same process, same threads, same batches: the arithmetic is identical, not just close.
            assert row[key] == same[key], key
    for name, value in budgeted.model.state_dict().items():
        assert torch.equal(value, plain.model.state_dict()[name]), name


def test_the_run_stops_with_the_best_model_when_time_is_up(data, tmp_path):
    clock = FakeClock(tick=0.01)  # the probe measures 0.01 s steps and plans many epochs...
    config = TrainConfig(data=str(data), strategy="linear-probe", budget="60", out=str(tmp_path / "run"), **TINY)
    result = train(config, clock=clock, reporter=SlowEpochs(clock, 15.0))  # ...but each batch takes 15 s
    report = _report(result.run_dir)
    # Epoch 1 took 45 s; another 45 s would end at ~90 s, past 60 s + 10 %: stop after it, normally.
    assert report["budget"]["epochs"] > 2 and report["epochs_planned"] == report["budget"]["epochs"]
    assert result.epochs_completed == 1 and report["epochs_completed"] == 1 and report["budget"]["stopped_for_time"]
    assert report["budget"]["spent_seconds"] >= 45.0
    assert (result.run_dir / "best.safetensors").is_file() and report["best_epoch"] == 1
    assert result.metrics["accuracy"] == report["final"]["accuracy"]
    # A run that stopped for time is finished: resuming it trains nothing more...
    again = resume(result.run_dir, clock=clock)
    assert again.epochs_completed == 1
    # ...unless --epochs replaces the budget's choice.
    extended = resume(result.run_dir, overrides={"epochs": 2}, clock=clock)
    assert extended.epochs_completed == 2
    report = _report(result.run_dir)
    assert report["budget"]["replaced_by_epochs"] == 2
    assert torch.load(result.run_dir / "last.ckpt", weights_only=True)["config"]["budget"] is None


class InterruptAfterFirstEpoch(SlowEpochs):
    def end_epoch(self, row: dict) -> None:
        raise KeyboardInterrupt


def test_a_resumed_budgeted_run_keeps_its_epochs_and_counts_the_time_already_spent(data, tmp_path):
    clock = FakeClock(tick=1.0)
    config = TrainConfig(data=str(data), strategy="linear-probe", budget="40s", out=str(tmp_path / "run"), **TINY)
    with pytest.raises(TrainingInterrupted):
        train(config, clock=clock, reporter=InterruptAfterFirstEpoch(clock, 0.0))
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    planned, spent = saved["budget"]["epochs"], saved["budget"]["spent_seconds"]
    assert planned > 2 and spent > 0
    result = resume(tmp_path / "run", clock=clock)
    budget = _report(result.run_dir)["budget"]
    assert result.epochs_completed == planned and budget["epochs"] == planned
    assert budget["spent_seconds"] > spent  # the time before the interruption still counts


def test_the_time_spent_before_a_resume_counts_against_the_budget(data, tmp_path):
    clock = FakeClock(tick=1.0)
    config = TrainConfig(data=str(data), strategy="linear-probe", budget="40s", out=str(tmp_path / "run"), **TINY)
    with pytest.raises(TrainingInterrupted):
        train(config, clock=clock, reporter=InterruptAfterFirstEpoch(clock, 0.0))
    # After the interruption, a resumed epoch that takes 3 x 10 s leaves no room for another.
    result = resume(tmp_path / "run", clock=clock, reporter=SlowEpochs(clock, 10.0))
    budget = _report(result.run_dir)["budget"]
    assert result.epochs_completed == 2 < budget["epochs"] and budget["stopped_for_time"]


# -- the command line --------------------------------------------------------------------------


def test_budget_with_epochs_is_a_one_line_error(data, tmp_path, capsys):
    status = main(["train", "--data", str(data), *TINY_FLAGS, "--budget", "3m", "--epochs", "3",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "--budget" in err and "--epochs 3" not in err and "--epochs" in err
    assert not (tmp_path / "run").exists()


def test_budget_with_epochs_in_the_config_file_is_refused_too(data, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("epochs: 4\n")
    status = main(["train", "--config", str(config_file), "--data", str(data), *TINY_FLAGS, "--budget", "90s",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--budget" in err and f"'epochs' in {config_file}" in err


def test_a_wrong_budget_flag_exits_2_with_one_line(data, tmp_path, capsys):
    status = main(["train", "--data", str(data), *TINY_FLAGS, "--budget", "3 fortnights", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "'3 fortnights'" in err
    assert not (tmp_path / "run").exists()


def test_the_train_help_shows_the_budget_flag(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["train", "--help"])
    assert exit_status.value.code == 0 and "--budget TIME" in capsys.readouterr().out


def test_the_command_counts_from_when_its_process_started():
    started = process_started()
    assert started <= time.monotonic()  # this test process started before now, not after


def test_the_command_prints_what_the_budget_chose(data, tmp_path, capsys):
    status = main(["train", "--data", str(data), *[flag for flag in TINY_FLAGS if flag != "--quiet"],
                   "--strategy", "linear-probe", "--budget", "1s", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0
    # Whatever the (real) clock measured, the plan is printed once with its reason.
    assert captured.err.count("time budget 1s: ") == 1 and "s per epoch" in captured.err
    assert "time budget" not in captured.out

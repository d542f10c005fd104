"""The pieces of the training engine: schedule, sampler, seeded augmentation, losses, devices, loop."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from visiontune.device import Precision, default_workers, resolve_precision
from visiontune.training.loops import compute_loss, set_train_mode
from visiontune.training.schedule import Schedule, build_schedule
from visiontune.training.samplers import EpochSampler, SeededSamples
from visiontune.training.setup import build_loss
from visiontune.config import config_from_dict


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    schedule = Schedule(total_steps=10, warmup_steps=4)
    factors = [schedule.factor(step) for step in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert schedule.factor(10) == pytest.approx(0.0)
    assert Schedule(total_steps=4).factor(2) == pytest.approx(0.5)


def test_warmup_is_capped_at_half_the_phase():
    assert build_schedule(steps_per_epoch=3, epochs=2, warmup_epochs=5).warmup_steps == 3
    assert build_schedule(steps_per_epoch=10, epochs=4, warmup_epochs=0.5).warmup_steps == 5


def test_epoch_order_depends_only_on_seed_and_epoch():
    sampler = EpochSampler(10, seed=7)
    sampler.set_epoch(2)
    first = list(sampler)
    torch.manual_seed(123)  # the process's RNG must not matter
    again = EpochSampler(10, seed=7)
    again.set_epoch(2)
    assert list(again) == first
    assert sorted(index for index, _ in first) == list(range(10))
    sampler.set_epoch(3)
    assert list(sampler) != first


def test_seeded_samples_repeat_augmentation_and_leave_the_global_rng_alone():
    class RandomItems(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(3), random.random()

    dataset = SeededSamples(RandomItems())
    torch.manual_seed(0)
    random.seed(0)
    expected_torch, expected_python = torch.rand(1), random.random()
    torch.manual_seed(0)
    random.seed(0)
    first = dataset[(1, 99)]
    assert (torch.rand(1), random.random()) == (expected_torch, expected_python)
    second = dataset[(1, 99)]
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert not torch.equal(dataset[(1, 100)][0], first[0])


def test_balance_weights_classes_by_inverse_frequency():
    config = config_from_dict({"data": "x", "model": "m", "balance": True})
    loss = build_loss(config, [0, 0, 0, 1], num_classes=2)
    assert loss.weight.tolist() == pytest.approx([4 / 6, 2.0])
    assert build_loss(config_from_dict({"data": "x", "model": "m"}), [0, 1], 2).weight is None


def test_auxiliary_classifiers_add_their_weighted_losses():
    from torchvision.models import GoogLeNetOutputs
    from torchvision.models.inception import InceptionOutputs

    targets = torch.tensor([0, 1])
    main, aux1, aux2 = torch.randn(2, 2), torch.randn(2, 2), torch.randn(2, 2)
    ce = nn.CrossEntropyLoss()
    googlenet = compute_loss(GoogLeNetOutputs(main, aux2, aux1), targets, ce)
    assert googlenet == pytest.approx(ce(main, targets) + 0.3 * (ce(aux1, targets) + ce(aux2, targets)))
    inception = compute_loss(InceptionOutputs(main, aux1), targets, ce)
    assert inception == pytest.approx(ce(main, targets) + 0.4 * ce(aux1, targets))
    assert compute_loss(InceptionOutputs(main, None), targets, ce) == pytest.approx(ce(main, targets))


def test_train_mode_keeps_frozen_batchnorm_in_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    for parameter in model[1].parameters():
        parameter.requires_grad = False
    set_train_mode(model)
    assert model.training and not model[1].training and model[3].training


def test_cpu_precision_is_fp32_unless_the_cpu_has_native_bf16(monkeypatch):
    import visiontune.device as device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(cpu).dtype is None
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(cpu).dtype is torch.bfloat16
    assert resolve_precision(cpu, "fp32") == Precision(None)


def test_default_workers_leave_a_core_for_training():
    assert [default_workers(n) for n in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert [default_workers(n, torch.device("cuda")) for n in (1, 2, 8)] == [0, 1, 4]


def test_cpu_training_gets_no_worker_on_small_machines():
    # The step's threads use every core there: a worker process would stall them.
    cpu = torch.device("cpu")
    assert [default_workers(n, cpu) for n in (1, 2, 3, 4, 8, 64)] == [0, 0, 0, 1, 3, 4]


@pytest.mark.slow
def test_patience_stops_a_run_that_no_longer_improves(tmp_path):
    import csv
    import json

    from conftest import make_image_folder
    from visiontune.training.engine import train

    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    # A learning rate this small leaves the predictions, hence the accuracy, unchanged: epoch 2
    # does not improve on epoch 1, so patience 1 stops there.
    config = config_from_dict({"data": str(data), "model": "timm:test_resnet", "weights": "none",
                               "strategy": "linear-probe", "epochs": 5, "patience": 1, "lr": 1e-12,
                               "image_size": 32, "batch_size": 8, "workers": 0, "device": "cpu",
                               "out": str(tmp_path / "run")})
    result = train(config)
    assert (result.epochs_completed, result.stopped_early, result.best_epoch) == (2, True, 1)
    assert len(list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))) == 2
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stopped_early"] is True and report["epochs_planned"] == 5


def test_tensorboard_scalars_are_written_when_the_package_is_there(tmp_path, monkeypatch):
    import sys
    import types

    from visiontune.training.final_artifacts import TensorBoardLog

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = TensorBoardLog(tmp_path)
    log.add_row({"epoch": 2, "phase": "full", "train_loss": 0.5, "val_acc": 0.75, "val_top5": None})
    log.close()
    assert written == [("dir", str(tmp_path / "tensorboard")), ("train/loss", 0.5, 2), ("val/acc", 0.75, 2), ("closed",)]


def test_interrupt_message_points_to_resume_only_when_there_is_a_checkpoint(tmp_path):
    from visiontune.commands.train import interrupted_message

    assert "nothing to resume" in interrupted_message(str(tmp_path))
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert f"--resume {tmp_path}" in interrupted_message(str(tmp_path))


@pytest.mark.slow
def test_train_leaves_the_callers_config_as_it_was(tmp_path, monkeypatch):
    import copy

    from conftest import make_image_folder
    from visiontune.training.engine import train

    make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    monkeypatch.chdir(tmp_path)
    # A relative data path, no --out and --lr auto: each used to be rewritten on the caller's object.
    config = config_from_dict({"data": "data", "model": "timm:test_resnet", "weights": "none",
                               "strategy": "linear-probe", "epochs": 1, "lr": "auto", "image_size": 32,
                               "batch_size": 4, "workers": 0, "device": "cpu"})
    before = copy.deepcopy(config)
    result = train(config)
    assert config == before and config.out is None and config.lr == "auto" and config.data == "data"
    assert (tmp_path / result.run_dir).parent == tmp_path / "runs"  # the default folder, in the working directory
    saved = (result.run_dir / "config.yaml").read_text()
    assert str(tmp_path / "data") in saved and "lr: auto" not in saved  # the run itself saved the resolved copy


@pytest.mark.slow
def test_an_interrupt_names_the_default_run_folder_to_resume(tmp_path, monkeypatch, capsys):
    from conftest import make_image_folder
    from visiontune.cli import main
    from visiontune.commands.train import ConsoleReporter

    make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    monkeypatch.chdir(tmp_path)
    ends = []

    def interrupt_after_epoch_1(self, row):
        ends.append(row)
        raise KeyboardInterrupt

    monkeypatch.setattr(ConsoleReporter, "end_epoch", interrupt_after_epoch_1)
    # No --out: train() chooses runs/<model>-<time> on its own copy of the config, and says which.
    assert main(["train", "--data", "data", "--model", "timm:test_resnet", "--weights", "none", "--image-size", "32",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "2", "--quiet"]) == 130
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(ends) == 1 and (run_dir / "last.ckpt").is_file()
    assert f"--resume runs/{run_dir.name}" in capsys.readouterr().err

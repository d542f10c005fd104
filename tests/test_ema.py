"""``--ema DECAY``: the weight average, its place in the loop, the best checkpoint and last.ckpt."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_image_folder
from visiontune import load_run
from visiontune.cli import main
from visiontune.model.create import create_model
from visiontune.model.anatomy import anatomy_of, owns
from visiontune.run.inference import evaluate_run
from visiontune.training import engine
from visiontune.training.ema import WeightAverage, make_weight_average
from visiontune.training.state import ResumePoint, TrainingState

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet"]


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_average_follows_the_ema_formula_for_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = WeightAverage(model, decay=0.75)
    ema.update()  # the first update copies the model
    old = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model(torch.randn(8, 4))  # train mode: moves the BN running statistics
    ema.update()
    averaged = ema.model.state_dict()
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        expected = 0.75 * old[name] + 0.25 * model.state_dict()[name]
        # One float32 lerp against the same sum written out: a few ulps of values of size ~1.
        torch.testing.assert_close(averaged[name], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(averaged["1.running_mean"], model.state_dict()["1.running_mean"])  # averaged, not copied
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert make_weight_average(model, 0.0) is None


def test_averaging_only_the_trained_head_gives_the_full_averages_numbers():
    """follow(head): the frozen backbone would be averaged with itself, so skipping it changes nothing."""
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", num_classes=3, weights=None)
    anatomy = anatomy_of(model)
    head = anatomy.head_module(model)
    whole, part = WeightAverage(model, 0.9), WeightAverage(model, 0.9)
    part.follow(head, anatomy)
    for step in range(3):
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.add_(torch.randn_like(parameter))
        whole.update()
        part.update()
    assert int(part.averaged.n_averaged) == int(whole.averaged.n_averaged) == 3
    expected = whole.state_dict()
    for name, value in part.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with pytest.raises(ValueError, match="whole model"):
        part.follow(nn.Linear(2, 2), anatomy)


def test_the_state_round_trips_and_an_older_checkpoint_without_ema_entries_still_loads():
    resume = ResumePoint(config={}, model={}, optimizer={}, rng={})
    checkpoint = TrainingState(best_weights="ema").to_checkpoint(resume)
    assert "ema" not in checkpoint and "scaler" not in checkpoint  # absent, not None, when off
    state, _ = TrainingState.from_checkpoint(checkpoint, "last.ckpt")
    assert state.best_weights == "ema"
    del checkpoint["best_weights"]  # a run written before --ema existed
    state, point = TrainingState.from_checkpoint(checkpoint, "last.ckpt")
    assert state.best_weights == "model" and point.ema is None


@pytest.mark.parametrize("ema_accuracy, kept", [(2.0, "ema"), (-0.5, "model")])
def test_best_weights_hold_whichever_validated_better(tmp_path, monkeypatch, ema_accuracy, kept):
    """The EMA's accuracy is forced above (2.0) or below (-0.5) any real one, so the choice is known."""
    real = engine._evaluate_average

    def forced(ema, setup, inputs):
        evaluation = real(ema, setup, inputs)
        evaluation.metrics["accuracy"] = ema_accuracy
        return evaluation

    monkeypatch.setattr(engine, "_evaluate_average", forced)
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--ema", "0.5", "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["best_weights"] == kept and report["ema_decay"] == 0.5
    last = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert last["best_weights"] == kept
    source = {name.removeprefix("module."): value for name, value in last["ema"].items()} if kept == "ema" \
        else last["model"]
    best = load_file(run_dir / "best.safetensors")
    assert best.keys() <= source.keys()
    for name, value in best.items():
        assert torch.equal(value, source[name]), name
    if kept == "ema":  # the EMA and the model differ after a step, so the choice is visible in the file
        assert any(not torch.equal(value, last["model"][name]) for name, value in best.items())
    assert float(_rows(run_dir)[0]["val_acc_ema"]) == ema_accuracy


def test_under_a_feature_cached_head_phase_the_average_covers_the_whole_model(tmp_path):
    """linear-probe with a deterministic transform trains the head alone on cached features: the
    average's frozen backbone must stay the model's exactly, its head must average, and the
    val_acc_ema measured on cached features must be the averaged weights' accuracy on the images."""
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--strategy", "linear-probe", "--augment", "none",
                 "--epochs", "2", "--lr", "0.01", "--ema", "0.5", "--out", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["feature_cache"]["head"]["mode"] != "off", report["feature_cache"]
    last = torch.load(run_dir / "last.ckpt", weights_only=True)
    averaged = {name.removeprefix("module."): value for name, value in last["ema"].items() if name != "n_averaged"}
    assert int(last["ema"]["n_averaged"]) == last["step"]  # one update per optimiser step
    run = load_run(run_dir, checkpoint="last")
    head = anatomy_of(run.model).head
    changed = [name for name, value in averaged.items() if not torch.equal(value, last["model"][name])]
    assert changed and all(owns(head, name) for name in changed), changed  # only the head differs
    run.model.load_state_dict(averaged)
    measured = evaluate_run(run, data).metrics["accuracy"]
    assert measured == pytest.approx(float(_rows(run_dir)[-1]["val_acc_ema"]), abs=1e-6)  # the CSV keeps 6 digits


def test_ema_out_of_range_is_a_one_line_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    assert main(["train", "--data", str(data), *TINY, "--ema", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "ema" in err and len(err.strip().splitlines()) == 1

"""`visiontune train` end to end on a tiny generated image folder (resnet18, weights=None, 32 px)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.run.folder import finished_run_files
from visiontune.run.loaded import load_run

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--seed", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 2-epoch gradual run through the CLI, shared by the checks below."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", per_class=8, val_per_class=3)
    run_dir = root / "run"
    status = main(["train", "--data", str(data), *TINY, "--strategy", "gradual", "--epochs", "2",
                   "--lr", "0.001", "--label-smoothing", "0.1", "--out", str(run_dir)])
    assert status == 0
    return data, run_dir


@pytest.mark.slow
def test_every_file_of_the_run_folder_is_there_and_sane(finished_run):
    data, run_dir = finished_run
    for name in finished_run_files("single"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / "classes.json").read_text()) == ["blue", "green", "red"]
    assert json.loads((run_dir / "preprocessing.json").read_text())["crop_size"] == 32
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"] and [row["phase"] for row in rows] == ["head", "full"]
    assert all(0.0 <= float(row["val_acc"]) <= 1.0 and float(row["train_loss"]) > 0 for row in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_completed"] == 2 and report["bad_files"] == []
    assert report["final"]["num_images"] == 9 and len(report["final"]["confusion"]) == 3
    assert set(report["final"]["per_class"]) == {"blue", "green", "red"}
    assert report["best_val_accuracy"] == pytest.approx(max(float(row["val_acc"]) for row in rows), abs=1e-6)
    predictions = list(csv.DictReader(open(run_dir / "val_predictions.csv")))
    assert len(predictions) == 9 and set(predictions[0]) == {"path", "label", "predicted", "confidence", "loss"}
    accuracy = sum(row["label"] == row["predicted"] for row in predictions) / len(predictions)
    assert accuracy == pytest.approx(report["final"]["accuracy"])
    state = torch.load(run_dir / "last.ckpt", weights_only=True)  # plain tensors and values only
    assert state["epoch"] == 2 and state["phase"] == 1 and {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["config"]["strategy"] == "gradual"
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_load_run_gives_the_best_model_in_eval_mode(finished_run):
    data, run_dir = finished_run
    loaded = load_run(run_dir)
    assert not loaded.model.training and loaded.classes == ["blue", "green", "red"]
    assert loaded.config.strategy == "gradual" and loaded.preprocessing.crop_size == 32
    last = load_run(run_dir, checkpoint="last")
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(value, state[key]) for key, value in last.model.state_dict().items())


@pytest.mark.slow
def test_an_existing_run_folder_is_refused_without_overwrite(finished_run, capsys):
    data, run_dir = finished_run
    before = (run_dir / "best.safetensors").read_bytes()
    status = main(["train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "best.safetensors").read_bytes() == before


def test_resume_refuses_changing_the_recipe(finished_run, capsys):
    data, run_dir = finished_run
    assert main(["train", "--resume", str(run_dir), "--lr", "0.1"]) == 2
    assert "saved configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_more(finished_run, capsys):
    data, run_dir = finished_run
    before = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    after = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert len(list(csv.DictReader(open(run_dir / "metrics.csv")))) == 2


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_config_file_gives_defaults(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("model: an-earlier-run\n")  # a run folder: --overwrite may replace it
    (run_dir / "notes.txt").write_text("mine")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(f"data: {data}\nstrategy: linear-probe\nepochs: 3\nlr: 0.01\n")
    status = main(["train", "--config", str(config_file), *TINY, "--epochs", "1", "--out", str(run_dir), "--overwrite"])
    assert status == 0
    saved = (run_dir / "config.yaml").read_text()
    assert "strategy: linear-probe" in saved and "epochs: 1" in saved and "lr: 0.01" in saved
    assert (run_dir / "notes.txt").read_text() == "mine"  # only visiontune's own files are replaced
    out = capsys.readouterr().out
    assert "run folder:" in out


def test_missing_data_folder_exits_2(tmp_path, capsys):
    status = main(["train", "--data", str(tmp_path / "nope"), *TINY, "--out", str(tmp_path / "run")])
    assert status == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_a_weights_file_is_loaded_and_its_report_kept(tmp_path):
    from visiontune.checkpoint import save_weights
    from visiontune.model.create import create_model

    torch.manual_seed(1)
    pretrained = create_model("timm:test_resnet", num_classes=7, weights=None)  # another head size
    weights = save_weights(pretrained, tmp_path / "pretrained.safetensors")
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    options = [option if option != "none" else str(weights) for option in TINY]
    status = main(["train", "--data", str(data), *options, "--strategy", "linear-probe", "--epochs", "1",
                   "--out", str(run_dir)])
    assert status == 0
    report = json.loads((run_dir / "report.json").read_text())["weights_load_report"]
    assert "pretrained.safetensors" in report["source"] and len(report["loaded"]) > 10
    assert all(key.startswith("fc.") for key in report["mismatched"])  # the head is new
    # linear-probe: everything but the head still holds the file's weights
    trained = load_run(run_dir, checkpoint="last").model.state_dict()
    assert torch.equal(trained["conv1.0.weight"], pretrained.state_dict()["conv1.0.weight"])

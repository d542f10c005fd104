"""Multi-label runs end to end on digit mosaics: every strategy, the run folder's files, predict /
evaluate / export agreeing with the run's own validation, --val-data and exact resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from visiontune.cli import main
from visiontune.commands.train import ConsoleReporter
from visiontune.data import build_eval_transform, load_image
from visiontune.demo import write_digit_mosaics
from visiontune.run.loaded import load_run

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "24", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--quiet", "--lr", "0.003"]


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    return write_digit_mosaics(tmp_path_factory.mktemp("mosaics"), count=40, image_size=24, digits=4, seed=0)


@pytest.fixture(scope="module")
def trained(mosaics, tmp_path_factory):
    """One gradual run with mixup, --balance and label smoothing, the options that touch the loss."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(mosaics), *TINY, "--epochs", "2", "--strategy", "gradual", "--mixup", "0.2",
                 "--balance", "--label-smoothing", "0.1", "--out", str(run)]) == 0
    return run


def test_run_folder_of_a_multilabel_run(trained):
    report = json.loads((trained / "report.json").read_text())
    assert report["task"] == "multilabel" and report["selection_metric"] == "mAP"
    assert report["data"]["stratification"] == "iterative"
    final = report["final"]
    assert set(final) >= {"mAP", "micro_f1", "macro_f1", "per_class", "thresholds"}
    assert set(final["per_class"]["0"]) == {"ap", "precision", "recall", "f1", "threshold", "support"}
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    # best.safetensors is the epoch of the highest validation mAP
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["val_map"]), -i))
    assert report["best_epoch"] == best + 1 and report["best_val_accuracy"] == pytest.approx(float(rows[best]["val_map"]),
                                                                                             rel=1e-5)
    thresholds = json.loads((trained / "thresholds.json").read_text())
    assert thresholds["thresholds"] == dict(zip(report["classes"], final["thresholds"]))
    for name in ("average_precision.png", "pr_curves.png", "report.html", "val_predictions.csv"):
        assert (trained / name).is_file()
    assert "task: multilabel" in (trained / "config.yaml").read_text()


@pytest.mark.slow  # the ONNX export and onnxruntime take most of its ~9 s
def test_predict_evaluate_and_export_agree_with_validation(trained, mosaics, tmp_path, capsys):
    report = json.loads((trained / "report.json").read_text())
    val_files = report["data"]["val_files"]
    labels = {line.split(",")[0]: line.split(",")[1] for line in mosaics.read_text().splitlines()[1:]}
    val_manifest = mosaics.parent / "val_only.csv"
    val_manifest.write_text("path,labels\n" + "".join(f"{name},{labels[name]}\n" for name in val_files))
    assert main(["evaluate", "--run", str(trained), "--data", str(val_manifest), "--device", "cpu", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # The same images and weights in float32: the same ranking, so the same AP; the thresholds are
    # the run's, tuned on these images, so the same F1. 1e-6 covers float32 rounding of the scores.
    assert evaluated["mAP"] == pytest.approx(report["final"]["mAP"], abs=1e-6)
    assert evaluated["macro_f1"] == pytest.approx(report["final"]["macro_f1"], abs=1e-6)
    assert set(evaluated) >= {"mAP", "micro_f1", "macro_f1", "per_class"}

    paths = [str(mosaics.parent / name) for name in val_files[:4]]
    assert main(["predict", "--run", str(trained), *paths, "--device", "cpu", "--json", "--top-k", "4"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    run = load_run(trained)
    for prediction in predictions:
        scores = {entry["label"]: entry["score"] for entry in prediction["top_k"]}
        expected = [name for name, cut in zip(run.classes, run.thresholds) if scores[name] >= cut]
        assert sorted(prediction["labels"]) == sorted(expected)

    onnxruntime = pytest.importorskip("onnxruntime")  # the [export] extra
    exported = tmp_path / "model.onnx"
    assert main(["export", "--run", str(trained), "--out", str(exported)]) == 0
    capsys.readouterr()
    metadata = json.loads(exported.with_name("model.onnx.json").read_text())
    assert metadata["task"] == "multilabel" and list(metadata["thresholds"]) == run.classes
    images = torch.stack([build_eval_transform(run.preprocessing)(load_image(path)) for path in paths])
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    for row, prediction in zip(probabilities, predictions):
        for entry in prediction["top_k"]:
            # float32 in both; the ONNX graph may fuse ops differently: 1e-5 on values in [0, 1]
            assert row[run.classes.index(entry["label"])] == pytest.approx(entry["score"], abs=1e-5)
    assert np.all((probabilities >= 0) & (probabilities <= 1))  # sigmoid outputs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["linear-probe", "partial", "full"])
def test_each_strategy_trains_a_multilabel_run(mosaics, tmp_path, strategy):
    run = tmp_path / "run"
    extra = ["--cutmix", "1.0"] if strategy == "full" else []
    assert main(["train", "--data", str(mosaics), *TINY, "--epochs", "1", "--strategy", strategy, *extra,
                 "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "multilabel" and 0.0 <= report["final"]["mAP"] <= 1.0
    if strategy == "linear-probe":
        assert report["feature_cache"]  # the head trained on cached features, labels as bit masks


def test_val_data_gives_the_validation_images(mosaics, tmp_path, capsys):
    other = write_digit_mosaics(tmp_path / "val", count=10, image_size=24, digits=4, seed=5)
    run = tmp_path / "run"
    assert main(["train", "--data", str(mosaics), "--val-data", str(other), *TINY, "--epochs", "1",
                 "--strategy", "linear-probe", "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["val_data"] == str(other) and report["final"]["num_images"] == 10
    capsys.readouterr()
    assert main(["train", "--data", str(mosaics), "--task", "multilabel", "--val-data", str(tmp_path), *TINY,
                 "--out", str(tmp_path / "refused")]) == 2
    assert "validates on a CSV" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_multilabel_run_resumes_to_the_straight_runs_weights(mosaics, tmp_path, monkeypatch):
    recipe = [*TINY, "--epochs", "2", "--mixup", "0.2", "--seed", "1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "--data", str(mosaics), *recipe, "--out", str(straight)]) == 0
    original_start = ConsoleReporter.start_epoch

    def remember_epoch(self, epoch, epochs, num_batches, phase):
        self.epoch_number = epoch
        original_start(self, epoch, epochs, num_batches, phase)

    def interrupt_in_epoch_2(self, images):
        if self.epoch_number == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ConsoleReporter, "start_epoch", remember_epoch)
        patch.setattr(ConsoleReporter, "advance", interrupt_in_epoch_2)
        assert main(["train", "--data", str(mosaics), *recipe, "--out", str(interrupted)]) == 130
    assert main(["train", "--resume", str(interrupted)]) == 0
    expected = torch.load(straight / "last.ckpt", weights_only=True)["model"]
    resumed = torch.load(interrupted / "last.ckpt", weights_only=True)["model"]
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key
    assert json.loads((interrupted / "thresholds.json").read_text()) == json.loads(
        (straight / "thresholds.json").read_text())

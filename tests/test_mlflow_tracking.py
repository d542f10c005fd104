"""``--track mlflow`` (issue 17): params, per-epoch metrics, run files and the model, one run across a resume."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.commands.train import ConsoleReporter
from visiontune.training.tracking import MLFLOW_RUN_FILE

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "2", "--track", "mlflow"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local MLflow file store in tmp_path/mlruns (MLflow 3 allows it on request)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: no database to create (seconds)
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_a_tracked_run_interrupted_and_resumed_is_one_mlflow_run_with_params_metrics_and_artifacts(
        tmp_path, store, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=16)
    run_dir = tmp_path / "run"
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
        assert main(["train", "--data", str(data), *TINY, "--out", str(run_dir)]) == 130
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    assert store.get_run(run_id).info.status == "KILLED"
    assert main(["train", "--resume", str(run_dir)]) == 0

    assert json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == run_id
    experiment = store.get_experiment_by_name("visiontune")
    assert [run.info.run_id for run in store.search_runs([experiment.experiment_id])] == [run_id]
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "timm:test_resnet" and run.data.params["epochs"] == "2"
    history = store.get_metric_history(run_id, "val_acc")
    assert [metric.step for metric in history] == [1, 2]  # epoch 1 before the interruption, 2 after the resume
    assert {"train_loss", "val_loss", "lr", "val_macro_f1"} <= set(run.data.metrics)
    logged = {artifact.path for artifact in store.list_artifacts(run_id)}
    assert {"best.safetensors", "report.html", "report.json", "curves.png", "confusion.png", "metrics.csv",
            "config.yaml"} <= logged
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert [model.source_run_id for model in models] == [run_id]  # the best model, as an MLflow PyTorch model


def test_without_track_nothing_is_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", per_class=3, val_per_class=1, size=16)
    argv = ["train", "--data", str(data), *TINY[:-2], "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert not (tmp_path / "run" / MLFLOW_RUN_FILE).exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()

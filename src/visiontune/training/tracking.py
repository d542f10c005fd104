"""Experiment tracking (``--track mlflow``): the run's parameters, per-epoch metrics, files and model.

The engine calls three functions of the tracker and nothing else: :meth:`log_epoch` after every
epoch's row, :meth:`finish` once the run folder is complete, :meth:`close` on the way out. Only
the main process tracks; every other process (and ``--track none``) gets :class:`NoTracking`.

MLflow: the store is ``MLFLOW_TRACKING_URI`` when set, else MLflow's own local default in the
current folder (MLflow 3: ``mlflow.db`` with artifacts under ``mlruns/``; MLflow 3 refuses the
older plain ``mlruns/`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``), which ``mlflow ui``
started in the same folder opens. The MLflow run id is kept in ``RUN/mlflow_run.json``, so a
resumed run continues the same MLflow run rather than starting a second one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from visiontune.atomic_io import write_text_atomically
from visiontune.config import TrainConfig
from visiontune.distributed import is_main_process
from visiontune.errors import ConfigError
from visiontune.run.files import run_file
from visiontune.run.folder import (BEST_WEIGHTS, CLASSES_FILE, CONFIG_FILE, CONFUSION_FILE, CURVES_FILE,
                                   METRICS_FILE, PREPROCESSING_FILE, REPORT_FILE, REPORT_HTML, VAL_PREDICTIONS_FILE)

log = logging.getLogger(__name__)

MLFLOW_RUN_FILE = "mlflow_run.json"
EXPERIMENT = "visiontune"  # default experiment name; MLFLOW_EXPERIMENT_NAME chooses another
LOGGED_FILES = (CONFIG_FILE, CLASSES_FILE, PREPROCESSING_FILE, METRICS_FILE, REPORT_FILE, VAL_PREDICTIONS_FILE,
                CURVES_FILE, CONFUSION_FILE, REPORT_HTML, BEST_WEIGHTS)
_MLFLOW_EXTRA = "pip install 'visiontune[mlflow]'"
_PARAM_CHARS = 500  # MLflow's smallest limit on a parameter value across its versions


class NoTracking:
    """``--track none`` and every process but the main one."""

    def log_epoch(self, row: dict) -> None:
        pass

    def finish(self, run_dir: Path, model: nn.Module) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def start_tracking(config: TrainConfig, run_dir: Path, *, resumed: bool):
    """The run's tracker: a new MLflow run, the one ``RUN/mlflow_run.json`` names when ``resumed``."""
    kind = getattr(config, "track", "none") or "none"
    if kind == "none" or not is_main_process():
        return NoTracking()
    return MlflowTracking.start(config, run_dir, resumed=resumed)


def _mlflow():
    try:
        import mlflow  # noqa: PLC0415 - optional extra, imported where it is needed
        from mlflow.tracking import MlflowClient  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"--track mlflow needs the mlflow package: {_MLFLOW_EXTRA}") from None
    return mlflow, MlflowClient


class MlflowTracking:
    """One MLflow run, written through ``MlflowClient`` (no global active run is left behind)."""

    def __init__(self, client, run_id: str, tracking_uri: str):
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri

    @classmethod
    def start(cls, config: TrainConfig, run_dir: Path, *, resumed: bool) -> MlflowTracking:
        mlflow, client_type = _mlflow()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        client = client_type(tracking_uri=uri)
        saved = _read_run_file(run_dir) if resumed else None
        try:
            if saved is not None:
                client.update_run(saved["run_id"], status="RUNNING")
                log.info("MLflow: continuing run %s in %s", saved["run_id"], uri)
                return cls(client, saved["run_id"], uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=run_dir.name, tags={"visiontune.run_dir": str(run_dir)})
            params = [mlflow.entities.Param(key, str(value)[:_PARAM_CHARS]) for key, value in config.to_dict().items()]
            client.log_batch(run.info.run_id, params=params)
        except mlflow.exceptions.MlflowException as error:
            raise ConfigError(f"--track mlflow: the tracking store {uri} refused the run "
                              f"({str(error).splitlines()[0][:300]}); set MLFLOW_TRACKING_URI to a store you can "
                              "write (e.g. sqlite:///mlflow.db)") from None
        write_text_atomically(run_file(run_dir, MLFLOW_RUN_FILE),
                              json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}) + "\n")
        log.info("MLflow: run %s in %s", run.info.run_id, uri)
        return cls(client, run.info.run_id, uri)

    def log_epoch(self, row: dict) -> None:
        mlflow, _ = _mlflow()
        metrics = [mlflow.entities.Metric(key, float(value), 0, int(row["epoch"]))
                   for key, value in row.items() if key != "epoch" and isinstance(value, (int, float))]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, model: nn.Module) -> None:
        """The run folder's files (curves, confusion, report.html, best weights, ...) and the model."""
        for name in LOGGED_FILES:
            path = run_file(run_dir, name)
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self._log_model(model)

    def _log_model(self, model: nn.Module) -> None:
        """The best model as an MLflow PyTorch model (``mlflow.pytorch.load_model`` gives it back)."""
        mlflow, _ = _mlflow()
        import mlflow.pytorch  # noqa: PLC0415 - a submodule of the optional extra

        training = model.training
        model.eval()
        try:
            with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                         pip_requirements=["torch", "timm", "visiontune"])
        except Exception as error:  # noqa: BLE001 - the run's files are logged; the model flavour is extra
            log.warning("MLflow: could not log the model (%s); best.safetensors is logged as a file",
                        str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        finally:
            model.train(training)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _read_run_file(run_dir: Path) -> dict | None:
    path = run_file(run_dir, MLFLOW_RUN_FILE)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}); delete it to log the resumed epochs to a new MLflow run") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("run_id"), str):
        raise ConfigError(f"{path} holds no MLflow run id; delete it to log the resumed epochs to a new MLflow run")
    return saved

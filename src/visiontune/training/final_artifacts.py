"""What a run writes when it ends: the best model's validation predictions, report.json, plots,
and (during training) TensorBoard scalars when the ``tensorboard`` package is installed."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from visiontune.checkpoint import load_weights
from visiontune.device import EVAL_PRECISION
from visiontune.distributed import is_main_process
from visiontune.errors import CheckpointError
from visiontune.metrics_multilabel import precision_recall_curves
from visiontune.training.loops import evaluate
from visiontune.run.plots import plot_average_precision, plot_confusion, plot_curves, plot_pr_curves
from visiontune.run.loaded import LoadedRun
from visiontune.run.report_html import write_report
from visiontune.run.folder import (AP_FILE, BEST_WEIGHTS, CONFUSION_FILE, CURVES_FILE, PR_CURVES_FILE, REPORT_FILE,
                                   TENSORBOARD_DIR, THRESHOLDS_FILE, write_json, write_metrics_csv,
                                   write_val_predictions)
from visiontune.run.files import run_file, run_subfolder
from visiontune.training.strategies import describe_groups
from visiontune.training.setup import TrainingSetup
from visiontune.training.state import TrainingState

log = logging.getLogger(__name__)


class TensorBoardLog:
    """Per-epoch scalars under RUN/tensorboard/, or nothing when tensorboard is not installed."""

    def __init__(self, run_dir: Path):
        self.writer = None
        if not is_main_process():
            return
        # SummaryWriter opens its events file itself, not atomically: a symlinked tensorboard/ is refused
        log_dir = run_subfolder(run_dir, TENSORBOARD_DIR)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: pip install visiontune[tensorboard]
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add_row(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def load_best_weights(setup: TrainingSetup, run_dir: Path) -> None:
    """Load best.safetensors into the model through load_weights, so that a damaged file (cut
    short, a lying header, NaN, another model's tensors) is a one-line CheckpointError naming it."""
    path = run_file(run_dir, BEST_WEIGHTS)
    if not path.is_file():
        return
    report = load_weights(setup.model, path, match="name")
    if not report.complete or report.unexpected:
        raise CheckpointError(f"{path} does not fit the run's model ({len(report.missing)} missing, "
                              f"{len(report.mismatched)} mismatched, {len(report.unexpected)} unexpected tensors); "
                              "it is damaged or was replaced: delete it and resume, or start a new run")


def write_final_artifacts(setup: TrainingSetup, state: TrainingState, run_dir: Path) -> dict:
    """Evaluate the best weights on the validation set and write val_predictions.csv, report.json,
    metrics.csv, curves.png, confusion.png and report.html. Returns the final metrics."""
    load_best_weights(setup, run_dir)
    # In EVAL_PRECISION (float32): this report describes the model evaluate, predict and an export run.
    evaluation = evaluate(setup.model, setup.val_loader, setup.device, setup.classes,
                          precision=EVAL_PRECISION, keep_predictions=True, task=setup.task)
    if not is_main_process():
        return evaluation.metrics
    if setup.task.name == "multilabel":
        _write_multilabel_files(setup, evaluation, run_dir)
        write_metrics_csv(run_dir, state.history)
        write_json(run_dir / REPORT_FILE, _report(setup, state, evaluation.metrics, evaluation.seconds))
        plot_curves(state.history, run_dir / CURVES_FILE)
        write_report(run_dir)
        return evaluation.metrics
    classes = setup.classes
    write_val_predictions(run_dir, [
        {"path": str(sample.path), "label": classes[label], "predicted": classes[predicted],
         "confidence": f"{confidence:.6f}", "loss": f"{loss:.6f}"}
        for sample, (label, predicted, confidence, loss) in zip(setup.val_samples, evaluation.predictions)
    ])
    write_metrics_csv(run_dir, state.history)
    write_json(run_dir / REPORT_FILE, _report(setup, state, evaluation.metrics, evaluation.seconds))
    _plot(state.history, evaluation.metrics["confusion"], classes, run_dir)
    # report.html reads back what was just written; its Grad-CAM overlays use the model in hand
    # (best weights loaded above) rather than rebuilding it from the folder.
    setup.model.eval()
    trained = LoadedRun(setup.model, list(classes), setup.preprocessing, setup.config, run_dir)
    write_report(run_dir, trained=trained, anatomy=setup.anatomy)
    return evaluation.metrics


def _write_multilabel_files(setup: TrainingSetup, evaluation, run_dir: Path) -> None:
    """thresholds.json (tuned on validation: each class's best F1), val_predictions.csv with every
    label's probability, the per-class AP bars and the precision-recall curves."""
    classes, metrics = setup.classes, evaluation.metrics
    write_json(run_dir / THRESHOLDS_FILE, {"task": "multilabel", "classes": classes,
                                           "thresholds": dict(zip(classes, metrics["thresholds"])),
                                           "tuned_on": "validation", "rule": "maximum F1 per class"})

    def names(values, cut):
        return "|".join(name for name, value, limit in zip(classes, values, cut) if value >= limit)

    write_val_predictions(run_dir, [
        {"path": str(sample.path), "label": names(targets, [0.5] * len(classes)),
         "predicted": names(scores, metrics["thresholds"]),
         "scores": " ".join(f"{score:.6f}" for score in scores), "loss": f"{loss:.6f}"}
        for sample, (targets, scores, loss) in zip(setup.val_samples, evaluation.predictions)
    ], columns=("path", "label", "predicted", "scores", "loss"))
    plot_average_precision({name: row["ap"] for name, row in metrics["per_class"].items()}, run_dir / AP_FILE)
    if evaluation.predictions:
        targets = torch.tensor([row[0] for row in evaluation.predictions])
        scores = torch.tensor([row[1] for row in evaluation.predictions], dtype=torch.float64)
        plot_pr_curves(precision_recall_curves(scores, targets, classes), run_dir / PR_CURVES_FILE)


def _report(setup: TrainingSetup, state: TrainingState, metrics: dict, eval_seconds: float) -> dict:
    epochs = state.history
    return {
        "task": setup.task.name,  # single, or multilabel (chosen by --task, or found in the manifest)
        "selection_metric": setup.task.selection_metric,  # what chose best.safetensors (best_val_accuracy holds it)
        "model": setup.config.model,
        "weights": setup.config.weights,
        "strategy": setup.config.strategy,
        "classes": setup.classes,
        "epochs_completed": state.epoch,
        "epochs_planned": setup.config.epochs,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_accuracy,
        # which weights best.safetensors (and so "final") holds: the trained model's, or --ema's average
        "best_weights": state.best_weights,
        "ema_decay": setup.config.ema or None,  # None: trained without --ema
        "final": metrics,  # the best weights evaluated once more on the validation set
        "timings": {
            "train_and_val_seconds": state.train_seconds,
            "final_eval_seconds": eval_seconds,
            "mean_images_per_s": sum(row["images_per_s"] for row in epochs) / len(epochs) if epochs else 0.0,
            "per_epoch_seconds": [row["seconds"] for row in epochs],
        },
        "data": setup.split_info,
        "bad_files": [{"path": path, "reason": reason} for path, reason in setup.bad_files],
        "weights_load_report": setup.load_report,
        "budget": state.budget or None,  # --budget: measured step time, estimated epoch time, chosen epochs, why
        "feature_cache": state.feature_cache,  # which phases trained the head on cached features, and why
        "param_groups": describe_groups(setup.optimizer),
        "environment": {"device": str(setup.device), "precision": setup.precision.name,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }


def _plot(history: list[dict], confusion: list[list[int]], classes: list[str], run_dir: Path) -> None:
    plot_curves(history, run_dir / CURVES_FILE)
    plot_confusion(confusion, classes, run_dir / CONFUSION_FILE)

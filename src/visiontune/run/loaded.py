"""A finished run, loaded back: its model (on the best or last weights, in eval mode), classes,
preprocessing and configuration, checked file by file so that a damaged or planted file is a
one-line error naming it (:mod:`visiontune.run.folder` lists and writes the files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune import distributed
from visiontune.checkpoint import load_weights
from visiontune.config import TrainConfig, read_config
from visiontune.device import DEVICES, resolve_device
from visiontune.errors import CheckpointError, ConfigError
from visiontune.model.create import create_model
from visiontune.model.preprocessing import Preprocessing
from visiontune.run.files import run_file
from visiontune.run.folder import (BEST_WEIGHTS, CLASSES_FILE, CONFIG_FILE, LAST_CHECKPOINT, PREPROCESSING_FILE,
                                   THRESHOLDS_FILE, check_run_folder, load_training_state)
from visiontune.run.inference import predict_images


@dataclass
class LoadedRun:
    """A trained model (in eval mode) with everything needed to use it."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    config: TrainConfig
    run_dir: Path
    task: str = "single"  # or "multilabel": sigmoid scores, every label above its threshold
    thresholds: list[float] | None = None  # multi-label: per class, from thresholds.json

    def predict(self, paths, top_k: int = 5, tta: bool = False):
        """Classify image files: ``(predictions, skipped)`` as :func:`visiontune.run.inference.predict_images`
        (``tta``: average each image's probabilities with its horizontal flip's)."""
        return predict_images(self, [paths] if isinstance(paths, (str, Path)) else paths, top_k=top_k, tta=tta)


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the run's model and load ``best.safetensors`` (``checkpoint="best"``) or the model
    in ``last.ckpt`` (``"last"``), on ``device`` (``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device).

    A folder that does not exist, or is not a run folder, is a ConfigError that says which."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise ConfigError(f"run folder {run_dir} does not exist; give the folder that 'visiontune train --out' wrote")
    if not run_dir.is_dir() or not run_file(check_run_folder(run_dir), CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a visiontune run folder (it has no {CONFIG_FILE}); "
                          "give the folder that 'visiontune train --out' wrote")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    # "auto"/"cpu"/"cuda" are checked (no GPU is a ConfigError) and, under torchrun, "cuda" is this
    # process's GPU (cuda:LOCAL_RANK); "cuda:1" or a torch.device is used as given.
    device = distributed.device_for_rank(resolve_device(device)) if device in DEVICES else torch.device(device)
    config = read_config(run_dir / CONFIG_FILE)
    classes = read_run_json(run_file(run_dir, CLASSES_FILE), list)
    if not classes or not all(isinstance(name, str) for name in classes):
        raise CheckpointError(f"{run_dir / CLASSES_FILE} is damaged: it must hold a list of class names")
    preprocessing_values = read_run_json(run_file(run_dir, PREPROCESSING_FILE), dict)
    try:
        preprocessing = Preprocessing.from_dict(preprocessing_values)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{run_dir / PREPROCESSING_FILE} is damaged ({type(error).__name__}: {str(error)[:80]})") from None
    model = build_run_model(config, len(classes))
    _load_run_weights(model, run_dir, checkpoint)
    model.to(device).eval()
    thresholds = _read_thresholds(run_dir, classes) if config.task == "multilabel" else None
    return LoadedRun(model, classes, preprocessing, config, run_dir, config.task if thresholds else "single", thresholds)


def _read_thresholds(run_dir: Path, classes: list[str]) -> list[float]:
    """A multi-label run's per-class thresholds (tuned on validation when training ended)."""
    path = run_file(run_dir, THRESHOLDS_FILE)
    values = read_run_json(path, dict).get("thresholds")
    if not isinstance(values, dict) or set(values) != set(classes) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in values.values()):
        raise CheckpointError(f"{path} is damaged: it must map each of the run's {len(classes)} classes to a number")
    return [float(values[name]) for name in classes]


def read_run_json(path: Path, kind: type) -> Any:
    """A JSON file of a run folder, which must hold a ``kind`` (list or dict); a missing, unreadable
    or damaged file is a one-line CheckpointError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run folder is incomplete") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is damaged or unreadable ({type(error).__name__}: {str(error)[:80]}); "
                              "restore it from the run that wrote it") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path} is damaged: it holds a {type(value).__name__}, not a {kind.__name__}")
    return value


def build_run_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The run's architecture with random weights (the trained ones are loaded on top)."""
    return create_model(config.model, num_classes=num_classes, weights=None)


def _load_run_weights(model: nn.Module, run_dir: Path, checkpoint: str) -> None:
    """Through load_weights, so that a damaged, unsafe or foreign file (a lying safetensors header,
    integer tensors for float weights, wrong shapes) is a one-line CheckpointError, never a traceback."""
    if checkpoint == "last":
        path, source = run_dir / LAST_CHECKPOINT, load_training_state(run_dir)["model"]
    else:
        path = source = run_file(run_dir, BEST_WEIGHTS)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist; the run may not have finished an epoch (try checkpoint='last')")
    report = load_weights(model, source, match="name")
    if not report.complete or report.unexpected:
        raise CheckpointError(f"{path} does not fit the run's model ({len(report.missing)} missing, "
                              f"{len(report.mismatched)} mismatched, {len(report.unexpected)} unexpected tensors); "
                              "it was not written by this run")

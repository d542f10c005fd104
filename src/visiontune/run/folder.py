"""The run folder: what a training run leaves behind (:mod:`visiontune.run.loaded` loads it back).

``RUN/`` is self-contained: ``config.yaml`` (resolved TrainConfig), ``classes.json``,
``preprocessing.json``, ``metrics.csv``, ``best.safetensors``, ``last.ckpt``, ``report.json``,
``val_predictions.csv``, ``curves.png``, ``confusion.png`` and ``tensorboard/``.

``last.ckpt`` holds everything needed to continue bit for bit (model, optimizer, epoch, step,
phase, RNG states, config, history; its layout is :mod:`visiontune.training.state`'s) and loads
with ``torch.load(weights_only=True)``: it holds only tensors and plain Python values, no numpy
arrays or pickled objects. This module writes and reads the file; the training state reads its fields.

Every file is written through :func:`visiontune.atomic_io.atomic_write`, which replaces a
symbolic link rather than writing through it, and every file read back goes through
:func:`visiontune.run.files.run_file`, which accepts only a regular file inside the run folder:
a run folder received from someone else can neither make visiontune overwrite nor reveal a file
elsewhere. The file names are listed here, so ``--overwrite`` removes exactly visiontune's own
files (:func:`remove_run_files`).

Only the main process writes (:func:`visiontune.distributed.is_main_process`), so distributed
training can call the same functions from every rank.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import time
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visiontune.atomic_io import atomic_write, write_text_atomically
from visiontune.checkpoint import read_checkpoint, save_weights
from visiontune.checkpoint.finite import require_finite
from visiontune.checkpoint.save import named_write_errors
from visiontune.config import TrainConfig, save_config
from visiontune.distributed import is_main_process
from visiontune.errors import CheckpointError, ConfigError
from visiontune.model.preprocessing import Preprocessing
from visiontune.run.files import run_file, run_subfolder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"
METRICS_FILE = "metrics.csv"
BEST_WEIGHTS = "best.safetensors"
LAST_CHECKPOINT = "last.ckpt"
REPORT_FILE = "report.json"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
# Multi-label runs: per-class thresholds tuned on validation, per-class AP bars, precision-recall curves.
THRESHOLDS_FILE = "thresholds.json"
AP_FILE = "average_precision.png"
PR_CURVES_FILE = "pr_curves.png"
REPORT_HTML = "report.html"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the only files visiontune's SummaryWriter writes there
RUN_FILES = (CONFIG_FILE, CLASSES_FILE, PREPROCESSING_FILE, METRICS_FILE, BEST_WEIGHTS, LAST_CHECKPOINT,
             REPORT_FILE, VAL_PREDICTIONS_FILE, CURVES_FILE, CONFUSION_FILE, REPORT_HTML, THRESHOLDS_FILE, AP_FILE,
             PR_CURVES_FILE)
# What only one task writes: the rest of RUN_FILES is in every finished run.
MULTILABEL_ONLY_FILES = (THRESHOLDS_FILE, AP_FILE, PR_CURVES_FILE)
SINGLE_LABEL_ONLY_FILES = (CONFUSION_FILE,)


def finished_run_files(task: str) -> tuple[str, ...]:
    """The files a finished run of ``task`` (``single`` or ``multilabel``) has, of RUN_FILES."""
    other_task = SINGLE_LABEL_ONLY_FILES if task == "multilabel" else MULTILABEL_ONLY_FILES
    return tuple(name for name in RUN_FILES if name not in other_task)


# `visiontune export` writes these into the run by default (visiontune.run.export.SUFFIXES); an
# --overwrite removes them too, so no exported model of the old run survives beside the new one.
EXPORT_FILES = ("model.onnx", "model.onnx.json", "model.onnx.data", "model.pt", "model.pt.json")
METRICS_COLUMNS = ("epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
                   "val_macro_f1", "seconds", "images_per_s")
OPTIONAL_METRICS_COLUMNS = ("val_acc_ema",  # the EMA weights' validation accuracy, under --ema
                            "val_map", "val_micro_f1", "val_map_ema")  # multi-label runs


# -- creating the folder -----------------------------------------------------------------------


def default_run_dir(model_name: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<YYYYmmdd-HHMMSS>`` (``timm:`` and other odd characters become ``-``)."""
    safe = re.sub(r"[^A-Za-z0-9_.]+", "-", model_name).strip("-") or "model"
    return Path(root) / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a run folder that exists and is not empty, unless ``overwrite`` and it is a run folder
    (a folder of a user's own files is never a place to --overwrite)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run folder {path} exists and is a file; choose another --out")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise ConfigError(f"run folder {path} already exists; pass --overwrite to replace it, "
                          f"--resume {path} to continue it, or choose another --out")
    if not is_run_folder(path):
        names = sorted(entry.name for entry in path.iterdir())
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(f"--overwrite refused: {path} is not a visiontune run folder (no {CONFIG_FILE}) and holds "
                          f"other files ({shown}); --overwrite replaces only a run's own files, so choose a new or "
                          "empty --out")
    return path


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a run's config.yaml (a regular file, not a link to one)."""
    config = Path(path) / CONFIG_FILE
    return config.is_file() and not config.is_symlink()


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder. An existing, non-empty one is refused unless ``overwrite``, and then
    only visiontune's own files are removed (never anything else a user keeps there)."""
    path = check_run_dir(path, overwrite)
    if is_main_process():
        if path.is_dir():
            remove_run_files(path)
        path.mkdir(parents=True, exist_ok=True)
    return path


def remove_run_files(run_dir: Path) -> None:
    """Delete the files visiontune writes into a run folder, by name, and nothing else: a user's
    notes, or their own files under tensorboard/, stay. A symlink is removed, not what it points to."""
    for name in (*RUN_FILES, *EXPORT_FILES):
        _remove_file(run_dir / name)
    for name in RUN_FILES:
        for leftover in run_dir.glob(f".{name}.*.tmp"):  # atomic_write's temporary files from a killed run
            _remove_file(leftover)
    board = run_dir / TENSORBOARD_DIR
    if board.is_symlink():
        board.unlink()
    elif board.is_dir():
        for events in board.glob(TENSORBOARD_EVENTS):
            _remove_file(events)
        if not any(board.iterdir()):
            board.rmdir()


def _remove_file(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)


def check_run_folder(run_dir: str | Path) -> Path:
    """Refuse (one line) a run folder in which any of the run's files or tensorboard/ is a symbolic
    link or not a regular file: every command that reads a run checks it whole, before any work, so
    a planted link is named at once rather than after hours of a resumed training."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        run_file(run_dir, name)
    run_subfolder(run_dir, TENSORBOARD_DIR)
    return run_dir


def discard_unfinished_run(run_dir: Path) -> None:
    """After an interruption before the first epoch: remove what the run wrote (the header files),
    and the folder itself if that leaves it empty, so the same command can simply be run again."""
    if not is_main_process() or not run_dir.is_dir() or (run_dir / LAST_CHECKPOINT).exists():
        return
    remove_run_files(run_dir)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def write_json(path: Path, value: Any) -> None:
    if is_main_process():
        _atomic_text(path, json.dumps(value, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _atomic_text(path: Path, text: str) -> None:
    write_text_atomically(path, text)


def write_run_header(run_dir: Path, config: TrainConfig, classes: list[str], preprocessing: Preprocessing) -> None:
    """The files that describe the run before it trains: config, classes, preprocessing."""
    if not is_main_process():
        return
    save_config(config, run_dir / CONFIG_FILE)
    write_json(run_dir / CLASSES_FILE, list(classes))
    write_json(run_dir / PREPROCESSING_FILE, preprocessing.to_dict())


def write_metrics_csv(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv from the history kept in the training state (so a resume never doubles rows)."""
    if not is_main_process():
        return
    # Columns of optional features (val_acc_ema: --ema) only when a row has them.
    columns = METRICS_COLUMNS + tuple(column for column in OPTIONAL_METRICS_COLUMNS if any(column in row for row in rows))
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_csv_cell(row.get(column)) for column in columns))
    _atomic_text(run_dir / METRICS_FILE, "\n".join(lines) + "\n")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_metrics_csv(run_dir: str | Path) -> list[dict]:
    with open(run_file(run_dir, METRICS_FILE), newline="") as handle:
        return list(csv.DictReader(handle))


def write_val_predictions(run_dir: Path, rows: list[dict],
                          columns: tuple[str, ...] = ("path", "label", "predicted", "confidence", "loss")) -> None:
    """``path,label,predicted,confidence,loss`` per validation image (the best model's); multi-label
    runs give their own ``columns``."""
    if not is_main_process():
        return
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_text(run_dir / VAL_PREDICTIONS_FILE, buffer.getvalue())


# -- training state (last.ckpt) -------------------------------------------------------------------


def capture_rng_state() -> dict:
    """torch, CUDA, numpy and Python RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    try:
        _restore_rng_state(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"the random-number state saved in {LAST_CHECKPOINT} is damaged ({type(error).__name__}: "
                              f"{str(error)[:80]}); the run cannot continue exactly, start a new one") from None


def _restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_training_state(run_dir: Path, checkpoint: dict) -> None:
    """Write last.ckpt (``TrainingState.to_checkpoint()``) atomically: an interruption leaves the
    previous complete checkpoint."""
    if not is_main_process():
        return
    with named_write_errors(run_dir / LAST_CHECKPOINT), atomic_write(run_dir / LAST_CHECKPOINT) as temporary:
        torch.save(checkpoint, temporary)


def load_training_state(run_dir: str | Path) -> dict:
    """last.ckpt as a dict, for ``TrainingState.from_checkpoint()`` (which checks its format) or
    for its ``"model"`` weights; a missing, damaged or foreign file is a one-line CheckpointError."""
    path = run_file(check_run_folder(run_dir), LAST_CHECKPOINT)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; --resume needs a run folder written by 'visiontune train'")
    # torch.load(weights_only=True) behind a one-line CheckpointError for damaged or code-carrying files.
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a visiontune training checkpoint (it holds no model state); "
                              "--resume needs a run folder written by 'visiontune train'")
    require_finite(state["model"], str(path), "so the run cannot continue from it")
    return state


def save_best_weights(run_dir: Path, model: nn.Module) -> None:
    if is_main_process():
        save_weights(model, run_dir / BEST_WEIGHTS)

"""Where a training run stands: :class:`TrainingState`, and its layout inside ``last.ckpt``.

The state is what the epoch loop advances (epoch, step, phase, best accuracy, patience, history);
``last.ckpt`` adds what resume loads back into the live objects (:class:`ResumePoint`: the
resolved config, model, optimizer, gradient scaler and RNG states). Both are written as one flat
dict of tensors and plain values, so the file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.errors import CheckpointError

# The layout of last.ckpt. 2: TrainingState's fields plus ResumePoint's, no "scheduler" entry
# (the schedule is a pure function of the step, so that entry was never read back).
STATE_FORMAT = 2
RESUME_HINT = "--resume needs the run folder of a 'visiontune train' run"
# Entries a format-2 file may lack: no scaler without fp16, no EMA without --ema, and files written
# before --ema and --budget existed (best_weights "model", no budget): the field's default then.
OPTIONAL_ENTRIES = ("scaler", "ema", "best_weights", "budget")


@dataclass
class TrainingState:
    """The run's progress after its last finished epoch: what the loop needs to continue and
    what the report reads."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken since the run started (all phases)
    phase: int = 0  # index of the current phase in TrainingSetup.phases
    phase_start_step: int = 0  # the step at which the current phase began; its schedule counts from here
    best_accuracy: float = -1.0  # best validation top-1 so far, 0..1 (-1: no epoch yet, so any epoch beats it)
    best_epoch: int = 0  # the epoch that reached it (1-based), whose weights are in best.safetensors
    best_weights: str = "model"  # which weights best.safetensors holds: "model", or "ema" (--ema's average)
    epochs_without_improvement: int = 0  # compared with --patience
    train_seconds: float = 0.0  # training and validation time over all epochs, seconds
    history: list[dict] = field(default_factory=list)  # one metrics.csv row per finished epoch
    stopped_early: bool = False  # for the report: patience ran out
    feature_cache: dict = field(default_factory=dict)  # for the report: phase -> how its features were cached
    budget: dict = field(default_factory=dict)  # --budget: the plan and the time spent (training/budget_plan.py)

    def to_checkpoint(self, resume: ResumePoint) -> dict:
        """The dict ``last.ckpt`` holds: this state's fields, ``resume``'s, and the format number."""
        checkpoint = {"format": STATE_FORMAT, **_fields(self), **_fields(resume)}
        for name in ("scaler", "ema"):
            if checkpoint[name] is None:
                del checkpoint[name]
        return checkpoint

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, path: str | Path) -> tuple[TrainingState, ResumePoint]:
        """Split a loaded ``last.ckpt`` (read from ``path``, named in errors) into the state and
        what resume loads back; a file of another format or program is a one-line CheckpointError."""
        version = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        if version is None:
            raise CheckpointError(f"{path} is not a visiontune training checkpoint (it has no format number); "
                                  f"{RESUME_HINT}")
        if version != STATE_FORMAT:
            newer = isinstance(version, int) and version > STATE_FORMAT
            raise CheckpointError(
                f"{path} holds training-state format {version!r}, this visiontune reads format {STATE_FORMAT}: "
                + ("upgrade visiontune to resume it" if newer else
                   f"it cannot be resumed; its weights still load (--weights {path} starts a new run from them, "
                   "and load_run(..., checkpoint='last') reads them)"))
        names = [spec.name for spec in dataclasses.fields(cls)] + [spec.name for spec in dataclasses.fields(ResumePoint)]
        missing = [name for name in names if name not in checkpoint and name not in OPTIONAL_ENTRIES]
        if missing:
            raise CheckpointError(f"{path} is incomplete (no {', '.join(missing)}); it was not written whole by "
                                  f"'visiontune train'; {RESUME_HINT}")
        state = cls(**{spec.name: checkpoint[spec.name] for spec in dataclasses.fields(cls) if spec.name in checkpoint})
        resume = ResumePoint(**{spec.name: checkpoint.get(spec.name) for spec in dataclasses.fields(ResumePoint)})
        return state, resume


@dataclass
class ResumePoint:
    """What resume loads back besides the progress: the settings and the live objects' states."""

    config: dict  # the resolved TrainConfig (TrainConfig.to_dict())
    model: dict  # model.state_dict()
    optimizer: dict  # the current phase's optimizer.state_dict()
    rng: dict  # run.folder.capture_rng_state(): torch, CUDA, numpy and Python generators
    scaler: dict | None = None  # GradScaler.state_dict() under fp16, else None (and absent from the file)
    ema: dict | None = None  # WeightAverage.state_dict() under --ema, else None (and absent from the file)


def _fields(instance) -> dict:
    # Not dataclasses.asdict: that deep-copies every tensor of the model and optimizer states.
    return {spec.name: getattr(instance, spec.name) for spec in dataclasses.fields(instance)}

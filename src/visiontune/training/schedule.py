"""The learning-rate schedule as a pure function of the step (as nanoGPT's ``get_lr``).

Linear warmup from ``lr / warmup_steps`` to ``lr``, then half a cosine down to ``min_ratio * lr``
at the last step. Because the factor depends only on the step, resuming needs nothing but the
step counter: there is no scheduler object whose state could drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Warmup then cosine over ``total_steps`` optimiser steps (one phase of training)."""

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        """Multiplier of each group's peak learning rate at ``step`` (0-based, within the phase)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine

    def to_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "min_ratio": self.min_ratio}


def build_schedule(steps_per_epoch: int, epochs: int, warmup_epochs: float) -> Schedule:
    """A phase of ``epochs`` epochs; warmup is capped at half the phase so cosine always runs."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(round(warmup_epochs * steps_per_epoch), total // 2)
    return Schedule(total_steps=total, warmup_steps=warmup)


def set_learning_rates(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr to its peak (``group["peak_lr"]``) times the schedule; returns the factor."""
    factor = schedule.factor(step)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return factor

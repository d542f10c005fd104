"""How many images per second a model trains at: a few real training steps, timed.

The steps are the training loop's own (:func:`visiontune.training.loops.train_step`), on the model
as the training set-up prepares it (on its device, channels_last where that is faster, the
phase's parameters trainable, the run's optimizer and precision), so the figure is what
``visiontune train`` will see, less data loading. The batch is random pixels: a step costs the
same whatever the pixels are. The first steps are not timed (kernel selection, allocator warm-up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from visiontune.config import TrainConfig
from visiontune.device import Precision, prefers_channels_last
from visiontune.model.anatomy import Anatomy, anatomy_of
from visiontune.model.freeze import set_train_mode
from visiontune.training.loops import train_step
from visiontune.training.strategies import apply_phase, build_optimizer, plan_phases

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # untimed: the first steps choose kernels and grow the allocator's pools
TIMED_STEPS = 3


@dataclass(frozen=True)
class Throughput:
    """Training speed measured over ``steps`` steps of ``batch_size`` images at ``image_size`` px."""

    images_per_second: float
    seconds_per_step: float
    batch_size: int
    image_size: int
    steps: int

    def to_dict(self) -> dict:
        return {"images_per_second": self.images_per_second, "seconds_per_step": self.seconds_per_step,
                "batch_size": self.batch_size, "image_size": self.image_size, "steps": self.steps}


def measure_training_throughput(
    model: nn.Module,
    config: TrainConfig,
    num_classes: int,
    image_size: int,
    device: torch.device,
    precision: Precision,
    *,
    anatomy: Anatomy | None = None,
    warmup_steps: int = WARMUP_STEPS,
    timed_steps: int = TIMED_STEPS,
    clock: Callable[[], float] = time.perf_counter,
) -> Throughput:
    """Images per second of ``config``'s main training phase (its last: everything that will train
    for ``full`` and ``gradual``) on ``model``, with ``config.batch_size`` images of ``image_size`` px.

    The model's weights change (real optimizer steps): measure on a model you no longer need, or
    a copy. ``clock``: seconds, monotonic (tests pass a fake one)."""
    if timed_steps < 1:
        raise ValueError(f"timed_steps must be at least 1, got {timed_steps}")
    model.to(device)
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)
    anatomy = anatomy or anatomy_of(model, name=config.model)
    phase = plan_phases(config)[-1]
    apply_phase(model, phase, anatomy)
    optimizer = build_optimizer(model, phase, config, anatomy)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.rand(config.batch_size, 3, image_size, image_size, generator=generator).to(device)
    if prefers_channels_last(model):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (config.batch_size,), generator=generator).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    set_train_mode(model)
    started = 0.0
    for step in range(warmup_steps + timed_steps):
        if step == warmup_steps:
            _wait_for(device)
            started = clock()
        train_step(model, images, labels, optimizer, loss_fn, precision=precision, scaler=scaler,
                   grad_clip=config.grad_clip)
    _wait_for(device)
    seconds = max(clock() - started, 1e-9)  # a coarse clock can read 0 for a fast step
    optimizer.zero_grad(set_to_none=True)  # the gradients are not needed: free their memory
    result = Throughput(images_per_second=config.batch_size * timed_steps / seconds,
                        seconds_per_step=seconds / timed_steps, batch_size=config.batch_size,
                        image_size=image_size, steps=timed_steps)
    log.info("%s trains at %.1f images/s (batch %d, %d px)", config.model, result.images_per_second,
             config.batch_size, image_size)
    return result


def _wait_for(device: torch.device) -> None:
    """CUDA runs asynchronously: the clock must not be read before the queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

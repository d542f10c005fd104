"""The learning-rate range test (Smith 2015, as popularised by fastai's ``lr_find``).

Train for up to ``num_steps`` mini-batches while the learning rate grows exponentially from
``start_lr`` to ``end_lr``; record an exponentially smoothed (and bias-corrected) loss; stop once
it exceeds ``diverge_factor`` x the best smoothed loss so far (fastai uses 4). Afterwards the
model's weights and buffers and the optimizer's state are put back exactly as they were, so the
test can run right before training (the global torch RNG too).

The suggestion is the rate at the lowest smoothed loss divided by 10 (the classic fastai v1 rule):
the lowest point is where the rate is about to be too high, and a decade below it training still
makes fast progress. fastai's newer "valley" (the middle of the longest decreasing stretch of the
curve) is reported too, in ``LRFindResult.valley``: on real, noisy fine-tuning curves it is often
the better pick, but on a clean curve whose loss falls from the very first step (any convex toy
problem) the stretch starts at ``start_lr`` and it lands decades too low, while min/10 stays within
a decade or two below the largest stable rate (see tests/test_lr_finder.py). "Steepest slope" was
rejected: with the smoothing lag, one noisy early step can move it by five decades.

Each step is the training loop's own :func:`~visiontune.training.loops.train_step` (autocast,
fp16 gradient scaler, clipping, mixup/cutmix), as fastai's finder is a callback on the real fit:
only the learning rates differ from training.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from visiontune.device import Precision
from visiontune.model.freeze import set_train_mode
from visiontune.run.plots import Figure, save_png
from visiontune.training.loops import train_step
from visiontune.training.setup import TrainingSetup

log = logging.getLogger(__name__)

# A few points at each end of the curve say nothing about the valley: at the start the smoothed
# loss has not warmed up, at the end it is diverging (fastai skips num_steps // 10 and 5).
_SKIP_END = 5
_MIN_POINTS_FOR_VALLEY = 5
# --lr auto and 'visiontune lr-find' without --lr build the optimizer's groups at this backbone rate;
# the test scales every group together, so only the groups' ratios to it matter, not its value.
REFERENCE_LR = 1e-3


@dataclass
class LRFindResult:
    lrs: list[float]  # learning rate at each step taken
    losses: list[float]  # smoothed, bias-corrected training loss at each step
    suggestion: float | None  # (rate at the lowest smoothed loss) / 10; None when nothing was recorded
    valley: float | None = None  # fastai's "valley" suggestion, for comparison
    diverged: bool = False  # stopped early because the loss blew up
    method: str = "min/10"

    def to_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "suggestion": self.suggestion, "method": self.method,
                "valley": self.valley, "diverged": self.diverged}


def lr_find(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smooth: float = 0.98,
    diverge_factor: float = 4.0,
    batch_mixer: Callable | None = None,
    reference_lr: float | None = None,
    precision: Precision = Precision(None),
    grad_clip: float = 0.0,
) -> LRFindResult:
    """Run the range test and restore ``model`` and ``optimizer`` exactly afterwards.

    With several parameter groups (head and backbone at different rates) every group keeps its
    ratio to ``reference_lr`` (default: the largest group rate, i.e. the head's), and the rates
    reported and suggested are values for ``reference_lr``, i.e. for ``--lr``.
    ``loader`` yields ``(images, targets)`` and is cycled if shorter than ``num_steps``;
    ``batch_mixer(images, targets) -> (images, targets)`` applies mixup/cutmix, ``precision`` and
    ``grad_clip`` autocast and clip, as training would (fp16 gets a gradient scaler of its own).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    _warn_if_data_is_tiny(loader, num_steps)
    saved_model = _cpu_copy(model.state_dict())
    saved_optimizer = _cpu_copy(optimizer.state_dict())
    saved_training = {name: module.training for name, module in model.named_modules()}
    # Dropout and mixup draw from the global RNG: restore it, so that training after the test runs
    # exactly as a run started with the suggested rate would.
    saved_rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    device = torch.device(device)
    # A scaler of its own, thrown away afterwards: training starts with a fresh one, as without the test.
    step = partial(train_step, optimizer=optimizer, loss_fn=loss_fn, precision=precision, batch_mixer=batch_mixer,
                   grad_clip=grad_clip, scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None)
    try:
        lrs, losses, diverged = _range_test(model, loader, optimizer, step, device, start_lr, end_lr, num_steps,
                                            smooth, diverge_factor, reference_lr)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        for name, module in model.named_modules():
            module.training = saved_training[name]
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(saved_rng[0])
        if saved_rng[1] is not None:
            torch.cuda.set_rng_state_all(saved_rng[1])
    suggestion, valley_lr = suggest_lr(lrs, losses)
    log.info("lr range test: %d steps%s, suggestion %s (valley %s)", len(lrs), " (diverged)" if diverged else "",
             suggestion, valley_lr)
    return LRFindResult(lrs, losses, suggestion, valley_lr, diverged)


def lr_find_for_setup(setup: TrainingSetup, *, reference_lr: float, **options) -> LRFindResult:
    """:func:`lr_find` on a run's first-phase model, optimizer, data, loss, precision, batch
    mixing and clipping; ``options`` are lr_find's range settings (start_lr, end_lr, num_steps)."""
    return lr_find(setup.model, setup.train_loader, setup.optimizer, setup.loss_fn, setup.device,
                   batch_mixer=setup.batch_mixer, reference_lr=reference_lr, precision=setup.precision,
                   grad_clip=setup.config.grad_clip, **options)


def _range_test(model, loader, optimizer, step, device, start_lr, end_lr, num_steps, smooth, diverge_factor,
                reference_lr) -> tuple[list[float], list[float], bool]:
    reference = reference_lr or max(group["lr"] for group in optimizer.param_groups)
    ratios = [group["lr"] / reference if reference > 0 else 1.0 for group in optimizer.param_groups]
    growth = (end_lr / start_lr) ** (1.0 / (num_steps - 1))  # per-step multiplier
    set_train_mode(model)  # as training does: frozen BatchNorm layers keep their running statistics
    batches = _cycle(loader)
    try:
        return _steps(model, batches, optimizer, step, device, start_lr, growth, ratios, num_steps, smooth,
                      diverge_factor)
    finally:
        batches.close()  # shuts a worker-backed loader iterator down now, not at garbage collection


def _steps(model, batches, optimizer, step, device, start_lr, growth, ratios, num_steps, smooth,
           diverge_factor) -> tuple[list[float], list[float], bool]:
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    for index in range(num_steps):
        lr = start_lr * growth**index
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        images, targets = next(batches)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss, _ = step(model, images, targets)
        value = float(loss)
        if not math.isfinite(value):
            return lrs, losses, True
        average = smooth * average + (1 - smooth) * value
        smoothed = average / (1 - smooth ** (index + 1))  # bias correction of the running mean
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge_factor * best:
            return lrs, losses, True
    return lrs, losses, False


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float | None, float | None]:
    """``(min/10, valley)`` on the curve without its first tenth (the smoothed loss warming up);
    valley also without the last few points (already diverging), and None when too short."""
    if not lrs:
        return None, None
    start = len(lrs) // 10
    lowest = min(range(start, len(losses)), key=losses.__getitem__)
    end = len(lrs) - _SKIP_END
    valley_lr = valley(lrs[start:end], losses[start:end]) if end - start >= _MIN_POINTS_FOR_VALLEY else None
    return lrs[lowest] / 10, valley_lr


def valley(lrs: list[float], losses: list[float]) -> float:
    """The rate a third-to-half of the way into the longest decreasing run of ``losses``
    (fastai.callback.schedule.valley: longest decreasing subsequence, O(n^2) for n <= a few hundred)."""
    n = len(losses)
    run_lengths = [1] * n  # longest decreasing subsequence ending at i
    max_start, max_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run_lengths[i] < run_lengths[j] + 1:
                run_lengths[i] = run_lengths[j] + 1
            if run_lengths[max_end] < run_lengths[i]:
                max_end = i
                max_start = max_end - run_lengths[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Smoothed loss against learning rate (log scale), the suggestion marked; written as PNG."""

    figure = Figure(figsize=(6, 4), dpi=110)
    axes = figure.subplots()
    if result.lrs:
        axes.plot(result.lrs, result.losses)
    if result.suggestion is not None:
        axes.axvline(result.suggestion, color="tab:red", linestyle="--",
                     label=f"suggested {result.suggestion:.2e} (min/10)")
    if result.valley is not None:
        axes.axvline(result.valley, color="tab:green", linestyle=":", label=f"valley {result.valley:.2e}")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("smoothed training loss")
    axes.set_title("Learning-rate range test")
    axes.grid(alpha=0.3, which="both")
    return save_png(figure, path, bbox_inches="tight")


def _warn_if_data_is_tiny(loader: Iterable, num_steps: int) -> None:
    """Many passes over a handful of images let the model memorise them: the training loss then
    stays near zero at any rate and the test cannot see where training breaks down."""
    try:
        batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return
    if batches and num_steps / batches > 10:
        log.warning("the LR range test cycles %.0f times over only %d batch(es): the model can memorise them and "
                    "the suggested rate may be far too high; use more data or a fixed --lr", num_steps / batches,
                    batches)


def _cycle(loader: Iterable):
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch[0], batch[1]
        if not produced:
            raise ValueError("the data loader for the learning-rate range test yielded no batches")


def _cpu_copy(state):
    """A deep copy with every tensor cloned to CPU (keeps GPU memory free during the test)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _cpu_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(value) for value in state)
    return copy.deepcopy(state)

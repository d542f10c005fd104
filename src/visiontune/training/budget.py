"""A time budget (``--budget 3m``): the arithmetic, kept pure so that tests need no clock.

:func:`parse_budget` reads ``90s``, ``3m``, ``1h``, ``1h30m`` or plain seconds; :func:`choose_epochs`
turns a measured step time into the number of epochs that ends nearest the budget without passing
it by more than :data:`TOLERANCE`; :func:`time_is_up` is the hard stop the epoch loop asks after
every epoch. The measuring itself (a few real steps) lives in ``training/budget_plan.py``.

Whole epochs cannot always land within +-10 %: when ten or more fit, the nearest is within 5 %;
with fewer, an epoch is a large share of the budget and the plan errs on the short side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from visiontune.errors import ConfigError, shown

# The run should end within the budget +- 10 %: the hard stop ends the run before an epoch that
# would pass it by more. The plan itself passes it by at most half of that, so that a step a few
# per cent slower than measured does not cut the last planned epoch (and its schedule's tail).
TOLERANCE = 0.10
PLAN_OVERSHOOT = TOLERANCE / 2
# A step measured as (almost) free would ask for unbounded epochs; no fine-tune needs more.
MAX_EPOCHS = 1000

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_BUDGET = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_EXAMPLES = "90s, 3m, 1h, 1h30m or plain seconds (180)"


def parse_budget(text: str | int | float) -> float:
    """The budget in seconds; anything else is a one-line ConfigError naming the value."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(cleaned)  # plain seconds
        except ValueError:
            match = _BUDGET.fullmatch(cleaned)
            if not cleaned or match is None:
                raise ConfigError(f"--budget must be a duration such as {_EXAMPLES}, got {shown(text)}") from None
            seconds = sum(float(value) * _UNITS[unit] for value, unit in zip(match.groups(), "hms") if value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--budget must be a positive duration such as {_EXAMPLES}, got {shown(text)}")
    return seconds


@dataclass
class EpochChoice:
    epochs: int
    epoch_seconds: float  # estimated time of one epoch, training and validation, seconds
    predicted_seconds: float  # fixed overhead + epochs x epoch_seconds
    explanation: str  # one sentence for the log and report.json


def choose_epochs(seconds_per_step: float, steps_per_epoch: int, eval_seconds: float, budget_seconds: float,
                  fixed_overhead: float, *, min_epochs: int = 1, max_epochs: int = MAX_EPOCHS) -> EpochChoice:
    """The number of epochs whose predicted total time is nearest ``budget_seconds`` without
    passing it by more than :data:`PLAN_OVERSHOOT`.

    ``seconds_per_step``: one optimiser step (data included); ``eval_seconds``: one validation pass
    (plus what else each epoch costs); ``fixed_overhead``: what the run spends outside its epochs
    (setup and measuring so far, the final evaluation). ``min_epochs`` is what the strategy needs
    (gradual: more than its head-only epochs), and is chosen even when it does not fit."""
    epoch_seconds = max(0.0, seconds_per_step) * steps_per_epoch + max(0.0, eval_seconds)
    available = budget_seconds - fixed_overhead
    limit = budget_seconds * (1 + PLAN_OVERSHOOT)
    if epoch_seconds <= 0:
        epochs = max_epochs
    else:
        fits = max(0, math.floor(available / epoch_seconds))
        over = fits + 1  # one more epoch: nearer the budget if it overshoots less than `fits` falls short
        overshoot = fixed_overhead + over * epoch_seconds - budget_seconds
        shortfall = available - fits * epoch_seconds
        epochs = over if overshoot < shortfall and fixed_overhead + over * epoch_seconds <= limit else fits
    epochs = min(max(epochs, min_epochs), max(max_epochs, min_epochs))
    predicted = fixed_overhead + epochs * epoch_seconds
    measured = (f"{steps_per_epoch} steps x {seconds_per_step:.3g} s + {eval_seconds:.3g} s validation = "
                f"{epoch_seconds:.3g} s per epoch; {fixed_overhead:.0f} s go to setup, measuring and the final "
                f"evaluation")
    if predicted > budget_seconds * (1 + TOLERANCE):
        reason = (f"even {epochs} epoch(s), the fewest this strategy trains, take about {predicted:.0f} s, more than "
                  f"the {budget_seconds:.0f} s budget: training {epochs} and stopping when time is up")
    elif epochs == max_epochs:
        reason = f"{max_epochs} epochs, the most a budget chooses, finish in about {predicted:.0f} s"
    else:
        reason = (f"{epochs} epoch(s) finish in about {predicted:.0f} s of the {budget_seconds:.0f} s budget "
                  f"(+-{TOLERANCE:.0%})")
    return EpochChoice(epochs, epoch_seconds, predicted, f"{measured}: {reason}")


def time_is_up(spent_seconds: float, next_epoch_seconds: float, final_seconds: float, budget_seconds: float) -> bool:
    """The hard stop: would one more epoch (and the final evaluation after it) end the run more
    than :data:`TOLERANCE` past the budget? Then the run stops after the epoch it has just finished."""
    return spent_seconds + next_epoch_seconds + final_seconds > budget_seconds * (1 + TOLERANCE)


# --budget without --image-size: the largest of these sizes (at most the weights' own) at which
# TARGET_EPOCHS epochs fit the budget. benchmarks/recipes.md: five epochs at 64 px beat fewer at a
# larger size on every set there; below SMALLEST_SIZE pretrained features collapse (the digits'
# linear probe fell from ~80 % at 64 px to ~30 % at 32 px).
CANDIDATE_SIZES = (384, 320, 288, 256, 224, 192, 160, 128, 112, 96, 80, 64)
SMALLEST_SIZE = 64
TARGET_EPOCHS = 5


@dataclass
class SizeChoice:
    image_size: int
    predicted_epoch_seconds: float  # at image_size, scaled from the measured size
    explanation: str


def choose_image_size(epoch_seconds: float, measured_size: int, budget_seconds: float, fixed_overhead: float, *,
                      largest: int, target_epochs: int = TARGET_EPOCHS) -> SizeChoice:
    """The largest size (of :data:`CANDIDATE_SIZES` up to ``largest``, the weights' own) at which
    ``target_epochs`` epochs fit ``budget_seconds`` less ``fixed_overhead``, from one epoch's
    measured ``epoch_seconds`` at ``measured_size`` px: a convolution's work grows with the
    pixels, so an epoch at ``s`` px is estimated at ``epoch_seconds * (s / measured_size) ** 2``.
    When not even the smallest fits, the smallest (the epochs then come from the budget)."""
    sizes = [size for size in CANDIDATE_SIZES if SMALLEST_SIZE <= size <= largest] or [max(largest, 8)]
    available = budget_seconds - fixed_overhead
    for size in sizes:
        estimate = max(0.0, epoch_seconds) * (size / measured_size) ** 2
        if estimate * target_epochs <= available:
            return SizeChoice(size, estimate, (
                f"image size {size} px: the largest of up to {largest} px at which {target_epochs} epochs "
                f"(~{estimate:.3g} s each, scaled from {epoch_seconds:.3g} s at {measured_size} px) fit the "
                f"{available:.0f} s left of the budget"))
    size = sizes[-1]
    estimate = max(0.0, epoch_seconds) * (size / measured_size) ** 2
    return SizeChoice(size, estimate, (
        f"image size {size} px, the smallest tried: even there {target_epochs} epochs (~{estimate:.3g} s each) "
        f"would not fit the {available:.0f} s left of the budget"))

"""The time budget inside a run: :func:`plan_budget` times a few real steps before the first epoch
and chooses the epochs; :class:`BudgetWatch` is the hard stop the epoch loop asks after each epoch.

Every time is read from an injected ``clock`` (a callable returning seconds, ``time.monotonic`` by
default), so tests drive both with a fake clock. The plan is recorded in ``TrainingState.budget``
(so in ``last.ckpt`` and report.json). A resumed run keeps the epochs chosen at its start (they are
in its saved config) and counts the time spent before the interruption against the same budget;
a resume with ``--epochs`` replaces the choice, and the budget no longer applies.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch

from visiontune import distributed
from visiontune.device import EVAL_PRECISION, autocast
from visiontune.model.freeze import set_train_mode
from visiontune.run.folder import capture_rng_state, restore_rng_state
from visiontune.training.budget import SizeChoice, choose_epochs, choose_image_size, time_is_up
from visiontune.training.loops import train_step
from visiontune.training.setup import TrainingSetup
from visiontune.training.state import TrainingState
from visiontune.training.strategies import apply_phase, build_optimizer, plan_phases

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # seconds; only differences are used

# Training steps timed before the first epoch. The first (loader workers starting, memory being
# allocated) is counted as per-epoch start-up; the median of the others is the step time.
PROBE_STEPS = 6
PROBE_VAL_BATCHES = 3  # validation batches timed the same way
# After the final evaluation the run writes its predictions, plots and report.html, and the process
# exits: 2-4 s measured on a busy 2-core CPU, most of it importing matplotlib. Not measurable before
# it happens, so an allowance (seconds).
REPORT_SECONDS = 3.0


def choose_size_for_budget(setup: TrainingSetup, budget_seconds: float, clock: Clock, started: float) -> SizeChoice:
    """``--budget`` without ``--image-size``: time a few steps at the set-up's size (the weights'
    own) and choose the size at which enough epochs fit (:func:`~visiontune.training.budget.choose_image_size`).
    The steps are undone, as :func:`plan_budget`'s are."""
    seconds_per_step, train_startup = _time_each_phase(setup, clock)[-1]
    seconds_per_val_batch, val_startup = _time_val_batches(setup, clock)
    epoch_seconds = (seconds_per_step * len(setup.train_loader) + seconds_per_val_batch * len(setup.val_loader)
                     + train_startup + val_startup)
    size = setup.preprocessing.crop_size
    # Setting up again at the new size costs about what the first set-up did; the report about as much as now.
    overhead = 2 * (clock() - started) + REPORT_SECONDS
    choice = choose_image_size(epoch_seconds, size, budget_seconds, overhead, largest=size)
    choice = distributed.broadcast_object(choice)  # every process trains at rank 0's choice
    log.info("time budget: %s", choice.explanation)
    return choice


def plan_budget(setup: TrainingSetup, budget_text: str, budget_seconds: float, clock: Clock,
                started: float, size_choice: SizeChoice | None = None) -> dict:
    """Time a few steps, choose ``setup.config.epochs`` (and re-plan the phases) so that the run
    ends within the budget, log why, and return the record for ``TrainingState.budget``.

    ``started``: the clock's reading when the run began, so setup and measuring count too.
    The model, optimizer and random generators are left exactly as they were: the timed steps
    are undone, so a budgeted run trains what the same run with its chosen epochs would."""
    config = setup.config
    step_times = _time_each_phase(setup, clock)  # [(seconds per step, first step's extra seconds)] per phase
    seconds_per_val_batch, val_startup = _time_val_batches(setup, clock)
    steps_per_epoch = len(setup.train_loader)
    validation_seconds = len(setup.val_loader) * seconds_per_val_batch
    # What each epoch costs besides its steps: validation and starting both loaders' workers.
    seconds_per_step, train_startup = step_times[-1]  # the last phase's epochs are the ones chosen
    eval_seconds = validation_seconds + train_startup + val_startup
    final_seconds = validation_seconds + REPORT_SECONDS  # evaluating the best model, writing the report
    spent = clock() - started
    # Earlier phases have a fixed length (gradual: --freeze-epochs of head only): their difference
    # from the last phase's epochs is a fixed cost (negative when they are faster).
    earlier = sum(phase.epochs * (step_times[index][0] - seconds_per_step) * steps_per_epoch
                  for index, phase in enumerate(setup.phases[:-1]))
    min_epochs = config.freeze_epochs + 1 if config.strategy == "gradual" else 1
    choice = choose_epochs(seconds_per_step, steps_per_epoch, eval_seconds, budget_seconds,
                           fixed_overhead=spent + final_seconds + earlier, min_epochs=min_epochs)
    record = {
        "budget": budget_text,
        "budget_seconds": budget_seconds,
        "seconds_per_step": seconds_per_step,  # in the last phase
        "seconds_per_step_by_phase": {phase.name: step for phase, (step, _) in zip(setup.phases, step_times)},
        "steps_per_epoch": steps_per_epoch,
        "validation_seconds": validation_seconds,
        "epoch_seconds": choice.epoch_seconds,  # estimated, training and validation
        "setup_seconds": spent,  # before the first epoch: data, model, measuring
        "final_seconds": final_seconds,  # estimated: the final evaluation and the report
        "epochs": choice.epochs,
        "predicted_seconds": choice.predicted_seconds,
        "explanation": choice.explanation,
        "spent_seconds": spent,  # updated after every epoch
        "stopped_for_time": False,
    }
    if size_choice is not None:  # the image size was left open and chosen for the budget
        record["image_size"] = size_choice.image_size
        record["image_size_explanation"] = size_choice.explanation
    record = distributed.broadcast_object(record)  # one plan for every process: rank 0's measurement
    config.epochs = record["epochs"]
    setup.phases = plan_phases(config)
    log.info("time budget %s: %s", budget_text, record["explanation"])
    return record


def _time_each_phase(setup: TrainingSetup, clock: Clock) -> list[tuple[float, float]]:
    """:func:`_time_train_steps` in each phase's trainable set (gradual: head only, then all),
    leaving the model in the first phase with its optimizer, as the run starts."""
    times = [_time_train_steps(setup, setup.optimizer, clock)]
    try:
        for phase in setup.phases[1:]:
            apply_phase(setup.model, phase, setup.anatomy)
            times.append(_time_train_steps(setup, build_optimizer(setup.model, phase, setup.config, setup.anatomy),
                                           clock))
    finally:
        if len(setup.phases) > 1:
            apply_phase(setup.model, setup.phases[0], setup.anatomy)
    return times


def _time_train_steps(setup: TrainingSetup, optimizer: torch.optim.Optimizer, clock: Clock) -> tuple[float, float]:
    """(median seconds per step, extra seconds of the first step) over up to PROBE_STEPS real steps,
    which are then undone: weights, BatchNorm statistics, optimizer state and RNG restored."""
    model = setup.model
    saved_model = {name: value.detach().clone() for name, value in model.state_dict().items()}
    saved_optimizer = _clone(optimizer.state_dict())
    saved_rng = capture_rng_state()  # drawing batches seeds the loader and, with no workers, the augmentation
    set_train_mode(model)
    marks = [clock()]
    try:
        for images, labels in _first_batches(setup.train_loader, PROBE_STEPS):
            images = images.to(setup.device, non_blocking=True)
            labels = labels.to(setup.device, non_blocking=True)
            # No gradient scaler: a step's time does not depend on it, and the step is undone anyway.
            train_step(model, images, labels, optimizer, setup.loss_fn, precision=setup.precision,
                       batch_mixer=setup.batch_mixer, grad_clip=setup.config.grad_clip)
            _wait_for(setup.device)
            marks.append(clock())
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        optimizer.zero_grad(set_to_none=True)
        restore_rng_state(saved_rng)
    return _step_time(marks)


@torch.no_grad()
def _time_val_batches(setup: TrainingSetup, clock: Clock) -> tuple[float, float]:
    """(median seconds per validation batch, extra seconds of the first), as evaluate runs them."""
    model = setup.model
    saved_rng = capture_rng_state()
    model.eval()
    marks = [clock()]
    try:
        for images, _ in _first_batches(setup.val_loader, PROBE_VAL_BATCHES):
            with autocast(setup.device, EVAL_PRECISION):
                model(images.to(setup.device, non_blocking=True))
            _wait_for(setup.device)
            marks.append(clock())
    finally:
        restore_rng_state(saved_rng)
    return _step_time(marks)


def _first_batches(loader, count: int):
    for index, batch in enumerate(loader):
        if index == count:
            return
        yield batch


def _step_time(marks: list[float]) -> tuple[float, float]:
    intervals = [later - earlier for earlier, later in zip(marks, marks[1:])]
    if not intervals:
        return 0.0, 0.0
    typical = statistics.median(intervals[1:] or intervals)
    return typical, max(0.0, intervals[0] - typical)


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: time the work, not its launch
        torch.cuda.synchronize(device)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return value


class BudgetWatch:
    """The hard stop: after each epoch, stop if another epoch and the final evaluation would end
    the run more than the tolerance past the budget. Keeps ``state.budget["spent_seconds"]`` current."""

    def __init__(self, state: TrainingState, clock: Clock, started: float):
        self.state, self.clock = state, clock
        self.started = started  # the clock's reading when this run (or this resume of it) began
        self.spent_before = 0.0
        self.last_mark = started

    def start(self) -> bool:
        """Called once before the epoch loop; True when the run already stopped for time."""
        record = self.state.budget
        # Resumed (an epoch is done): the time spent before the interruption counts against the budget.
        self.spent_before = record["spent_seconds"] if self.state.epoch else 0.0
        self.last_mark = self.clock()
        return bool(record.get("stopped_for_time"))

    def epoch_done(self) -> bool:
        """After an epoch: record the time spent; True when the run must stop now."""
        record, now = self.state.budget, self.clock()
        last_epoch = now - self.last_mark
        self.last_mark = now
        # Under torchrun every process must stop after the same epoch: rank 0's clock decides.
        spent, last_epoch = distributed.broadcast_object((self.spent_before + (now - self.started), last_epoch))
        record["spent_seconds"] = spent
        # The next epoch is assumed as slow as the slower of the last one and the plan's estimate.
        next_epoch = max(last_epoch, record["epoch_seconds"])
        if self.state.epoch >= record["epochs"] or not time_is_up(spent, next_epoch, record["final_seconds"],
                                                                  record["budget_seconds"]):
            return False
        record["stopped_for_time"] = True
        log.info("time budget %s: stopping after epoch %d of %d: %.0f s spent, another epoch (~%.0f s) would end "
                 "the run past the %.0f s budget", record["budget"], self.state.epoch, record["epochs"], spent,
                 next_epoch, record["budget_seconds"])
        return True

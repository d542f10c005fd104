"""Training: ``train(config)`` runs a whole fine-tuning job into a run folder; ``resume(run_dir)``
continues one; :func:`fit` is the epoch loop between them.

The story is linear, as in torchvision's reference script: config -> :func:`build_training`
(data, model, optimizer) -> resume state if any -> epoch loop (phase switch, train, evaluate,
keep the best weights, save ``last.ckpt``) -> final evaluation of the best model -> report.
Everything that must survive an interruption is one :class:`~visiontune.training.state.TrainingState`
plus the live objects' states, written to ``last.ckpt`` each epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from visiontune import distributed
from visiontune.config import TrainConfig, config_from_dict, validate
from visiontune.data.sources import is_local_path
from visiontune.device import EVAL_PRECISION, out_of_memory_error
from visiontune.errors import CheckpointError, ConfigError
from visiontune.run.folder import (LAST_CHECKPOINT, capture_rng_state, check_run_dir, default_run_dir,
                                   discard_unfinished_run, load_training_state, prepare_run_dir, restore_rng_state,
                                   save_best_weights, save_training_state, write_metrics_csv, write_run_header)
from visiontune.training.ema import WeightAverage, make_weight_average
from visiontune.training.budget import parse_budget
from visiontune.training.budget_plan import BudgetWatch, Clock, choose_size_for_budget, plan_budget
from visiontune.training.final_artifacts import TensorBoardLog, write_final_artifacts
from visiontune.training.loops import (EpochStats, Evaluation, NonFiniteLossError, evaluate, require_finite,
                                       train_one_epoch)
from visiontune.training.lr_finder import REFERENCE_LR, lr_find_for_setup
from visiontune.training.phase_inputs import PhaseInputs
from visiontune.training.schedule import build_schedule
from visiontune.training.setup import TrainingSetup, build_training, is_weights_file
from visiontune.training.state import ResumePoint, TrainingState
from visiontune.training.strategies import apply_phase, build_optimizer, describe_groups, phase_index_for_epoch
from visiontune.training.tracking import start_tracking

log = logging.getLogger(__name__)

# Settings that may change when resuming: where and how fast it runs, and how long or patient it is.
RESUME_OVERRIDABLE = ("epochs", "patience", "workers", "device")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during the epoch loop; ``run_dir`` is the folder ``--resume`` continues."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


class Reporter(Protocol):
    """Where progress goes (the CLI draws a bar and prints lines; the library default only logs)."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int, phase: str) -> None: ...

    def advance(self, images: int) -> None: ...

    def end_epoch(self, row: dict) -> None: ...


class LogReporter:
    """The default: one log line per epoch, nothing per batch."""

    def start_epoch(self, epoch: int, epochs: int, num_batches: int, phase: str) -> None:
        pass

    def advance(self, images: int) -> None:
        pass

    def end_epoch(self, row: dict) -> None:
        log.info("epoch %s: train loss %.4f, val acc %.4f", row["epoch"], row["train_loss"], row["val_acc"])


@dataclass
class TrainResult:
    """What a finished run achieved; ``model`` holds the best weights (by validation accuracy)."""

    run_dir: Path
    best_accuracy: float
    best_epoch: int
    epochs_completed: int
    stopped_early: bool
    metrics: dict  # the best model's final validation metrics (ClassificationMetrics.compute())
    history: list[dict] = field(default_factory=list)  # the rows of metrics.csv
    model: torch.nn.Module | None = None


def train(config: TrainConfig, *, overwrite: bool = False, reporter: Reporter | None = None,
          clock: Clock = time.monotonic, started: float | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data`` into the run folder ``config.out``
    (default: ``runs/<model>-<timestamp>``, in ``TrainResult.run_dir``). ``config`` itself is left
    as it was: the run works on a resolved copy, which it saves as the run's config.yaml.
    With ``config.budget`` the run chooses ``epochs`` itself; ``clock`` (seconds) times it from
    ``started`` (a reading of ``clock``; default: now; the CLI's is when the command began).

    Under torchrun every process calls this, and they form one process group for the call."""
    with distributed.session():
        return _train(config, overwrite=overwrite, reporter=reporter, clock=clock,
                      started=clock() if started is None else started)


def _train(config: TrainConfig, *, overwrite: bool, reporter: Reporter | None, clock: Clock,
           started: float) -> TrainResult:
    config = validate(dataclasses.replace(config))  # validate() coerces in place: the caller's object stays
    budget_seconds = parse_budget(config.budget) if config.budget is not None else None
    if config.out is None:
        config.out = distributed.broadcast_object(str(default_run_dir(config.model)))  # rank 0's timestamp
    # Absolute paths in the saved config, so that --resume works from any directory.
    for name in ("data", "val_data"):  # shard URLs and hf: names stay as given
        if is_local_path(getattr(config, name)):
            setattr(config, name, str(Path(getattr(config, name)).expanduser().absolute()))
    if is_weights_file(config.weights):
        config.weights = str(Path(config.weights).expanduser().absolute())
    run_dir = Path(config.out)
    # Refuse an existing folder before spending time on data and model; create it only once they work.
    # The main process decides, so no process mistakes the folder another has just created.
    distributed.on_main_process(check_run_dir, run_dir, overwrite=overwrite)
    auto_lr = config.lr == "auto"
    if auto_lr:
        config.lr = REFERENCE_LR  # the groups are built at this rate; the finder scales them together
    setup = build_training(config)
    if auto_lr:
        _apply_lr_finder(setup)
    state = TrainingState()
    if budget_seconds is not None:  # chooses setup.config.epochs, so before config.yaml is written
        size_choice = None
        if config.image_size is None:  # left open: the budget chooses it too
            size_choice = choose_size_for_budget(setup, budget_seconds, clock, started)
            config.image_size = size_choice.image_size
            if size_choice.image_size != setup.preprocessing.crop_size:
                setup = build_training(config)
        state.budget = plan_budget(setup, config.budget, budget_seconds, clock, started, size_choice)
    distributed.on_main_process(prepare_run_dir, run_dir, overwrite=overwrite)
    try:
        write_run_header(run_dir, setup.config, setup.classes, setup.preprocessing)
        budget = BudgetWatch(state, clock, started) if state.budget else None
        return fit(setup, state, run_dir, reporter or LogReporter(), budget=budget)
    except KeyboardInterrupt:
        if state.epoch == 0:  # nothing worth resuming: leave no half-made folder to block a rerun
            discard_unfinished_run(run_dir)
        raise


def resume(run_dir: str | Path, *, overrides: dict | None = None, reporter: Reporter | None = None,
           clock: Clock = time.monotonic, started: float | None = None) -> TrainResult:
    """Continue ``run_dir`` from ``last.ckpt`` with its saved configuration. A budgeted run keeps
    the epochs chosen at its start and its budget, less the time spent before; ``epochs`` in
    ``overrides`` replaces that choice, and then the budget no longer applies."""
    with distributed.session():
        return _resume(Path(run_dir), overrides=overrides, reporter=reporter, clock=clock,
                       started=clock() if started is None else started)


def _resume(run_dir: Path, *, overrides: dict | None, reporter: Reporter | None, clock: Clock,
            started: float) -> TrainResult:
    # The main process reads last.ckpt first, so a missing or broken one stops every process alike.
    checkpoint = distributed.main_process_first(load_training_state, run_dir)
    state, saved = TrainingState.from_checkpoint(checkpoint, run_dir / LAST_CHECKPOINT)
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
    if refused:
        raise ConfigError(f"--resume continues with the run's saved configuration; only "
                          f"{', '.join(RESUME_OVERRIDABLE)} may change (got {', '.join(refused)}); "
                          "start a new run to change the others")
    config = config_from_dict({**saved.config, **overrides})
    config.out = str(run_dir)
    if state.budget and "epochs" in overrides:
        log.info("--epochs %d replaces the epochs the time budget chose; the budget no longer applies", config.epochs)
        config.budget, state.budget = None, {**state.budget, "replaced_by_epochs": config.epochs}
    setup = build_training(config)
    if state.phase != 0:
        _enter_phase(setup, state.phase)
    setup.model.load_state_dict(saved.model)
    setup.optimizer.load_state_dict(saved.optimizer)
    restore_rng_state(saved.rng)
    if config.ema > 0 and saved.ema is None:
        raise CheckpointError(f"{run_dir / LAST_CHECKPOINT} has no EMA weights although the run uses --ema "
                              f"{config.ema}; it was not written whole by 'visiontune train'; start a new run")
    log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, config.epochs)
    budget = BudgetWatch(state, clock, started) if config.budget is not None and state.budget else None
    return fit(setup, state, run_dir, reporter or LogReporter(), scaler_state=saved.scaler, ema_state=saved.ema,
               budget=budget)


def _enter_phase(setup: TrainingSetup, phase_index: int) -> None:
    phase = setup.phases[phase_index]
    apply_phase(setup.model, phase, setup.anatomy)
    setup.optimizer = build_optimizer(setup.model, phase, setup.config, setup.anatomy)
    log.info("phase %s: %s", phase.name, describe_groups(setup.optimizer))


def fit(setup: TrainingSetup, state: TrainingState, run_dir: Path, reporter: Reporter, *,
        scaler_state: dict | None = None, ema_state: dict | None = None,
        budget: BudgetWatch | None = None) -> TrainResult:
    """Run the remaining epochs of ``state`` (advancing it), then evaluate the best model and write
    the report. ``scaler_state`` and ``ema_state`` are a resumed run's saved GradScaler state
    (fp16 only) and weight average (``--ema`` only); ``budget`` stops the loop after an epoch when
    the next would overrun the time budget."""
    config, model = setup.config, setup.model
    steps_per_epoch = len(setup.train_loader)
    scaler = make_scaler(setup)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    ema = make_weight_average(model, config.ema)
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    tensorboard = TensorBoardLog(run_dir)
    tracker = start_tracking(config, run_dir, resumed=state.epoch > 0)  # --track mlflow; rank 0 only
    loop_done = False
    # Which model and loaders each epoch uses: a phase that trains only the head on a frozen
    # backbone trains it on features computed once (visiontune.features.extract).
    phase_inputs = PhaseInputs(setup, earlier_plans=state.feature_cache)  # a resume keeps its K views
    # Recomputed rather than read back, so a resume with a larger --patience can continue.
    stopped_early = 0 < config.patience <= state.epochs_without_improvement
    out_of_time = budget is not None and budget.start()
    try:
        while state.epoch < config.epochs and not stopped_early and not out_of_time:
            epoch = state.epoch
            phase_index = phase_index_for_epoch(setup.phases, epoch)
            if phase_index != state.phase:
                # New phase: new trainable set, fresh optimizer and a new warmup+cosine.
                _enter_phase(setup, phase_index)
                state.phase, state.phase_start_step = phase_index, state.step
            phase = setup.phases[phase_index]
            schedule = build_schedule(steps_per_epoch, phase.epochs, config.warmup_epochs)
            reporter.start_epoch(epoch + 1, config.epochs, steps_per_epoch, phase.name)
            inputs = phase_inputs.for_epoch(phase_index, epoch)  # also sets the sampler's epoch
            if ema is not None:
                ema.follow(inputs.model, setup.anatomy)  # the head alone when it trains on cached features
            stats = train_one_epoch(
                distributed.ddp_view(inputs.model, setup.device),  # DDP under torchrun, else the model itself
                inputs.train_loader, setup.optimizer, setup.loss_fn, setup.device,
                schedule=schedule, first_step=state.step - state.phase_start_step,
                precision=setup.precision, scaler=scaler, batch_mixer=setup.batch_mixer,
                grad_clip=config.grad_clip, on_batch=reporter.advance, ema=ema, task=setup.task)
            distributed.sync_buffers_from_main(model)  # BN statistics: every process evaluates rank 0's model
            evaluation = evaluate(inputs.model, inputs.val_loader, setup.device, setup.classes,
                                  precision=EVAL_PRECISION, task=setup.task)
            require_finite(evaluation.metrics["loss"], "validation loss")  # before anything is saved
            ema_evaluation = _evaluate_average(ema, setup, inputs)
            state.feature_cache.update(phase_inputs.plans)
            row = _metrics_row(epoch + 1, phase.name, stats, evaluation.metrics, evaluation.seconds)
            selection = setup.task.selection_metric  # accuracy, or mAP for multi-label
            if ema_evaluation is not None:
                row["val_acc_ema"] = ema_evaluation.metrics["accuracy"]
                if selection != "accuracy":
                    row["val_map_ema"] = ema_evaluation.metrics[selection]
                row["seconds"] += ema_evaluation.seconds
            state.step += stats.steps
            state.epoch = epoch + 1
            state.train_seconds += row["seconds"]
            state.history.append(row)
            # The better of the model and its average this epoch (the model on a tie: it needs no --ema to reproduce).
            candidate, accuracy, kept = model, evaluation.metrics[selection], "model"
            if ema_evaluation is not None and ema_evaluation.metrics[selection] > accuracy:
                candidate, accuracy, kept = ema.model, ema_evaluation.metrics[selection], "ema"
            if accuracy > state.best_accuracy:
                state.best_accuracy, state.best_epoch, state.best_weights = accuracy, epoch + 1, kept
                state.epochs_without_improvement = 0
                save_best_weights(run_dir, candidate)
            else:
                state.epochs_without_improvement += 1
            stopped_early = 0 < config.patience <= state.epochs_without_improvement
            state.stopped_early = stopped_early
            out_of_time = budget is not None and budget.epoch_done()  # before saving: last.ckpt keeps the time spent
            _save_state(run_dir, state, setup, scaler, ema)
            write_metrics_csv(run_dir, state.history)
            tensorboard.add_row(row)
            tracker.log_epoch(row)
            distributed.barrier()  # the checkpoints are complete before any process reads them
            reporter.end_epoch(row)
        loop_done = True
    except NonFiniteLossError as error:
        kept = (f"{run_dir}/last.ckpt and best.safetensors keep epoch {state.epoch}, the last good one"
                if state.epoch else "no epoch finished, so nothing was saved")
        raise NonFiniteLossError(f"epoch {state.epoch + 1}: {error}; {kept}") from None
    except torch.cuda.OutOfMemoryError as error:
        raise out_of_memory_error(error, config.batch_size) from None
    except KeyboardInterrupt:
        # info, not warning: the CLI prints its own one line about what was saved
        log.info("interrupted; %s/last.ckpt holds epoch %d", run_dir, state.epoch)
        raise TrainingInterrupted(run_dir) from None
    finally:
        tensorboard.close()
        if not loop_done:  # the exception on its way out says how the tracked run ended
            tracker.close("KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
    if stopped_early:
        log.info("stopped early after epoch %d: no better validation accuracy for %d epochs",
                 state.epoch, config.patience)
    try:
        metrics = write_final_artifacts(setup, state, run_dir)
        tracker.finish(run_dir, model)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    distributed.barrier()  # the run folder is complete when any process returns
    return TrainResult(run_dir=run_dir, best_accuracy=state.best_accuracy, best_epoch=state.best_epoch,
                       epochs_completed=state.epoch, stopped_early=stopped_early, metrics=metrics,
                       history=list(state.history), model=model)


def make_scaler(setup: TrainingSetup) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its gradients underflow otherwise); bf16 and fp32 do not."""
    return torch.amp.GradScaler(setup.device.type) if setup.precision.needs_scaler else None


def _save_state(run_dir: Path, state: TrainingState, setup: TrainingSetup, scaler,
                ema: WeightAverage | None) -> None:
    resume_point = ResumePoint(config=setup.config.to_dict(), model=setup.model.state_dict(),
                               optimizer=setup.optimizer.state_dict(), rng=capture_rng_state(),
                               scaler=None if scaler is None else scaler.state_dict(),
                               ema=None if ema is None else ema.state_dict())
    save_training_state(run_dir, state.to_checkpoint(resume_point))


def _evaluate_average(ema: WeightAverage | None, setup: TrainingSetup, inputs) -> Evaluation | None:
    """``--ema``: the averaged weights on the epoch's validation inputs (its head on cached
    features when the epoch trained the head alone), or None without --ema."""
    if ema is None:
        return None
    distributed.sync_buffers_from_main(ema.model)  # averaged BN statistics: rank 0's, as for the model
    evaluation = evaluate(ema.view_of(inputs.model, setup.anatomy), inputs.val_loader, setup.device,
                          setup.classes, precision=EVAL_PRECISION, task=setup.task)
    require_finite(evaluation.metrics["loss"], "validation loss of the EMA weights")
    return evaluation


def _metrics_row(epoch: int, phase: str, stats: EpochStats, val: dict, val_seconds: float) -> dict:
    if val.get("task") == "multilabel":  # accuracy: exact match; mAP chooses the best epoch
        return {"epoch": epoch, "phase": phase, "lr": stats.last_lr, "train_loss": stats.loss,
                "train_acc": stats.accuracy, "val_loss": val["loss"], "val_acc": val["accuracy"],
                "val_map": val["mAP"], "val_micro_f1": val["micro_f1"], "val_macro_f1": val["macro_f1"],
                "seconds": stats.seconds + val_seconds, "images_per_s": stats.images_per_second}
    return {"epoch": epoch, "phase": phase, "lr": stats.last_lr, "train_loss": stats.loss,
            "train_acc": stats.accuracy, "val_loss": val["loss"], "val_acc": val["accuracy"],
            "val_top5": val["top5"], "val_macro_f1": val["macro_f1"], "seconds": stats.seconds + val_seconds,
            "images_per_s": stats.images_per_second}


def _apply_lr_finder(setup: TrainingSetup) -> None:
    """``--lr auto``: run the range test with the run's own optimizer and use its suggestion."""
    config = setup.config
    result = lr_find_for_setup(setup, reference_lr=REFERENCE_LR)
    if result.suggestion is None:
        raise ConfigError("--lr auto: the LR finder found no usable learning rate; give --lr explicitly")
    config.lr = distributed.broadcast_object(float(result.suggestion))  # one rate for every process
    log.info("LR finder suggests lr %.3g (%s)", config.lr, result.method)
    setup.optimizer = build_optimizer(setup.model, setup.phases[0], config, setup.anatomy)

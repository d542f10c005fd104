"""One pass over the data: :func:`train_one_epoch` and :func:`evaluate`.

Both take the model and a loader and nothing else of the run, so a cached-feature loader with a
head-only model (frozen backbones) can be passed in unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from visiontune import distributed
from visiontune.device import Precision, autocast
from visiontune.errors import VisiontuneError
from visiontune.model.freeze import set_train_mode  # the BatchNorm rule lives with freezing
from visiontune.model.outputs import main_logits
from visiontune.training.ema import WeightAverage
from visiontune.training.schedule import Schedule, set_learning_rates
from visiontune.training.task import SINGLE_LABEL, SingleLabel

# torchvision's weights for the auxiliary classifiers' losses (GoogLeNet has two, Inception v3 one).
AUX_WEIGHT_ONE_HEAD = 0.4
AUX_WEIGHT_TWO_HEADS = 0.3
# Steps between checks that the running loss is finite: each check waits for the device, so not every step.
FINITE_CHECK_EVERY = 8


class NonFiniteLossError(VisiontuneError):
    """The loss became NaN or infinite: the weights are ruined, so the run stops (CLI exit status 2)."""


def require_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the {what} became {value} (not a finite number): the learning rate is probably too high for this "
            "model and data; lower --lr (and --head-lr), set --grad-clip 1.0, or use --precision fp32")


@dataclass
class EpochStats:
    loss: float  # mean training loss per image
    accuracy: float  # top-1 against the un-mixed labels, 0..1
    images: int
    steps: int
    seconds: float
    last_lr: float  # learning rate of the first parameter group at the last step

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def compute_loss(outputs, targets: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """``loss_fn`` on the logits, plus the auxiliary classifiers' losses where the model has them."""
    if isinstance(outputs, torch.Tensor):
        return loss_fn(outputs, targets)
    auxiliary = [value for name, value in outputs._asdict().items() if name != "logits" and value is not None]
    loss = loss_fn(outputs.logits, targets)
    if auxiliary:
        weight = AUX_WEIGHT_ONE_HEAD if len(auxiliary) == 1 else AUX_WEIGHT_TWO_HEADS
        loss = loss + weight * sum(loss_fn(aux, targets) for aux in auxiliary)
    return loss


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    *,
    precision: Precision = Precision(None),
    scaler: torch.amp.GradScaler | None = None,
    batch_mixer: Callable | None = None,
    grad_clip: float = 0.0,
) -> tuple[torch.Tensor, object]:
    """One optimiser step on one batch already on the device, at the optimizer's current rates:
    mix the batch (mixup/cutmix), forward under autocast, loss (auxiliary heads included),
    backward through the fp16 gradient scaler, clip, step.

    Training and the LR finder both take their steps here, so the finder sees the loss training
    will. Returns the (detached) loss and the model's outputs."""
    targets = labels
    if batch_mixer is not None:
        images, targets = batch_mixer(images, labels)
    with autocast(images.device, precision):
        outputs = model(images)
        loss = compute_loss(outputs, targets, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clipping below must see the true gradients
    else:
        loss.backward()
    if grad_clip > 0:
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), outputs


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    device: torch.device,
    *,
    schedule: Schedule,
    first_step: int = 0,
    precision: Precision = Precision(None),
    scaler: torch.amp.GradScaler | None = None,
    batch_mixer: Callable | None = None,
    grad_clip: float = 0.0,
    on_batch: Callable[[int], None] | None = None,
    ema: WeightAverage | None = None,
    task: SingleLabel = SINGLE_LABEL,
) -> EpochStats:
    """Train for one pass over ``loader``; ``first_step`` is the step within the schedule's phase.

    ``ema`` (``--ema``) folds the whole model's weights into its average after every optimiser
    step, also when ``model`` is only the head (cached features). ``on_batch(num_images)`` is
    called after every optimiser step (for a progress bar)."""
    set_train_mode(model)
    started = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    images_seen, steps, lr = 0, 0, 0.0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        set_learning_rates(optimizer, schedule, first_step + steps)
        lr = optimizer.param_groups[0]["lr"]
        loss, outputs = train_step(model, images, labels, optimizer, loss_fn, precision=precision, scaler=scaler,
                                   batch_mixer=batch_mixer, grad_clip=grad_clip)
        if ema is not None:
            ema.update()
        batch = labels.shape[0]
        loss_sum += loss.double() * batch
        correct += task.count_correct(main_logits(outputs).detach(), labels)
        images_seen += batch
        steps += 1
        if steps % FINITE_CHECK_EVERY == 0:
            require_finite(loss_sum.item(), f"training loss in step {steps} of the epoch")
        if on_batch is not None:
            on_batch(batch)
    require_finite(loss_sum.item(), "training loss")
    seconds = time.perf_counter() - started
    # Under torchrun: the whole epoch's numbers, over every process's shard.
    total_loss, total_correct, images_seen = distributed.sum_over_processes(
        loss_sum.item(), correct.item(), images_seen)
    images_seen = int(images_seen)
    count = max(1, images_seen)
    return EpochStats(loss=total_loss / count, accuracy=total_correct / count, images=images_seen,
                      steps=steps, seconds=seconds, last_lr=lr)


@dataclass
class Evaluation:
    metrics: dict  # ClassificationMetrics.compute(): loss, accuracy, top5, macro_f1, per_class, confusion
    # per image, loader order: (label, predicted, confidence, loss); multi-label: (targets, probabilities, loss)
    predictions: list[tuple]
    seconds: float


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    classes: list[str],
    *,
    precision: Precision = Precision(None),
    keep_predictions: bool = False,
    task: SingleLabel = SINGLE_LABEL,
) -> Evaluation:
    """Plain (unweighted, unsmoothed) loss and metrics over ``loader``: cross-entropy and
    ClassificationMetrics, or for a multi-label ``task`` binary cross-entropy and MultilabelMetrics."""
    model.eval()
    started = time.perf_counter()
    metrics = task.new_metrics(classes)
    predictions = []
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = main_logits(model(images))
        logits = logits.float()
        losses = task.update_metrics(metrics, logits, labels)
        if keep_predictions:
            predictions.append(task.prediction_rows(logits, labels, losses).cpu())
    predictions = torch.cat(predictions) if predictions else torch.zeros(0, 4, dtype=torch.float64)
    if distributed.world_size() > 1 and isinstance(getattr(loader, "sampler", None), distributed.ShardedSampler):
        # Each process saw its shard of the validation set: sum the metrics, gather the predictions.
        task.reduce_metrics(metrics, loader)
        if keep_predictions:
            predictions = distributed.all_gather_shards(predictions, len(loader.dataset))
    return Evaluation(metrics.compute(), task.as_predictions(predictions) if keep_predictions else [],
                      time.perf_counter() - started)

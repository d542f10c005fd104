"""What kind of classification a run trains, chosen once: :data:`SINGLE_LABEL` (one class per
image: cross-entropy, accuracy, ClassificationMetrics) or :class:`MultiLabel` (any number of
labels per image: binary cross-entropy per class, mAP, MultilabelMetrics).

The loops call the task for the loss-free parts of a step (how many training images were right,
per-image validation losses, the metrics object), so the same loops train both. Multi-label
labels arrive as int64 bit masks (:mod:`visiontune.data.multilabel`) and become 0/1 vectors here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from visiontune import distributed
from visiontune.data import build_batch_mixer
from visiontune.data.multilabel import multi_hot
from visiontune.errors import ConfigError
from visiontune.metrics import ClassificationMetrics
from visiontune.metrics_multilabel import MultilabelMetrics

log = logging.getLogger(__name__)


class SingleLabel:
    name = "single"
    selection_metric = "accuracy"  # what chooses best.safetensors

    def count_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == labels).sum()

    def new_metrics(self, classes: list[str]):
        return ClassificationMetrics(classes)

    def update_metrics(self, metrics, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add a batch (float32 logits); returns the per-image loss (plain cross-entropy)."""
        losses = F.cross_entropy(logits, labels, reduction="none")
        metrics.update(logits, labels, loss_sum=losses.sum())
        return losses

    def prediction_rows(self, logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(batch, 4) float64: label, predicted, confidence, loss."""
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        return torch.stack([labels.double(), predicted.double(), confidence.double(), losses.double()], dim=1)

    def as_predictions(self, rows: torch.Tensor) -> list:
        return [(int(label), int(predicted), confidence, loss) for label, predicted, confidence, loss in rows.tolist()]

    def reduce_metrics(self, metrics, loader) -> None:
        distributed.all_reduce_metrics(metrics)

    def build_loss(self, config, train_targets: list[int], num_classes: int) -> nn.Module:
        """Cross-entropy with label smoothing; ``balance`` weights each class by n / (k * count).

        Why a weighted loss rather than a balanced sampler: every image is still seen once per epoch
        (no duplicated minority images, no dropped majority ones), the epoch stays a fixed
        permutation that resumes exactly, and it shards unchanged across processes."""
        weight = None
        if config.balance:
            counts = torch.bincount(torch.tensor(train_targets, dtype=torch.long), minlength=num_classes).clamp(min=1)
            weight = (len(train_targets) / (num_classes * counts.double())).float()
            log.info("class weights: %s", [round(w, 3) for w in weight.tolist()])
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)

    def batch_mixer(self, num_classes: int, mixup: float, cutmix: float):
        return build_batch_mixer(num_classes, mixup, cutmix)


class MultiLabel(SingleLabel):
    name = "multilabel"
    selection_metric = "mAP"

    def __init__(self, num_classes: int, thresholds: list[float] | None = None):
        self.num_classes = num_classes
        self.thresholds = thresholds  # None: tuned on the images evaluated

    def count_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images whose every label is right at 0.5 (exact match)."""
        return ((logits > 0) == (multi_hot(labels, self.num_classes) > 0.5)).all(dim=1).sum()

    def new_metrics(self, classes: list[str]):
        return MultilabelMetrics(classes, self.thresholds)

    def update_metrics(self, metrics, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = multi_hot(labels, self.num_classes)
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
        metrics.update(logits, targets, losses)
        return losses

    def prediction_rows(self, logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(batch, 2 * classes + 1) float64: targets, probabilities, loss."""
        targets = multi_hot(labels, self.num_classes)
        return torch.cat([targets.double(), torch.sigmoid(logits.double()), losses.double()[:, None]], dim=1)

    def as_predictions(self, rows: torch.Tensor) -> list:
        n = self.num_classes
        return [(row[:n], row[n:2 * n], row[2 * n]) for row in rows.tolist()]

    def reduce_metrics(self, metrics, loader) -> None:
        metrics.load_rows(distributed.all_gather_shards(metrics.rows(), len(loader.dataset)))

    def build_loss(self, config, train_targets: list[int], num_classes: int) -> nn.Module:
        """Binary cross-entropy per class; ``balance`` weighs each class's positives by
        negatives / positives (torch's ``pos_weight``), so a rare label counts as much as a common one."""
        pos_weight = None
        if config.balance:
            positives = multi_hot(torch.tensor(train_targets, dtype=torch.long), num_classes).sum(dim=0)
            pos_weight = ((len(train_targets) - positives) / positives.clamp(min=1)).clamp(min=1e-3)
            log.info("positive weights per class: %s", [round(w, 3) for w in pos_weight.tolist()])
        return MultilabelLoss(num_classes, pos_weight, config.label_smoothing)

    def batch_mixer(self, num_classes: int, mixup: float, cutmix: float):
        build_batch_mixer(num_classes, mixup, cutmix)  # the same checks of the alphas
        return MultilabelMixer(num_classes, mixup, cutmix) if mixup > 0 or cutmix > 0 else None


SINGLE_LABEL = SingleLabel()


def task_for(name: str, num_classes: int) -> SingleLabel:
    if name == "multilabel":
        return MultiLabel(num_classes)
    if name == "single":
        return SINGLE_LABEL
    raise ConfigError(f"unknown task {name!r}; use single or multilabel")


class MultilabelLoss(nn.Module):
    """Mean binary cross-entropy with logits over images and classes. Targets: bit masks (N,) or
    0/1 / mixed vectors (N, classes). Label smoothing ``eps`` moves each target towards 1/2:
    ``y * (1 - eps) + eps / 2`` (each class is its own two-class problem)."""

    def __init__(self, num_classes: int, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            targets = multi_hot(targets, self.num_classes)
        targets = targets.to(logits.dtype)
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)


class MultilabelMixer:
    """Mixup / cutmix for label vectors: ``(images, masks) -> (mixed images, mixed 0/1 vectors)``.
    Each batch is mixed with itself rolled by one (as torchvision's v2.MixUp/CutMix), with one of
    the two chosen at random when both are on; the targets mix in the images' proportion."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float):
        self.num_classes = num_classes
        self.alphas = [("mixup", mixup)] * (mixup > 0) + [("cutmix", cutmix)] * (cutmix > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = multi_hot(labels, self.num_classes) if labels.ndim == 1 else labels.float()
        kind, alpha = self.alphas[int(torch.randint(len(self.alphas), ()))]
        share = float(torch.distributions.Beta(alpha, alpha).sample())  # of the image itself
        rolled = images.roll(1, 0)
        if kind == "mixup":
            images = images * share + rolled * (1 - share)
        else:
            height, width = images.shape[-2:]
            cut_h, cut_w = int(height * (1 - share) ** 0.5), int(width * (1 - share) ** 0.5)
            top, left = int(torch.randint(height - cut_h + 1, ())), int(torch.randint(width - cut_w + 1, ()))
            images = images.clone()
            images[..., top:top + cut_h, left:left + cut_w] = rolled[..., top:top + cut_h, left:left + cut_w]
            share = 1 - cut_h * cut_w / (height * width)
        return images, targets * share + targets.roll(1, 0) * (1 - share)

"""Multi-label metrics through torchmetrics: mAP (macro), per-class AP, micro and macro F1,
precision and recall at per-class thresholds, and the thresholds themselves.

Average precision needs every score, not sums, so :class:`MultilabelMetrics` keeps one row per
image (targets, probabilities, loss); validation sets are small enough (N x classes floats).
Distributed evaluation gathers the rows (:meth:`rows` / :meth:`load_rows`) instead of summing.

Thresholds: given (a trained run's, from ``thresholds.json``) they are used as they are; when
not, each class's threshold is tuned to maximise its F1 on these very images
(:func:`tune_thresholds`), which is what a run does on its validation set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F



def _torchmetrics():
    """torchmetrics' classification functions. Imported at the first metric, not with this module:
    importing torchmetrics imports matplotlib, which must come after run/plots.py has pointed
    MPLCONFIGDIR into visiontune's cache (else a first run writes matplotlib's font cache to ~/.cache)."""
    from torchmetrics.functional import classification
    return classification


DEFAULT_THRESHOLD = 0.5  # for a class whose validation images hold no positive, nothing to tune on


class MultilabelMetrics:
    """``update(logits, targets)`` per batch (targets: (batch, classes) 0/1), then ``compute()``."""

    def __init__(self, classes: Sequence[str], thresholds: Sequence[float] | None = None):
        self.classes = [str(name) for name in classes]
        self.num_classes = len(self.classes)
        if thresholds is not None and len(thresholds) != self.num_classes:
            raise ValueError(f"{len(thresholds)} thresholds for {self.num_classes} classes")
        self.thresholds = None if thresholds is None else [float(value) for value in thresholds]
        self._rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """``losses``: per-image loss (batch,); default: BCE of ``logits``, mean over classes."""
        self.update_probabilities(torch.sigmoid(logits.double()), targets, losses if losses is not None else
                                  F.binary_cross_entropy_with_logits(logits.double(), targets.double(),
                                                                     reduction="none").mean(dim=1))

    @torch.no_grad()
    def update_probabilities(self, probabilities: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> None:
        if probabilities.shape != targets.shape or probabilities.shape[1:] != (self.num_classes,):
            raise ValueError(f"expected (batch, {self.num_classes}) scores and targets, got "
                             f"{tuple(probabilities.shape)} and {tuple(targets.shape)}")
        self._rows.append(torch.cat([targets.double(), probabilities.double(), losses.double().reshape(-1, 1)],
                                    dim=1).cpu())

    def rows(self) -> torch.Tensor:
        """(images, 2 * classes + 1) float64: targets, probabilities, loss."""
        return torch.cat(self._rows) if self._rows else torch.zeros(0, 2 * self.num_classes + 1, dtype=torch.float64)

    def load_rows(self, rows: torch.Tensor) -> None:
        self._rows = [rows.detach().to("cpu", torch.float64)]

    @property
    def num_images(self) -> int:
        return int(self.rows().shape[0])

    def compute(self) -> dict:
        """loss, mAP, micro_f1, macro_f1, accuracy (exact match), per_class (ap, precision, recall,
        f1, threshold, support), thresholds, num_images; top5 is None (not a multi-label measure)."""
        rows = self.rows()
        count, n = rows.shape[0], self.num_classes
        targets, scores, losses = rows[:, :n].round().long(), rows[:, n:2 * n], rows[:, 2 * n]
        thresholds = self.thresholds if self.thresholds is not None else tune_thresholds(scores, targets)
        empty = {"loss": 0.0, "accuracy": 0.0, "top5": None, "mAP": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
        if count == 0:
            return {**empty, "per_class": {}, "thresholds": thresholds, "num_images": 0, "task": "multilabel"}
        predicted = (scores >= torch.tensor(thresholds, dtype=scores.dtype)).long()
        support = targets.sum(dim=0)
        ap = average_precision_per_class(scores, targets)
        # Predictions are already 0/1 at the per-class thresholds: torchmetrics' 0.5 then keeps them.
        tm = _torchmetrics()

        def at_thresholds(metric, average):
            return metric(predicted, targets, num_labels=n, average=average, zero_division=0)

        precision, recall = at_thresholds(tm.multilabel_precision, None), at_thresholds(tm.multilabel_recall, None)
        f1 = at_thresholds(tm.multilabel_f1_score, None)
        present = [value for value in ap if value is not None]
        # As single-label macro F1: over the classes that occur in the targets or the predictions.
        occurring = (support > 0) | (predicted.sum(dim=0) > 0)
        return {
            "loss": float(losses.mean()),
            "accuracy": float(tm.multilabel_exact_match(predicted, targets, num_labels=n)),
            "top5": None,
            "mAP": sum(present) / len(present) if present else 0.0,
            "micro_f1": float(at_thresholds(tm.multilabel_f1_score, "micro")),
            "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
            "per_class": {name: {"ap": ap[i], "precision": float(precision[i]), "recall": float(recall[i]),
                                 "f1": float(f1[i]), "threshold": thresholds[i], "support": int(support[i])}
                          for i, name in enumerate(self.classes)},
            "thresholds": thresholds,
            "num_images": count,
            "task": "multilabel",
        }


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """AP of each class (torchmetrics); None for a class with no positive image (AP is undefined)."""
    present = (targets.sum(dim=0) > 0).nonzero().flatten().tolist()
    values: list[float | None] = [None] * targets.shape[1]
    if present:
        computed = _torchmetrics().multilabel_average_precision(scores[:, present], targets[:, present],
                                                                num_labels=len(present), average=None)
        for index, value in zip(present, computed.reshape(-1).tolist()):
            values[index] = float(value)
    return values


def tune_thresholds(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the threshold that maximises its F1 on these images (predicted: score >= threshold):
    halfway between the lowest score kept and the next lower one, so that the same images are
    predicted while a slightly lower score elsewhere is not cut by chance."""
    num_classes = targets.shape[1]
    thresholds = [DEFAULT_THRESHOLD] * num_classes
    present = (targets.sum(dim=0) > 0).nonzero().flatten().tolist()
    if not present or scores.shape[0] == 0:
        return thresholds
    precision, recall, cuts = _torchmetrics().multilabel_precision_recall_curve(
        scores[:, present], targets[:, present], num_labels=len(present))
    for index, p, r, t in zip(present, precision, recall, cuts):
        p, r = p[:-1].double(), r[:-1].double()  # the last point (recall 0) has no threshold
        f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))
        best = int(torch.argmax(f1))  # the first maximum: the lowest such threshold, ascending order
        below = float(t[best - 1]) if best > 0 else 0.0
        thresholds[index] = (below + float(t[best])) / 2
    return thresholds


def precision_recall_curves(scores: torch.Tensor, targets: torch.Tensor,
                            classes: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """``{class: (recall, precision)}`` for the classes with a positive image (torchmetrics)."""
    present = (targets.sum(dim=0) > 0).nonzero().flatten().tolist()
    if not present:
        return {}
    precision, recall, _ = _torchmetrics().multilabel_precision_recall_curve(
        scores[:, present], targets[:, present].long(), num_labels=len(present))
    return {classes[index]: (r.tolist(), p.tolist()) for index, p, r in zip(present, precision, recall)}

"""Classification metrics accumulated batch by batch: loss, top-1, top-5, per-class
precision/recall/F1, macro-F1 and the confusion matrix.

All the state lives in ONE float64 tensor (confusion counts, loss sum, top-5 hits, image count),
every entry of which is a plain sum over images. Distributed training can therefore
``all_reduce(SUM)`` :meth:`ClassificationMetrics.state_tensor` across processes, load the result
with :meth:`~ClassificationMetrics.load_state_tensor`, and get exactly the metrics one process
would have computed on all the images. float64 holds integer counts exactly up to 2**53.

Undefined ratios are defined as 0, never NaN: precision of a class that was never predicted,
recall of a class with no images, F1 when precision + recall is 0, and every ratio when no image
was seen. Macro-F1 averages over the classes that occur in the targets or the predictions (as
scikit-learn's ``f1_score(average="macro")`` does), so evaluating on a folder that holds only
some of the classes is not dragged down by classes that were never there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

TOP_K = 5  # top-5 accuracy is reported only when there are more classes than this

# Layout of the state tensor after the flattened confusion matrix.
_LOSS_SUM, _TOP5_HITS, _COUNT = 0, 1, 2
_EXTRA = 3


class ClassificationMetrics:
    """Accumulates classification metrics over batches of logits.

    ``ClassificationMetrics(["cat", "dog"])``; ``ClassificationMetrics(2)`` names the classes
    "0", "1"; ``ClassificationMetrics(2, ["cat", "dog"])`` is also accepted.
    """

    def __init__(self, classes: Sequence[str] | int, class_names: Sequence[str] | None = None):
        if isinstance(classes, int):
            names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
            if len(names) != classes:
                raise ValueError(f"{classes} classes but {len(names)} class names")
        else:
            names = list(classes)
        if not names:
            raise ValueError("ClassificationMetrics needs at least one class")
        self.classes: list[str] = [str(name) for name in names]
        self.num_classes = len(self.classes)
        self._state = torch.zeros(self.num_classes * self.num_classes + _EXTRA, dtype=torch.float64)

    # -- accumulation -------------------------------------------------------------------------

    def reset(self) -> None:
        self._state.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float | None = None) -> None:
        """Add one batch.

        ``logits``: (batch, num_classes). ``targets``: class indices (batch,); soft targets
        (batch, num_classes), e.g. from mixup, count as their arg-max class. ``loss_sum``: the
        batch's loss summed over its images (not averaged); when omitted, the cross-entropy of
        ``logits`` against ``targets`` is used.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (batch, {self.num_classes}), got {tuple(logits.shape)}")
        if targets.ndim == 2:
            targets = targets.argmax(dim=1)
        targets = targets.long()
        if loss_sum is None:
            loss_sum = float(F.cross_entropy(logits.double(), targets, reduction="sum"))
        elif isinstance(loss_sum, torch.Tensor):
            loss_sum = float(loss_sum.detach())
        predicted = logits.argmax(dim=1)
        pairs = (targets * self.num_classes + predicted).cpu()
        confusion = torch.bincount(pairs, minlength=self.num_classes * self.num_classes)
        self._state[: self.num_classes**2] += confusion.to(torch.float64)
        if self.num_classes > TOP_K:
            top = logits.topk(TOP_K, dim=1).indices
            self._state[-_EXTRA + _TOP5_HITS] += float((top == targets[:, None]).any(dim=1).sum())
        self._state[-_EXTRA + _LOSS_SUM] += float(loss_sum)
        self._state[-_EXTRA + _COUNT] += float(targets.numel())

    # -- distributed reduction ----------------------------------------------------------------

    def state_tensor(self) -> torch.Tensor:
        """A copy of the whole state: a float64 vector whose entries are all sums over images."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the state, e.g. with the ``all_reduce(SUM)`` of every process's state_tensor()."""
        if state.numel() != self._state.numel():
            raise ValueError(f"state has {state.numel()} entries, expected {self._state.numel()}")
        self._state = state.detach().to("cpu", torch.float64).reshape(-1).clone()

    # -- results --------------------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return int(self._state[-_EXTRA + _COUNT])

    def confusion(self) -> torch.Tensor:
        """Counts as int64, rows = true class, columns = predicted class."""
        n = self.num_classes
        return self._state[: n * n].reshape(n, n).round().long()

    def compute(self) -> dict:
        """Loss (mean per image), accuracy, top5 (None with <= 5 classes), macro_f1, per_class,
        confusion (list of lists, rows = true class) and num_images. Ratios are in 0..1."""
        confusion = self.confusion().to(torch.float64)
        count = self._state[-_EXTRA + _COUNT].item()
        true_positives = confusion.diag()
        support = confusion.sum(dim=1)
        predicted = confusion.sum(dim=0)
        precision = _safe_divide(true_positives, predicted)
        recall = _safe_divide(true_positives, support)
        f1 = _safe_divide(2 * precision * recall, precision + recall)
        present = (support > 0) | (predicted > 0)
        macro_f1 = float(f1[present].mean()) if present.any() else 0.0
        top5 = None
        if self.num_classes > TOP_K:
            top5 = self._state[-_EXTRA + _TOP5_HITS].item() / count if count else 0.0
        return {
            "loss": self._state[-_EXTRA + _LOSS_SUM].item() / count if count else 0.0,
            "accuracy": true_positives.sum().item() / count if count else 0.0,
            "top5": top5,
            "macro_f1": macro_f1,
            "per_class": {
                name: {
                    "precision": precision[i].item(),
                    "recall": recall[i].item(),
                    "f1": f1[i].item(),
                    "support": int(support[i]),
                }
                for i, name in enumerate(self.classes)
            },
            "confusion": self.confusion().tolist(),
            "num_images": int(count),
        }


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Element-wise numerator / denominator, 0 where the denominator is 0 (never NaN)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))

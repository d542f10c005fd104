"""Using a finished run: classify image files, or measure the model on a labelled folder.

Both work on a :class:`visiontune.run.loaded.LoadedRun` (``load_run(RUN)``) and prepare images exactly
as the run's validation did: ``load_image`` then the evaluation transform of the run's saved
preprocessing. Unreadable images never stop the work; they are returned as ``(path, reason)``.

Under torchrun, ``across_processes=True`` (what the commands pass) splits the work by whole
batches (:func:`visiontune.distributed.shard_batches`): each process runs its batches, metrics are
summed and predictions gathered, and every process returns the whole result, equal to one
process's. Every process must then make the same call; the default (False) never communicates,
so rank 0 alone may call these functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from visiontune import distributed
from visiontune.data import build_eval_transform, load_image, scan_labelled
from visiontune.data.datasets import VAL_DIRS, list_images
from visiontune.data.multilabel import multi_hot, read_multilabel_rows
from visiontune.data.images import IMAGE_EXTENSIONS, prepared_batches
from visiontune.errors import DataError
from visiontune.metrics import ClassificationMetrics
from visiontune.metrics_multilabel import MultilabelMetrics
from visiontune.model.outputs import main_logits

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The model's answer for one image: the best label and the ``top_k`` (label, probability)."""

    path: str
    label: str
    score: float
    top_k: list[tuple[str, float]]
    labels: list[str] | None = None  # multi-label runs: every label at or above its threshold, best first

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "score": self.score,
            **({"labels": self.labels} if self.labels is not None else {}),
            "top_k": [{"label": label, "score": score} for label, score in self.top_k],
        }


@dataclass
class Evaluation:
    """Metrics (see :meth:`ClassificationMetrics.compute`) of a run on a labelled folder."""

    metrics: dict
    data: str  # the folder (or manifest) whose images were evaluated
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images: (path, reason)

    def to_dict(self) -> dict:
        return {**self.metrics, "data": self.data, "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the given folders, in the order given.

    A path that does not exist, or no image at all, raises DataError."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist; give image files or folders of images")
        found.extend(list_images(path))
    unique = list(dict.fromkeys(found))
    if not unique:
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"no images found in {names}; looked for the extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return unique


def predict_images(
    run, paths: Sequence[str | Path], top_k: int = 5, batch_size: int = 32, across_processes: bool = False,
    tta: bool = False,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify ``paths`` (image files) with the run's model; ``(predictions, skipped)`` in the
    order of ``paths``. ``tta``: see :func:`class_log_probabilities`; ``across_processes``: see the
    module docstring."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    top_k = min(top_k, len(run.classes))
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    paths = list(paths)
    multilabel = getattr(run, "task", "single") == "multilabel"
    for batch_paths, images in _image_batches(run, _share(paths, batch_size, across_processes), batch_size, skipped):
        if multilabel:
            probabilities = label_probabilities(run.model, images, tta=tta).float()
        else:
            probabilities = class_log_probabilities(run.model, images, tta=tta).exp().float()
        scores, indices = probabilities.topk(top_k, dim=1)
        for path, row_scores, row_indices, row in zip(batch_paths, scores.tolist(), indices.tolist(),
                                                      probabilities.double().tolist()):
            ranked = [(run.classes[i], score) for i, score in zip(row_indices, row_scores)]
            labels = None
            if multilabel:
                above = [i for i, (score, cut) in enumerate(zip(row, run.thresholds)) if score >= cut]
                labels = [run.classes[i] for i in sorted(above, key=lambda i: -row[i])]
            predictions.append(Prediction(str(path), ranked[0][0], ranked[0][1], ranked, labels))
    if across_processes:
        predictions = _gather_in_order(predictions, paths, lambda prediction: prediction.path)
        skipped = _gather_in_order(skipped, paths, lambda item: item[0])
    return predictions, skipped


def evaluate_run(run, data: str | Path, batch_size: int = 64, across_processes: bool = False,
                 tta: bool = False) -> Evaluation:
    """Metrics of the run's model on a labelled folder (``data/<class>/*``, or ``data/val/<class>/*``
    when ``data`` is a dataset root, or a CSV manifest). Class folders may be a subset of the
    run's classes; a class the model does not know is a DataError. ``tta``: see
    :func:`class_log_probabilities` (the loss is then that of the averaged probabilities);
    ``across_processes``: see the module docstring."""
    if getattr(run, "task", "single") == "multilabel":
        return _evaluate_multilabel(run, data, batch_size, across_processes, tta)
    samples = scan_labelled(data, list(run.classes))
    labels = {str(sample.path): sample.label for sample in samples}
    metrics = ClassificationMetrics(list(run.classes))
    skipped: list[tuple[str, str]] = []
    paths = [sample.path for sample in samples]
    for batch_paths, images in _image_batches(run, _share(paths, batch_size, across_processes), batch_size, skipped):
        targets = torch.tensor([labels[str(p)] for p in batch_paths])
        # Log-probabilities as logits: the same arg-max and top-5, and cross-entropy = -log p(label).
        metrics.update(class_log_probabilities(run.model, images, tta=tta).cpu(), targets)
    if across_processes:
        distributed.all_reduce_metrics(metrics)  # every process now holds the whole set's sums
        skipped = _gather_in_order(skipped, paths, lambda item: item[0])
    if metrics.num_images == 0:
        raise DataError(f"none of the {len(samples)} images in {data} could be read; first: {skipped[0][0]} ({skipped[0][1]})")
    return Evaluation(metrics.compute(), _evaluated_root(data, run.classes), skipped)


def _evaluate_multilabel(run, data: str | Path, batch_size: int, across_processes: bool, tta: bool) -> Evaluation:
    """mAP, micro/macro F1 and per-class AP, precision and recall at the run's thresholds, on a
    multi-label manifest (its val rows when it has a split column, else all)."""
    manifest = Path(data).expanduser().absolute()
    if not (manifest.is_file() and manifest.suffix.lower() == ".csv"):
        raise DataError(f"{manifest}: a multi-label run is evaluated on a CSV manifest ('path,labels' or 0/1 columns)")
    samples = read_multilabel_rows(manifest, list(run.classes))
    masks = {str(sample.path): sample.label for sample in samples}
    metrics = MultilabelMetrics(list(run.classes), run.thresholds)
    skipped: list[tuple[str, str]] = []
    paths = [sample.path for sample in samples]
    for batch_paths, images in _image_batches(run, _share(paths, batch_size, across_processes), batch_size, skipped):
        targets = multi_hot(torch.tensor([masks[str(p)] for p in batch_paths]), len(run.classes)).double()
        scores = label_probabilities(run.model, images, tta=tta).cpu()
        # Per-image loss: binary cross-entropy of the probabilities, mean over classes (as validation).
        losses = F.binary_cross_entropy(scores.clamp(1e-12, 1 - 1e-12), targets, reduction="none").mean(dim=1)
        metrics.update_probabilities(scores, targets, losses)
    if across_processes:
        if distributed.is_distributed():
            # Whole batches per process, gathered back in the order of ``paths``.
            parts = distributed.all_gather_objects(metrics.rows())
            metrics.load_rows(torch.cat(parts) if parts else metrics.rows())
        skipped = _gather_in_order(skipped, paths, lambda item: item[0])
    if metrics.num_images == 0:
        raise DataError(f"none of the {len(samples)} images in {data} could be read; first: {skipped[0][0]} ({skipped[0][1]})")
    return Evaluation(metrics.compute(), str(manifest), skipped)


def _share(paths: list, batch_size: int, across_processes: bool) -> list:
    """This process's whole batches of ``paths`` when sharing the work, else all of them."""
    if not across_processes:
        return paths
    return [paths[index] for index in distributed.shard_batches(len(paths), batch_size)]


def _gather_in_order(items: list, paths: Sequence, path_of: Callable[[object], str]) -> list:
    """Every process's ``items`` (each naming one of ``paths``), in the order of ``paths``."""
    if not distributed.is_distributed():
        return items
    position: dict[str, int] = {}
    for index, path in enumerate(paths):
        position.setdefault(str(path), index)
    gathered = [item for part in distributed.all_gather_objects(items) for item in part]
    return sorted(gathered, key=lambda item: position[path_of(item)])


def _image_batches(
    run, paths: list, batch_size: int, skipped: list[tuple[str, str]]
) -> Iterator[tuple[list, torch.Tensor]]:
    """Decode and transform images on threads; yield ``(paths, batch tensor)`` on the model's device.
    Unreadable files are appended to ``skipped``."""
    eval_transform = build_eval_transform(run.preprocessing)  # the run's validation's own transform
    device = _model_device(run.model)

    for good_paths, tensors in prepared_batches(lambda path: eval_transform(load_image(path)), paths, batch_size,
                                                skipped):
        yield good_paths, torch.stack(tensors).to(device)


@torch.inference_mode()
def class_log_probabilities(model: torch.nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Log-softmax probabilities (batch, classes) of ``model`` on a batch of images, in float64
    (what ClassificationMetrics computes its cross-entropy in), so that a confidently wrong image
    keeps its true loss instead of a probability that underflowed to 0.

    ``tta`` (test-time augmentation, ``--tta``): the log of the mean of the probabilities of each
    image and of its horizontal flip, the augmentation every training recipe here applies
    (``--augment basic`` flips at random). Costs a second forward pass."""
    log_probabilities = F.log_softmax(main_logits(model(images)).double(), dim=1)
    if not tta:
        return log_probabilities
    flipped = F.log_softmax(main_logits(model(images.flip(-1))).double(), dim=1)  # dim -1: width in NCHW
    # log((p + q) / 2) without leaving log space
    return torch.logaddexp(log_probabilities, flipped) - math.log(2.0)


@torch.inference_mode()
def label_probabilities(model: torch.nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Multi-label runs: each label's sigmoid probability (batch, classes) in float64; ``tta``
    averages them with those of the horizontal flip."""
    probabilities = torch.sigmoid(main_logits(model(images)).double())
    if not tta:
        return probabilities
    return (probabilities + torch.sigmoid(main_logits(model(images.flip(-1))).double())) / 2


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _evaluated_root(data: str | Path, classes: Sequence[str]) -> str:
    """The folder ``scan_labelled`` read: ``data`` itself, or its val/ folder for a dataset root."""
    root = Path(data).expanduser().absolute()
    val_dir = next((root / name for name in VAL_DIRS if (root / name).is_dir()), None)
    return str(val_dir if val_dir is not None and val_dir.name not in classes else root)

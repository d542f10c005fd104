"""Using a finished run: classify image files, or measure the model on a labelled folder.

Both work on a :class:`visiontune.run.folder.LoadedRun` (``load_run(RUN)``) and prepare images exactly
as the run's validation did: ``load_image`` then the evaluation transform of the run's saved
preprocessing. Unreadable images never stop the work; they are returned as ``(path, reason)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from visiontune.errors import DataError
from visiontune.metrics import ClassificationMetrics

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The model's answer for one image: the best label and the ``top_k`` (label, probability)."""

    path: str
    label: str
    score: float
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "score": self.score,
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
    from visiontune.data.datasets import list_images
    from visiontune.data.images import IMAGE_EXTENSIONS

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
    run, paths: Sequence[str | Path], top_k: int = 5, batch_size: int = 32
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify ``paths`` (image files) with the run's model; ``(predictions, skipped)``."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    top_k = min(top_k, len(run.classes))
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    for batch_paths, images in _image_batches(run, list(paths), batch_size, skipped):
        probabilities = F.softmax(_logits(run.model, images).float(), dim=1)
        scores, indices = probabilities.topk(top_k, dim=1)
        for path, row_scores, row_indices in zip(batch_paths, scores.tolist(), indices.tolist()):
            ranked = [(run.classes[i], score) for i, score in zip(row_indices, row_scores)]
            predictions.append(Prediction(str(path), ranked[0][0], ranked[0][1], ranked))
    return predictions, skipped


def evaluate_run(run, data: str | Path, batch_size: int = 64) -> Evaluation:
    """Metrics of the run's model on a labelled folder (``data/<class>/*``, or ``data/val/<class>/*``
    when ``data`` is a dataset root, or a CSV manifest). Class folders may be a subset of the
    run's classes; a class the model does not know is a DataError."""
    from visiontune.data import scan_labelled

    samples = scan_labelled(data, list(run.classes))
    labels = {str(sample.path): sample.label for sample in samples}
    metrics = ClassificationMetrics(list(run.classes))
    skipped: list[tuple[str, str]] = []
    for batch_paths, images in _image_batches(run, [s.path for s in samples], batch_size, skipped):
        targets = torch.tensor([labels[str(p)] for p in batch_paths])
        metrics.update(_logits(run.model, images).float().cpu(), targets)
    if metrics.num_images == 0:
        raise DataError(f"none of the {len(samples)} images in {data} could be read; first: {skipped[0][0]} ({skipped[0][1]})")
    return Evaluation(metrics.compute(), _evaluated_root(data, run.classes), skipped)


def _image_batches(
    run, paths: list, batch_size: int, skipped: list[tuple[str, str]]
) -> Iterator[tuple[list, torch.Tensor]]:
    """Decode and transform images on threads; yield ``(paths, batch tensor)`` on the model's device.
    Unreadable files are appended to ``skipped``."""
    from visiontune.data import build_transforms, load_image
    from visiontune.data.images import BadImageError, map_in_threads

    eval_transform = build_transforms(run.preprocessing, augment="none")[1]
    device = _model_device(run.model)

    def prepare(path) -> torch.Tensor | str:
        try:
            return eval_transform(load_image(path))
        except BadImageError as error:
            return error.reason

    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        good_paths, tensors = [], []
        for path, result in zip(chunk, map_in_threads(prepare, chunk)):
            if isinstance(result, str):
                # info: the caller gets ``skipped`` and the CLI prints each once
                log.info("skipping unreadable image %s (%s)", path, result)
                skipped.append((str(path), result))
            else:
                good_paths.append(path)
                tensors.append(result)
        if tensors:
            yield good_paths, torch.stack(tensors).to(device)


@torch.inference_mode()
def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    output = model(images)
    if isinstance(output, torch.Tensor):
        return output
    # googlenet / inception_v3 return a namedtuple with .logits in train mode
    return getattr(output, "logits", output[0])


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _evaluated_root(data: str | Path, classes: Sequence[str]) -> str:
    """The folder ``scan_labelled`` read: ``data`` itself, or its val/ folder for a dataset root."""
    from visiontune.data.datasets import VAL_DIRS

    root = Path(data).expanduser().absolute()
    val_dir = next((root / name for name in VAL_DIRS if (root / name).is_dir()), None)
    return str(val_dir if val_dir is not None and val_dir.name not in classes else root)


RUN_MARKER = "config.yaml"  # every run folder has it (visiontune.run.folder.CONFIG_FILE)


def open_run(run_dir: str | Path, checkpoint: str = "best", device: str = "auto"):
    """``load_run`` with a clear message when ``run_dir`` is missing or is not a run folder."""
    from visiontune.device import resolve_device
    from visiontune.errors import ConfigError
    from visiontune.run.folder import load_run

    path = Path(run_dir).expanduser()
    if not path.exists():
        raise ConfigError(f"run folder {path} does not exist; give --run the folder that 'visiontune train --out' wrote")
    if not path.is_dir() or not (path / RUN_MARKER).is_file():
        raise ConfigError(
            f"{path} is not a visiontune run folder (it has no {RUN_MARKER}); "
            "give --run the folder that 'visiontune train --out' wrote"
        )
    return load_run(path, checkpoint=checkpoint, device=str(resolve_device(device)))

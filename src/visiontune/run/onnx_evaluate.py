"""``evaluate --backend onnx``: an exported ONNX file's metrics on a labelled folder.

The images are prepared and run by :class:`visiontune.run.onnx_backend.OnnxClassifier` (Pillow,
NumPy, ONNX Runtime); only the metrics are the ones PyTorch's path computes
(:class:`visiontune.metrics.ClassificationMetrics`), so both backends report the same numbers."""

from __future__ import annotations

from pathlib import Path

import torch

from visiontune.data import scan_labelled
from visiontune.errors import DataError
from visiontune.metrics import ClassificationMetrics
from visiontune.run.inference import Evaluation, _evaluated_root
from visiontune.run.onnx_backend import OnnxClassifier

def evaluate_onnx(model: OnnxClassifier, data: str | Path, batch_size: int = 64, tta: bool = False) -> Evaluation:
    """Metrics of the ONNX file on ``data`` (as :func:`visiontune.run.inference.evaluate_run`)."""
    samples = scan_labelled(data, list(model.classes))
    labels = {str(sample.path): sample.label for sample in samples}
    metrics = ClassificationMetrics(list(model.classes))
    skipped: list[tuple[str, str]] = []
    for batch_paths, batch in model.batches([sample.path for sample in samples], batch_size, skipped):
        # Log-probabilities as logits, as the PyTorch path passes them: the same arg-max, top-5 and loss.
        log_probabilities = torch.from_numpy(model.log_probabilities(batch, tta=tta))
        metrics.update(log_probabilities, torch.tensor([labels[str(p)] for p in batch_paths]))
    if metrics.num_images == 0:
        raise DataError(f"none of the {len(samples)} images in {data} could be read; first: {skipped[0][0]} ({skipped[0][1]})")
    return Evaluation(metrics.compute(), _evaluated_root(data, model.classes), skipped)

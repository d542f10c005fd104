"""Smaller ONNX files for CPUs (int8, fp16), and what they cost in accuracy, measured.

``quantize_run(RUN, "int8")`` exports the run's model to float32 ONNX (verified against PyTorch
as every export is, :mod:`visiontune.run.export`), then:

* ``int8``: static quantization with ``onnxruntime.quantization``: the float32 graph is first
  pre-processed (``quant_pre_process``: shape inference and graph optimisation, as onnxruntime
  recommends), then ``quantize_static`` in QDQ format with per-channel int8 weights and int8
  activations whose ranges (MinMax) are calibrated on a seeded sample of the run's *training*
  images prepared by the run's own evaluation transform;
* ``fp16``: weights and activations in float16 (``onnxruntime.transformers.float16``; inputs and
  outputs stay float32, so callers and the sidecar do not change).

The converted file is then judged on the run's *validation* images: top-1 accuracy of the file
and of the PyTorch model on the same input tensors, how often their predictions agree, and the
size of both files. When accuracy drops by more than ``max_accuracy_drop`` percentage points the
file is kept as ``FILE.rejected`` (its sidecar ``FILE.rejected.json`` says why) and
:class:`~visiontune.run.export.ExportVerificationError` is raised.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.atomic_io import atomic_files, same_file
from visiontune.data import discover, load_image
from visiontune.data.transforms import build_eval_transform
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.run.export import (DEFAULT_TOLERANCE, ExportVerificationError, describe_export, export_model, prepare_for_export,
                                   require_onnx_runtime, verify_export, write_metadata)
from visiontune.run.folder import RUN_FILES
from visiontune.run.loaded import load_run

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8", "fp16")
DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points of top-1 accuracy
DEFAULT_CALIBRATION_IMAGES = 128  # onnxruntime's examples calibrate on a few hundred; ranges settle well before
MAX_VERIFY_IMAGES = 5000  # validation images the accuracy is measured on, at most
_CALIBRATION_BATCH = 16


@dataclass
class AccuracyCheck:
    """The exported file against the PyTorch model on the same validation tensors."""

    num_images: int
    pytorch_accuracy: float  # top-1, fraction
    exported_accuracy: float
    agreement: float  # fraction of images where both predict the same class
    max_accuracy_drop: float  # percentage points allowed
    file_bytes: dict  # {"fp32": bytes of the float32 ONNX file, "<mode>": bytes of the converted one}

    @property
    def accuracy_drop(self) -> float:
        """Percentage points lost (negative: the converted file did better)."""
        return (self.pytorch_accuracy - self.exported_accuracy) * 100

    @property
    def passed(self) -> bool:
        return self.accuracy_drop <= self.max_accuracy_drop

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop, "passed": self.passed}


@dataclass
class QuantizedExport:
    path: Path
    metadata_path: Path
    mode: str
    check: AccuracyCheck
    metadata: dict


def check_mode(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"unknown --quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    return mode


def quantize_onnx(fp32_path: str | Path, out: str | Path, mode: str, calibration: np.ndarray | None = None) -> Path:
    """Convert the float32 ONNX file ``fp32_path`` to ``out``; ``calibration`` (normalised
    ``(N, C, H, W)`` float32 images) is needed for int8."""
    check_mode(mode)
    require_onnx_runtime()
    import onnx  # optional extra (visiontune[export]): only an ONNX export needs it

    out = Path(out)
    if mode == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(out))
        return out
    if calibration is None or len(calibration) == 0:
        raise ConfigError("int8 quantization needs calibration images (the run's training images)")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception as error:  # noqa: BLE001 - an optional step: quantize the graph as exported
            log.warning("onnxruntime's quant_pre_process failed (%s); quantizing the graph as exported", error)
            prepared = Path(fp32_path)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        quantize_static(str(prepared), str(out), _CalibrationReader(calibration, graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=float_nodes(graph))
    return out


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol: ``get_next()`` returns one input feed, then None."""

    def __init__(self, images: np.ndarray, input_name: str):
        self.feeds = iter([{input_name: np.ascontiguousarray(images[start:start + _CALIBRATION_BATCH], np.float32)}
                           for start in range(0, len(images), _CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.feeds, None)


def float_nodes(graph) -> list[str]:
    """The nodes int8 leaves in float: the first convolution (it sees the normalised pixels, whose
    three channels one per-tensor scale serves badly) and the classifier's matrix products (they
    decide the answer, and hold little of the compute). On EfficientNet-Lite0 fine-tuned on the
    digits, quantizing them too cost 8 points of top-1 (84.2 % vs 92.5 %); kept in float, 0.8."""
    first_conv = next((node.name for node in graph.node if node.op_type == "Conv"), None)
    classifier = [node.name for node in graph.node if node.op_type in ("Gemm", "MatMul")]
    return ([first_conv] if first_conv else []) + classifier


def compare_accuracy(model: nn.Module, exported: str | Path, images: torch.Tensor, labels: torch.Tensor,
                     max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP, file_bytes: dict | None = None,
                     batch_size: int = 32) -> AccuracyCheck:
    """Top-1 of PyTorch and of the ONNX file ``exported`` on the same normalised ``images``."""
    require_onnx_runtime()
    import onnxruntime  # optional extra, checked just above

    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    model = prepare_for_export(model, images[:1])
    torch_predictions, onnx_predictions = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].contiguous()
        with torch.no_grad():
            torch_predictions.append(model(batch).argmax(dim=1))
        onnx_predictions.append(torch.from_numpy(session.run(None, {input_name: batch.numpy()})[0]).argmax(dim=1))
    torch_predicted, onnx_predicted = torch.cat(torch_predictions), torch.cat(onnx_predictions)
    return AccuracyCheck(
        num_images=len(labels),
        pytorch_accuracy=float((torch_predicted == labels).double().mean()),
        exported_accuracy=float((onnx_predicted == labels).double().mean()),
        agreement=float((torch_predicted == onnx_predicted).double().mean()),
        max_accuracy_drop=max_accuracy_drop,
        file_bytes=dict(file_bytes or {}),
    )


def quantize_run(run_dir: str | Path, mode: str, out: str | Path | None = None, checkpoint: str = "best",
                 max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
                 calibration_images: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0,
                 tolerance: float = DEFAULT_TOLERANCE) -> QuantizedExport:
    """Export the run's model as an ``mode`` (int8/fp16) ONNX file at ``out`` (default
    ``RUN/model.int8.onnx``) with its sidecar ``out.json``, judged on the run's validation images."""
    check_mode(mode)
    require_onnx_runtime()
    if not max_accuracy_drop >= 0:
        raise ConfigError(f"--max-accuracy-drop must be a number of percentage points >= 0, got {max_accuracy_drop}")
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    if getattr(run, "task", "classification") == "multilabel":
        raise ConfigError("--quantize supports single-label runs; export a multi-label run without --quantize")
    path = Path(out) if out is not None else Path(run_dir) / f"model.{mode}.onnx"
    for target in (path, Path(f"{path}.json"), path.with_name(path.name + ".rejected")):
        clash = next((name for name in RUN_FILES if same_file(target, Path(run_dir) / name)), None)
        if clash is not None:
            raise ConfigError(f"--out {path} would overwrite the run's own {clash}; choose another file "
                              f"(default: {Path(run_dir) / f'model.{mode}.onnx'})")
    calibration, validation, labels = run_images(run, calibration_images, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written in a scratch folder beside the target and judged there; only then is the
    # file moved into place, as FILE or as FILE.rejected (one rename: never a half-judged file at FILE).
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        fp32 = export_model(run.model, Path(scratch) / "fp32.onnx", "onnx", validation[:2])
        exact = verify_export(run.model, fp32, "onnx", validation, "validation images", tolerance)
        if not exact.passed:
            raise ExportVerificationError(f"the float32 ONNX export differs from PyTorch by {exact.max_abs_diff:.3g} "
                                          "before any quantization; export without --quantize to see why")
        converted = quantize_onnx(fp32, Path(scratch) / f"{mode}.onnx", mode,
                                  calibration.numpy() if mode == "int8" else None)
        sizes = {"fp32": fp32.stat().st_size, mode: converted.stat().st_size}
        check = compare_accuracy(run.model, converted, validation, labels, max_accuracy_drop, sizes)
        target = path if check.passed else path.with_name(path.name + ".rejected")
        with atomic_files(path.parent) as staging:
            os.replace(converted, staging / target.name)
    metadata = describe_export("onnx", target, tuple(validation.shape[1:]), run.classes, run.preprocessing.to_dict(),
                               run.config.model)
    metadata["checkpoint"] = checkpoint
    metadata["quantization"] = {"mode": mode, **(_INT8_SETTINGS if mode == "int8" else _FP16_SETTINGS),
                                "calibration": {"images": len(calibration), "seed": seed} if mode == "int8" else None}
    metadata["verification"] = check.to_dict()
    metadata_path = write_metadata(target, metadata)
    if not check.passed:
        raise ExportVerificationError(
            f"the {mode} model's top-1 accuracy on {check.num_images} validation images is "
            f"{check.exported_accuracy:.2%} against PyTorch's {check.pytorch_accuracy:.2%}: a drop of "
            f"{check.accuracy_drop:.2f} points, more than --max-accuracy-drop {max_accuracy_drop:g}; kept as {target}")
    return QuantizedExport(path, metadata_path, mode, check, metadata)


_INT8_SETTINGS = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8, per channel",
                  "activations": "int8, per tensor", "calibration_method": "MinMax",
                  "kept_in_float": "the first convolution and the classifier (Gemm/MatMul)"}
_FP16_SETTINGS = {"method": "onnxruntime.transformers.float16.convert_float_to_float16",
                  "inputs_outputs": "float32"}


def run_images(run, calibration_count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration images from the training split, validation images, their labels in the run's
    class order), all through the run's evaluation transform."""
    data = run.config.data
    if not data or not Path(data).exists():
        raise VisiontuneError(f"--quantize needs the run's images (calibration and the accuracy check), but its "
                              f"data {data!r} is not there; restore it at that path")
    split = discover(data, val_split=run.config.val_split, seed=run.config.seed)
    if not split.val:
        raise VisiontuneError(f"{data} has no validation images to measure the {len(split.train)}-image model on")
    transform = build_eval_transform(run.preprocessing)
    train = list(split.train or split.val)
    chosen = random.Random(seed).sample(train, min(calibration_count, len(train)))
    validation = split.val[:MAX_VERIFY_IMAGES]
    index = {name: position for position, name in enumerate(run.classes)}
    try:
        labels = torch.tensor([index[split.classes[sample.label]] for sample in validation])
    except KeyError as error:
        raise VisiontuneError(f"{data} now has class {error.args[0]!r}, which the run did not train on") from None
    calibration = torch.stack([transform(load_image(sample.path)) for sample in chosen])
    images = torch.stack([transform(load_image(sample.path)) for sample in validation])
    return calibration, images, labels

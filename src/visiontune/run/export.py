"""Export a trained classifier for deployment (ONNX or TorchScript) and prove the file is right.

The exported graph is the whole classifier, head included, and takes the *normalised* input
that training used (resize, centre-crop, scale to [0, 1], subtract mean, divide by std: written
to ``FILE.json`` next to the model, with the class names). The batch dimension is dynamic.

Nothing is shipped unverified: after writing, the file is loaded by its own runtime
(onnxruntime, ``torch.jit.load``) and run at batch sizes 1 and 3; its logits must match
PyTorch's within ``tolerance`` (max absolute difference; for a model whose logits exceed 1 in
size, relative to the largest logit, since float32 cannot do better than ~1e-7 of a value), or
:class:`ExportVerificationError`.

ONNX uses the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``, the default
since torch 2.9, which needs ``onnxscript``); should a model not be capturable by it, the older
TorchScript-based exporter (deprecated, still shipped in torch 2.14) is tried once.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from visiontune.atomic_io import atomic_files, same_file, write_text_atomically
from visiontune.data import load_image
from visiontune.data.multilabel_sources import discover_for_task
from visiontune.data.images import DEFAULT_BACKGROUND
from visiontune.data.transforms import build_eval_transform
from visiontune.errors import VisiontuneError
from visiontune.model.outputs import main_logits
from visiontune.run.folder import RUN_FILES
from visiontune.run.loaded import load_run

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
VERIFY_BATCH_SIZES = (1, 3)
DEFAULT_TOLERANCE = 1e-3
# ONNX protobuf files cannot exceed 2 GiB; larger weights go to a side file FILE.data.
_ONNX_INLINE_WEIGHT_LIMIT = 1_500_000_000  # bytes

_EXPORT_EXTRA = "pip install 'visiontune[export]'  (onnx, onnxruntime, onnxscript)"


class ExportVerificationError(VisiontuneError):
    """The exported file does not reproduce PyTorch's outputs (or cannot be run)."""


@dataclass
class Verification:
    """How the exported file compared with PyTorch: max |difference| of the logits per batch size."""

    max_abs_diff: float
    per_batch_size: dict[int, float]
    inputs: str  # "validation images" | "random inputs": what was fed to both
    tolerance: float
    passed: bool
    logit_scale: float = 1.0  # max(1, largest |logit|): the tolerance is relative to it

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "per_batch_size": {str(size): diff for size, diff in self.per_batch_size.items()},
            "inputs": self.inputs,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "logit_scale": self.logit_scale,
        }


@dataclass
class ExportResult:
    path: Path
    metadata_path: Path
    format: str
    verification: Verification
    metadata: dict = field(default_factory=dict)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise VisiontuneError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    return format


def require_onnx_runtime() -> None:
    """ONNX export needs optional packages; say exactly which are missing and how to get them."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise VisiontuneError(f"ONNX export needs {', '.join(missing)} (not installed): {_EXPORT_EXTRA}")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class LogitsOnly(nn.Module):
    """Wraps a model whose forward returns a tuple/namedtuple (e.g. ``.logits`` + aux heads) so
    that the exported graph has exactly one output: the main logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_logits(self.model(images))


class SigmoidScores(nn.Module):
    """Multi-label runs: the exported graph outputs each label's probability (sigmoid of the logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(main_logits(self.model(images)))


def prepare_for_export(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The model on CPU, float32, eval mode; wrapped when its output is not a single tensor."""
    model = model.to("cpu", torch.float32).eval()
    with torch.no_grad():
        outputs = model(example)
    return model if isinstance(outputs, torch.Tensor) else LogitsOnly(model).eval()


def export_model(model: nn.Module, path: str | Path, format: str, example: torch.Tensor) -> Path:
    """Write ``model`` to ``path`` with a dynamic batch dimension. The model is moved to the CPU
    in float32 and put in eval mode (in place: export a copy to keep a GPU model where it is).

    ``example`` is a normalised input batch ``(N, C, H, W)``; its C, H and W are fixed in the graph.
    """
    check_format(format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.to("cpu", torch.float32)
    if example.shape[0] < 2:  # torch.export specialises a dimension whose example size is 1
        example = example.repeat(2, 1, 1, 1)
    model = prepare_for_export(model, example)
    # Written beside the target, then moved into place: a symlink at the path is replaced, never
    # written through; the ONNX exporter names its external .data file after the path itself.
    with atomic_files(path.parent) as staging:
        if format == "onnx":
            _export_onnx(model, staging / path.name, example)
        else:
            _export_torchscript(model, staging / path.name, example)
    log.info("exported %s to %s", format, path)
    return path


def _export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    require_onnx_runtime()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external_data = weight_bytes > _ONNX_INLINE_WEIGHT_LIMIT
    batch = torch.export.Dim("batch", min=1, max=65536)
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "external_data": external_data}
    try:
        # The exporter reports its progress on stdout; the library stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: batch},), **common)
        return
    except Exception as error:  # noqa: BLE001 - any capture failure: try the older exporter once
        log.warning("torch.export-based ONNX export failed (%s); trying the TorchScript-based exporter", error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **common)


def _export_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    # torch.jit is deprecated in favour of torch.export, but TorchScript is what the user asked
    # for (it runs in libtorch / C++ without Python), so its FutureWarnings are not theirs to see.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, strict=False, check_trace=False)
        traced.save(str(path))


def load_exported(path: str | Path, format: str):
    """A callable ``numpy-free`` runner: ``run(batch: Tensor) -> Tensor`` for the exported file."""
    check_format(format)
    path = str(path)
    if format == "onnx":
        require_onnx_runtime()
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda batch: torch.from_numpy(session.run(None, {input_name: batch.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(path, map_location="cpu")
    scripted.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return main_logits(scripted(batch))

    return run


def verify_export(
    model: nn.Module,
    path: str | Path,
    format: str,
    inputs: torch.Tensor,
    inputs_source: str = "random inputs",
    tolerance: float = DEFAULT_TOLERANCE,
    batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES,
) -> Verification:
    """Run the exported file and PyTorch on the same batches of each size; compare the logits.

    ``inputs`` holds at least ``max(batch_sizes)`` normalised images (repeated if fewer).
    """
    inputs = inputs.to("cpu", torch.float32)
    needed = max(batch_sizes)
    if inputs.shape[0] < needed:
        inputs = inputs.repeat((needed + inputs.shape[0] - 1) // inputs.shape[0], 1, 1, 1)
    model = prepare_for_export(model, inputs[:1])
    try:
        run_exported = load_exported(path, format)
    except VisiontuneError:
        raise
    except Exception as error:
        raise ExportVerificationError(f"the exported {format} file {path} cannot be loaded: {error}") from error
    per_batch_size: dict[int, float] = {}
    scale = 1.0
    for size in batch_sizes:
        batch = inputs[:size].contiguous()
        with torch.no_grad():
            expected = model(batch)
        try:
            actual = run_exported(batch)
        except Exception as error:
            raise ExportVerificationError(
                f"the exported {format} file {path} fails on a batch of {size}: {error}"
            ) from error
        if tuple(actual.shape) != tuple(expected.shape):
            raise ExportVerificationError(
                f"the exported {format} file {path} returned shape {tuple(actual.shape)} for a batch of "
                f"{size}, PyTorch returned {tuple(expected.shape)} (is the batch dimension dynamic?)"
            )
        per_batch_size[size] = float((actual.float() - expected.float()).abs().max())
        scale = max(scale, float(expected.abs().max()))
    max_abs_diff = max(per_batch_size.values())
    passed = max_abs_diff <= tolerance * scale
    return Verification(max_abs_diff, per_batch_size, inputs_source, tolerance, passed, scale)


def write_metadata(path: str | Path, metadata: dict) -> Path:
    """``FILE.json`` next to the exported ``FILE``: how to prepare inputs and read outputs."""
    metadata_path = Path(f"{path}.json")
    write_text_atomically(metadata_path, json.dumps(metadata, indent=2) + "\n")
    return metadata_path


def describe_export(format: str, path: Path, input_shape: tuple[int, ...], classes: list[str],
                    preprocessing: dict, model_name: str | None) -> dict:
    """The metadata written next to an exported model (see :func:`write_metadata`)."""
    channels, height, width = input_shape
    return {
        "format": format,
        "file": path.name,
        "model": model_name,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", channels, height, width],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)],
                   "meaning": "unnormalised class scores; softmax gives probabilities in the order of 'classes'"},
        "classes": list(classes),
        "preprocessing": {
            **preprocessing,
            # What load_image does before the steps: without it a transparent or 16-bit file gives
            # the exported model other pixels than training's validation saw.
            "decode": ("to 8-bit RGB: EXIF orientation applied; transparent pixels (RGBA, LA, palette with a "
                       "transparent colour) alpha-composited onto the background colour; grey replicated to "
                       "3 channels; 16-bit samples scaled by 255/65535; first frame of an animation"),
            "background": list(DEFAULT_BACKGROUND),
            "python": ("visiontune.data.build_eval_transform(visiontune.model.preprocessing.Preprocessing"
                       ".from_dict(preprocessing))(visiontune.data.load_image(path))"),
            "steps": [
                (f"resize the shorter side to {preprocessing.get('resize_size')} px "
                 f"({preprocessing.get('interpolation', 'bilinear')} interpolation, Pillow, antialiased)"),
                f"centre-crop {preprocessing.get('crop_size')} x {preprocessing.get('crop_size')}",
                "scale pixel values to [0, 1]",
                "subtract mean and divide by std, per RGB channel",
            ],
        },
    }


# -- a run folder -> an exported, verified file -------------------------------------------------


def export_run(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, checkpoint: str = "best",
               tolerance: float = DEFAULT_TOLERANCE, num_images: int = max(VERIFY_BATCH_SIZES)) -> ExportResult:
    """Export a run's model to ``out`` (default ``RUN/model.onnx`` / ``RUN/model.pt``), verify it on
    validation images of the run's data (random inputs when the data is not reachable), and write
    ``out.json``. Raises :class:`ExportVerificationError` (and removes the file) on a mismatch."""
    check_format(format)
    if format == "onnx":
        require_onnx_runtime()
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")
    path = Path(out) if out is not None else Path(run_dir) / f"model{SUFFIXES[format]}"
    for target in (path, Path(f"{path}.json")):
        clash = next((name for name in RUN_FILES if same_file(target, Path(run_dir) / name)), None)
        if clash is not None:
            raise VisiontuneError(f"--out {path} would overwrite the run's own {clash}; choose another file "
                                  f"(default: {Path(run_dir) / ('model' + SUFFIXES[format])})")
    inputs, source = validation_inputs(run, num_images)
    model = SigmoidScores(run.model) if run.task == "multilabel" else run.model
    export_model(model, path, format, inputs[:2])
    verification = verify_export(model, path, format, inputs, source, tolerance)
    if not verification.passed:
        path.unlink(missing_ok=True)
        scale = verification.logit_scale
        allowed = f"tolerance {tolerance:g}" + (f" x largest logit {scale:.3g}" if scale > 1 else "")
        raise ExportVerificationError(
            f"the exported {format} model differs from PyTorch by up to {verification.max_abs_diff:.3g} "
            f"({allowed}, on {source}); {path} was removed. Try the other --format, or accept it with "
            f"--tolerance {verification.max_abs_diff / scale * 2:.1g}")
    metadata = describe_export(format, path, tuple(inputs.shape[1:]), run.classes, run.preprocessing.to_dict(),
                               run.config.model)
    metadata["checkpoint"] = checkpoint
    if run.task == "multilabel":  # probabilities out; a label is present when at or above its threshold
        metadata["task"] = "multilabel"
        metadata["thresholds"] = dict(zip(run.classes, run.thresholds))
        metadata["output"]["meaning"] = ("probability of each label (sigmoid), in the order of 'classes'; "
                                         "a label is present when its probability >= its threshold")
    metadata["verification"] = verification.to_dict()
    return ExportResult(path, write_metadata(path, metadata), format, verification, metadata)


def validation_inputs(run, count: int) -> tuple[torch.Tensor, str]:
    """``count`` normalised validation images of the run's data, else random inputs (and which)."""
    size = run.preprocessing.crop_size
    try:
        images = _validation_images(run, count)
    except Exception as error:  # noqa: BLE001 - moved or deleted data: verification still runs
        log.warning("validation images of %s not usable (%s); verifying on random inputs", run.config.data, error)
        images = None
    if images is not None:
        return images, "validation images"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, _input_channels(run.model), size, size, generator=generator), "random inputs"


def _validation_images(run, count: int) -> torch.Tensor | None:
    if not run.config.data or not Path(run.config.data).exists():
        return None
    split = discover_for_task(run.config.data, run.task, val_data=run.config.val_data, val_split=run.config.val_split,
                              seed=run.config.seed)
    samples = split.val or split.train
    if not samples:
        return None
    transform = build_eval_transform(run.preprocessing)
    return torch.stack([transform(load_image(sample.path)) for sample in samples[:count]])


def _input_channels(model: nn.Module) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3

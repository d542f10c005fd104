"""Classify images with an exported ONNX file and ONNX Runtime, without torch.

A deployment machine needs only ``FILE.onnx``, its sidecar ``FILE.onnx.json`` (written by
``visiontune export``: preprocessing, classes, task) and ``pip install onnxruntime pillow numpy``.
This module imports neither torch nor torchvision, so the preprocessing of
:class:`visiontune.data.transforms.EvalTransform` is written again here in Pillow and NumPy, step
for step (the same Pillow resize, the same crop offsets, the same float32 arithmetic), and
tests/test_onnx_backend.py checks that both give the same tensor. Images are decoded by
:func:`visiontune.data.images.load_image` itself (Pillow + NumPy only).

``python -m visiontune.run.onnx_backend FILE.onnx IMAGE_OR_FOLDER ...`` is the torch-free command
line; ``visiontune predict/evaluate --backend onnx`` run the same code from the full CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.data.images import DEFAULT_BACKGROUND, is_image_file, load_image, prepared_batches
from visiontune.errors import ConfigError, DataError, VisiontuneError


ONNX_RUNTIME_EXTRA = "pip install 'visiontune[export]'  (or just: pip install onnxruntime)"
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}
_IGNORED_DIRS = frozenset({"__MACOSX"})  # as visiontune.data.datasets.list_images


@dataclass
class Prediction:
    """The same fields as :class:`visiontune.run.inference.Prediction` (which lives beside torch)."""

    path: str
    label: str
    score: float
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "score": self.score,
                "top_k": [{"label": label, "score": score} for label, score in self.top_k]}


def import_onnxruntime():
    """``onnxruntime``, or a one-line error saying how to install it."""
    try:
        import onnxruntime  # optional extra: imported only when an ONNX file is run
    except ImportError:
        raise VisiontuneError(f"running an ONNX model needs onnxruntime (not installed): {ONNX_RUNTIME_EXTRA}") from None
    return onnxruntime


class OnnxClassifier:
    """An exported classifier: its ONNX Runtime session and what its sidecar says about inputs and outputs."""

    def __init__(self, model_file: str | Path, threads: int | None = None):
        self.path = Path(model_file).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"--model-file {self.path} does not exist; give the .onnx file 'visiontune export' wrote")
        self.metadata = read_sidecar(self.path)
        self.classes: list[str] = self.metadata["classes"]
        self.preprocessing: dict = self.metadata["preprocessing"]
        # "multilabel" files output each label's probability (a sigmoid in the graph); others, logits.
        self.task: str = self.metadata.get("task", "classification")
        onnxruntime = import_onnxruntime()
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            raise ConfigError(f"{self.path} is not a model ONNX Runtime can load ({str(error)[:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One decoded RGB picture as the model's float32 ``CHW`` input (see :func:`preprocess`)."""
        return preprocess(image, self.preprocessing)

    def log_probabilities(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Log class probabilities ``(batch, classes)`` in float64, as
        :func:`visiontune.run.inference.class_log_probabilities` computes them from PyTorch's logits
        (multi-label files output probabilities already). ``tta``: the log of the mean of the
        image's and its horizontal flip's probabilities."""
        log_probabilities = self._log_probabilities(batch)
        if not tta:
            return log_probabilities
        flipped = self._log_probabilities(batch[..., ::-1])  # width is axis 3 in NCHW
        return np.logaddexp(log_probabilities, flipped) - math.log(2.0)

    def _log_probabilities(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        outputs = outputs.astype(np.float64)
        if self.task == "multilabel":
            with np.errstate(divide="ignore"):
                return np.log(outputs)
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def batches(self, paths: Sequence[Path], batch_size: int,
                skipped: list[tuple[str, str]]) -> Iterator[tuple[list[Path], np.ndarray]]:
        """``(paths, input batch)`` of readable images, decoded on threads; unreadable ones go to ``skipped``."""
        background = tuple(self.preprocessing.get("background", DEFAULT_BACKGROUND))

        for good, arrays in prepared_batches(lambda path: self.prepare(load_image(path, background)), paths,
                                             batch_size, skipped):
            yield good, np.stack(arrays)

    def predict(self, paths: Sequence[str | Path], top_k: int = 5, batch_size: int = 32,
                tta: bool = False) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Classify image files: ``(predictions, skipped)`` in the order of ``paths``, as
        :func:`visiontune.run.inference.predict_images` does with the PyTorch model."""
        if top_k < 1:
            raise DataError(f"--top-k must be at least 1, got {top_k}")
        top_k = min(top_k, len(self.classes))
        predictions: list[Prediction] = []
        skipped: list[tuple[str, str]] = []
        for batch_paths, batch in self.batches([Path(p) for p in paths], batch_size, skipped):
            probabilities = np.exp(self.log_probabilities(batch, tta=tta))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
            for path, row, indices in zip(batch_paths, probabilities, order):
                ranked = [(self.classes[i], float(row[i])) for i in indices]
                predictions.append(Prediction(str(path), ranked[0][0], ranked[0][1], ranked))
        return predictions, skipped


def read_sidecar(model_file: Path) -> dict:
    """``FILE.json`` beside ``FILE``; missing or damaged is a one-line ConfigError naming it."""
    sidecar = Path(f"{model_file}.json")
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{sidecar} is missing: the ONNX backend needs the JSON file 'visiontune export' writes "
                          "beside the model (preprocessing and class names)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ConfigError(f"{sidecar} is damaged or unreadable ({type(error).__name__}: {str(error)[:80]})") from None
    classes = metadata.get("classes") if isinstance(metadata, dict) else None
    steps = metadata.get("preprocessing") if isinstance(metadata, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)):
        raise ConfigError(f"{sidecar} is damaged: it must hold 'classes', a list of class names")
    if not isinstance(steps, dict):
        raise ConfigError(f"{sidecar} is damaged: it must hold 'preprocessing' (crop_size, resize_size, mean, std)")
    check_preprocessing(steps, sidecar)
    return metadata


def check_preprocessing(values: dict, source: Path) -> None:
    """The sidecar's preprocessing values are usable (the same rules as Preprocessing.from_dict)."""
    try:
        sizes = [int(values["crop_size"]), int(values["resize_size"])]
        numbers = [float(v) for v in values["mean"]] + [float(v) for v in values["std"]]
        channels_ok = len(values["mean"]) == len(values["std"]) in (1, 3)
        interpolation_ok = values.get("interpolation", "bilinear") in _PIL_FILTERS
    except (KeyError, TypeError, ValueError, OverflowError):
        sizes, numbers, channels_ok, interpolation_ok = [0], [], False, False
    std_ok = channels_ok and all(float(v) > 0 for v in values["std"])
    if not (all(0 < size <= 16_384 for size in sizes) and channels_ok and std_ok and interpolation_ok
            and all(math.isfinite(v) for v in numbers)):
        raise ConfigError(f"{source} has unusable preprocessing {str(values)[:200]}: need positive crop_size and "
                          f"resize_size, finite mean, positive std, interpolation one of {', '.join(_PIL_FILTERS)}")


def preprocess(image: Image.Image, values: dict) -> np.ndarray:
    """EvalTransform in Pillow + NumPy: resize the short side to ``resize_size`` (Pillow, as
    torchvision does for a PIL image), centre-crop ``crop_size`` (zero padding when larger), scale
    to [0, 1], normalise. Returns float32 ``(3, crop, crop)``."""
    resize_size, crop_size = int(values["resize_size"]), int(values["crop_size"])
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size, int(resize_size * long / short)  # torchvision's arithmetic
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, resample=_PIL_FILTERS[values.get("interpolation", "bilinear")])
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # HWC -> CHW
    pixels = _center_crop(pixels, crop_size)
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255)  # ToDtype(float32, scale=True)
    mean = np.asarray(values["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(values["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (scaled - mean) / std


def _center_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    """torchvision's center_crop: zero-pad to at least ``crop`` (the extra pixel right/bottom),
    then cut at ``round((size - crop) / 2)``."""
    _, height, width = pixels.shape
    if crop > height or crop > width:
        pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
        pixels = np.pad(pixels, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
        _, height, width = pixels.shape
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return pixels[:, top:top + crop, left:left + crop]


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named or found in folders, as :func:`visiontune.run.inference.collect_images`
    (the folder walk is :func:`visiontune.data.datasets.list_images`', whose module imports torch;
    a test checks both walks list the same files)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist; give image files or folders of images")
        if path.is_file():
            found.append(path)
            continue
        inside = [candidate for candidate in path.rglob("*")
                  if not any(part.startswith(".") or part in _IGNORED_DIRS for part in candidate.relative_to(path).parts)
                  and candidate.is_file() and is_image_file(candidate)]
        found.extend(sorted(inside, key=lambda p: p.relative_to(path).as_posix()))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise DataError(f"no images found in {', '.join(str(p) for p in paths)}")
    return unique


def main(argv: list[str] | None = None) -> int:
    """The torch-free command line: ``python -m visiontune.run.onnx_backend FILE.onnx PATH ...``."""
    parser = argparse.ArgumentParser(prog="python -m visiontune.run.onnx_backend",
                                     description="Classify images with an exported ONNX model (no torch needed).")
    parser.add_argument("model_file", metavar="FILE.onnx", help="written by 'visiontune export' (FILE.onnx.json beside it)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="labels per image (default: 3)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per run (default: 32)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of predictions")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
        images = collect_images(args.paths)
        predictions, skipped = OnnxClassifier(args.model_file).predict(images, args.top_k, args.batch_size)
    except VisiontuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, reason in skipped:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
    else:
        for prediction in predictions:
            print(f"{prediction.path}  {prediction.label}  {prediction.score:.1%}")
    return 0 if predictions else 2


if __name__ == "__main__":
    sys.exit(main())

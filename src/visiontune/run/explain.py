"""Why the model decides: class-activation maps (CAMs) of a finished run, drawn over its images.

A CAM is a heat map over the image of where the model's evidence for one class lies. The maps
come from the grad-cam library (``pytorch_grad_cam``, the ``[explain]`` extra): Grad-CAM (weights
each feature channel by the class score's gradient), EigenCAM (the features' first principal
component: gradient-free and class-agnostic, one map per image) and Score-CAM (gradient-free,
one forward pass per feature channel: slow).

The layer a map is read from is the last feature block before the head, taken from the model's
anatomy (:mod:`visiontune.model.anatomy`) and checked by one forward pass: the last layer whose
output still has a spatial grid. Token layers (ViT) are reshaped to that grid with the class
token(s) dropped, as grad-cam's documentation does; for them the map is read at the last block's
first norm (``norm1``/``ln_1``), where the class token still attends to every patch: after the
block, a head that reads the class token alone passes no gradient to the patches. Channels-last
layers (timm's Swin) are permuted to channels-first.

Images are prepared exactly as the run's validation did (its saved preprocessing,
:class:`visiontune.data.transforms.EvalTransform`); overlays are drawn on the centre crop the model
saw, at its size. Everything but :func:`explain` is a pure function of tensors or images.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from visiontune.atomic_io import write_bytes_atomically, write_text_atomically
from visiontune.data import build_eval_transform, load_image
from visiontune.data.images import BadImageError
from visiontune.errors import ConfigError, DataError, ModelError, VisiontuneError
from visiontune.model.anatomy import NORM_TYPES, Anatomy, anatomy_of
from visiontune.model.outputs import main_logits
from visiontune.run.inference import collect_images
from visiontune.run.loaded import LoadedRun, load_run
from visiontune.run.plots import point_matplotlib_config_into_cache

log = logging.getLogger(__name__)

METHODS = ("gradcam", "eigencam", "scorecam")
DEFAULT_METHODS = ("gradcam", "eigencam")
CLASS_AGNOSTIC = ("eigencam",)  # one map per image, whatever the class
TOKEN_BLOCK_NORMS = ("norm1", "ln_1")  # timm's and torchvision's name for a transformer block's first norm
INDEX_FILE = "explanations.json"
SCORECAM_BATCH = 32  # masked images per forward pass in Score-CAM
_EXPLAIN_EXTRA = "pip install 'visiontune[explain]'  (grad-cam)"


def import_grad_cam():
    """The grad-cam package, or a one-line VisiontuneError naming the extra to install."""
    point_matplotlib_config_into_cache()  # grad-cam imports matplotlib.pyplot
    try:
        return importlib.import_module("pytorch_grad_cam"), importlib.import_module("pytorch_grad_cam.utils.image")
    except ImportError as error:
        missing = error.name or "pytorch_grad_cam"
        raise VisiontuneError(f"class-activation maps need grad-cam ({missing} is not installed): "
                              f"{_EXPLAIN_EXTRA}") from None


# -- the target layer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetLayer:
    """Where the maps are read, and how its output becomes ``(batch, channels, height, width)``."""

    name: str  # qualified module name
    layout: str  # "NCHW", "NHWC" or "tokens"
    grid: tuple[int, int]  # the feature map's (height, width)
    prefix_tokens: int = 0  # class/distillation/register tokens before the patches ("tokens" only)

    def reshape_transform(self):
        """grad-cam's ``reshape_transform`` for this layout (None: already NCHW)."""
        if self.layout == "NHWC":
            return _channels_first
        if self.layout == "tokens":
            return _TokensToGrid(self.prefix_tokens, self.grid)
        return None


def _channels_first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _TokensToGrid:
    prefix_tokens: int
    grid: tuple[int, int]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens:, :]
        return patches.reshape(tokens.size(0), *self.grid, tokens.size(-1)).permute(0, 3, 1, 2)


def find_target_layer(model: nn.Module, image_size: int, anatomy: Anatomy | None = None) -> TargetLayer:
    """The last feature block before the head whose output keeps a spatial grid (see the module
    docstring), found among the anatomy's layer groups by one forward pass at ``image_size``."""
    anatomy = anatomy or anatomy_of(model)
    names = [name for group in anatomy.groups[:-1] for name in group.modules]  # input -> last stage
    shapes = _output_shapes(model, names, image_size)
    fallback = None
    for name in reversed(names):
        shape = shapes.get(name)
        if shape is None:
            continue
        module = model.get_submodule(name)
        if len(shape) == 4:
            nhwc = _channels_last(model, shape)
            grid = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
            layer = TargetLayer(name, "NHWC" if nhwc else "NCHW", grid)
            if grid[0] * grid[1] > 1:
                return layer
            fallback = fallback or layer  # a 1x1 map (pooled, or a tiny image): used if nothing better
        elif len(shape) == 3 and not isinstance(module, NORM_TYPES):
            layer = _token_layer(model, name, shape)
            if layer is not None:
                return layer
    if fallback is not None:
        return fallback
    raise ModelError(f"found no layer with a spatial feature map before the head of {anatomy.name} "
                     f"(looked at {', '.join(names[-4:]) or 'nothing'}); class-activation maps need one")


def _channels_last(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """True for a (batch, height, width, channels) map: timm says so (``output_fmt``); otherwise the
    square grid of the square input tells (torchvision's Swin has no such attribute)."""
    declared = getattr(model, "output_fmt", None)
    if isinstance(declared, str):
        return declared == "NHWC"
    return shape[2] != shape[3] and shape[1] == shape[2]


def _token_layer(model: nn.Module, name: str, shape: tuple[int, ...]) -> TargetLayer | None:
    tokens = shape[1]
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int):
        prefix = tokens - math.isqrt(tokens) ** 2  # torchvision's ViT: one class token before a square grid
    side = math.isqrt(max(tokens - prefix, 0))
    if side < 1 or side * side != tokens - prefix:
        return None  # not a square grid of patches: not a layer we know how to reshape
    module = model.get_submodule(name)
    norm = next((f"{name}.{child}" for child in TOKEN_BLOCK_NORMS if hasattr(module, child)), name)
    return TargetLayer(norm, "tokens", (side, side), prefix)


def _output_shapes(model: nn.Module, names: list[str], image_size: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a loose parameter (a ViT's cls_token) in a group, not a module

        def remember(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)

        handles.append(module.register_forward_hook(remember))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


# -- maps and overlays ----------------------------------------------------------------------------


class _Logits(nn.Module):
    """The model's main logits, whatever it returns (auxiliary heads, distillation tuples)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_logits(self.model(images))


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown CAM method {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {', '.join(METHODS)}")
    return tuple(dict.fromkeys(methods))


def compute_cams(model: nn.Module, target: TargetLayer, images: torch.Tensor, class_indices: Sequence[int],
                 method: str = "gradcam") -> np.ndarray:
    """``(batch, height, width)`` float32 maps in [0, 1] of ``images`` (normalised, NCHW) for the
    class ``class_indices[i]`` of image ``i`` (EigenCAM ignores it), at the images' size."""
    grad_cam, _ = import_grad_cam()
    targets_module = importlib.import_module("pytorch_grad_cam.utils.model_targets")
    cam_type = {"gradcam": grad_cam.GradCAM, "eigencam": grad_cam.EigenCAM, "scorecam": grad_cam.ScoreCAM}[
        check_methods([method])[0]]
    wrapped = _Logits(model)
    cam = cam_type(model=wrapped, target_layers=[model.get_submodule(target.name)],
                   reshape_transform=target.reshape_transform())
    cam.batch_size = SCORECAM_BATCH
    # The input needs a gradient of its own: with frozen parameters the graph would not reach the layer.
    images = images.detach().clone().requires_grad_(method == "gradcam")
    targets = [targets_module.ClassifierOutputTarget(int(index)) for index in class_indices]
    try:
        # Score-CAM draws a tqdm progress bar per image on stderr: library code prints nothing.
        with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):
            maps = cam(input_tensor=images, targets=targets)
    finally:
        cam.activations_and_grads.release()  # its hooks stay on the model otherwise
    return np.nan_to_num(np.asarray(maps, dtype=np.float32)).clip(0.0, 1.0)


def overlay(picture: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """``picture`` (height, width, 3 floats in [0, 1]) with ``cam`` drawn over it: uint8 RGB."""
    _, image_utils = import_grad_cam()
    return image_utils.show_cam_on_image(picture.astype(np.float32), cam, use_rgb=True)


def model_view(image: Image.Image, transform) -> tuple[torch.Tensor, np.ndarray]:
    """The run's normalised input tensor for ``image`` and the crop it shows, as floats in [0, 1]
    (height, width, 3): the same resize and centre crop, before normalisation."""
    resized = transform.resize(image)  # uint8 CHW, what EvalTransform's own call starts from
    crop = TF.center_crop(resized, [transform.preprocessing.crop_size])
    return transform.finish(resized), crop.permute(1, 2, 0).numpy().astype(np.float32) / 255.0


# -- a run's images -------------------------------------------------------------------------------


@dataclass
class ImageMaps:
    """One image explained: the prediction and the overlays (uint8 RGB arrays), keyed
    ``"gradcam predicted"``, ``"gradcam true"`` (only when the true class is known and not the
    predicted one) and ``"eigencam"``."""

    path: str
    predicted: str
    confidence: float
    label: str | None
    picture: np.ndarray  # the crop the model saw, uint8 RGB
    overlays: dict[str, np.ndarray] = field(default_factory=dict)


def explain_images(run: LoadedRun, images: Sequence[Image.Image], labels: Sequence[str | None],
                   methods: Sequence[str] = DEFAULT_METHODS, paths: Sequence[str] | None = None,
                   target: TargetLayer | None = None) -> list[ImageMaps]:
    """Maps of decoded ``images`` with the run's model; ``labels[i]``: image i's true class or None."""
    methods = check_methods(methods)
    import_grad_cam()  # before any work: the one-line error if the extra is missing
    transform = build_eval_transform(run.preprocessing)
    target = target or find_target_layer(run.model, run.preprocessing.crop_size)
    views = [model_view(image, transform) for image in images]
    parameter = next(run.model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    batch = torch.stack([tensor for tensor, _ in views]).to(device)
    with torch.no_grad():
        probabilities = F.softmax(main_logits(run.model(batch)).float(), dim=1).cpu()
    confidence, predicted = probabilities.max(dim=1)
    true_index = [run.classes.index(label) if label in run.classes else None for label in labels]
    paths = list(paths) if paths is not None else [f"image {index}" for index in range(len(images))]
    results = [ImageMaps(paths[i], run.classes[int(predicted[i])], float(confidence[i]), labels[i],
                         (views[i][1] * 255).round().astype(np.uint8)) for i in range(len(images))]
    for method in methods:
        cams = compute_cams(run.model, target, batch, predicted.tolist(), method)
        key = method if method in CLASS_AGNOSTIC else f"{method} predicted"
        for result, (_, picture), cam in zip(results, views, cams):
            result.overlays[key] = overlay(picture, cam)
        if method in CLASS_AGNOSTIC:
            continue
        other = [i for i, index in enumerate(true_index) if index is not None and index != int(predicted[i])]
        if other:
            cams = compute_cams(run.model, target, batch[other], [true_index[i] for i in other], method)
            for i, cam in zip(other, cams):
                results[i].overlays[f"{method} true"] = overlay(views[i][1], cam)
    return results


def explain(run: str | Path | LoadedRun, images: Sequence[str | Path] | str | Path, out: str | Path,
            methods: Sequence[str] = DEFAULT_METHODS, label: str | None = None, checkpoint: str = "best",
            device: str = "cpu", batch_size: int = 16) -> tuple[list[dict], list[dict]]:
    """Write class-activation overlays of image files (or folders of them) into the folder ``out``:
    per image ``NNN-NAME.input.png`` (the crop the model saw) and one PNG per map
    (``NNN-NAME.gradcam.predicted.png``, ``...gradcam.true.png``, ``...eigencam.png``), plus
    ``explanations.json`` listing them with the predictions. The true class is ``label``, else the
    image's folder when that is one of the run's classes. Returns ``(entries, skipped)``: the index's
    entries and the unreadable images (``{"path", "reason"}``); none readable is a DataError."""
    methods = check_methods(methods)
    import_grad_cam()
    loaded = run if isinstance(run, LoadedRun) else load_run(run, checkpoint=checkpoint, device=device)
    if label is not None and label not in loaded.classes:
        raise ConfigError(f"--label {label!r} is not one of the run's classes: {', '.join(loaded.classes)}")
    paths = collect_images([images] if isinstance(images, (str, Path)) else images)
    out = _prepare_out(Path(out))
    target = find_target_layer(loaded.model, loaded.preprocessing.crop_size)
    log.info("reading maps at %s (%s, %dx%d)", target.name, target.layout, *target.grid)
    entries, skipped = [], []
    for start in range(0, len(paths), batch_size):
        chunk = list(enumerate(paths[start:start + batch_size], start))
        decoded = []
        for index, path in chunk:
            try:
                decoded.append((index, path, load_image(path)))
            except BadImageError as error:
                # info: the caller gets ``skipped`` and the CLI prints each once
                log.info("skipping unreadable image %s (%s)", path, error.reason)
                skipped.append({"path": str(path), "reason": error.reason})
        if not decoded:
            continue
        labels = [label or (path.parent.name if path.parent.name in loaded.classes else None) for _, path, _ in decoded]
        maps = explain_images(loaded, [image for _, _, image in decoded], labels, methods,
                              paths=[str(path) for _, path, _ in decoded], target=target)
        for (index, path, _), result in zip(decoded, maps):
            entries.append(_write_maps(out, f"{index:03d}-{_safe_stem(path)}", result))
    if not entries:
        raise DataError(f"none of the {len(paths)} image(s) could be read; the first, {skipped[0]['path']}: "
                        f"{skipped[0]['reason']}")
    index = {"run": str(loaded.run_dir), "target_layer": target.name, "methods": list(methods),
             "images": entries, "skipped": skipped}
    write_text_atomically(out / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return entries, skipped


def _write_maps(out: Path, stem: str, result: ImageMaps) -> dict:
    files = {"input": _write_png(out / f"{stem}.input.png", result.picture)}
    for key, picture in result.overlays.items():
        files[key] = _write_png(out / f"{stem}.{key.replace(' ', '.')}.png", picture)
    entry = {key: value for key, value in asdict(result).items() if key not in ("picture", "overlays")}
    return {**entry, "files": files}


def _write_png(path: Path, picture: np.ndarray) -> str:
    write_bytes_atomically(path, png_bytes(picture))  # a reader never sees half a picture
    return path.name


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes (for pages that inline their images)."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60] or "image"


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the overlays")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot create it ({error.strerror})") from None
    return out

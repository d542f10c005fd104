"""Build a fine-tuning-ready classifier: architecture, pretrained weights, input channels, new head.

``create_model`` is the one front door. Names come from :mod:`visiontune.model.registry`
(torchvision names as they are, timm names behind ``timm:``); weights are ``None`` (random), a
weights name that the zoo downloads itself (``"DEFAULT"``, ``"IMAGENET1K_V1"``, a timm tag), or a
local checkpoint read by :func:`visiontune.checkpoint.load_weights`. The pretrained head is always
loaded and then thrown away: the new head is initialised from scratch by
:func:`visiontune.model.heads.replace_head`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from visiontune.checkpoint import load_weights
from visiontune.checkpoint.suffixes import WEIGHT_SUFFIXES
from visiontune.errors import ModelError, shown
from visiontune.model.heads import replace_head
from visiontune.model.preprocessing import Preprocessing
from visiontune.model.registry import ModelInfo, ModelSpec, list_models, parse_name

logger = logging.getLogger(__name__)

__all__ = ["ModelInfo", "create_model", "list_models", "resolve_preprocessing"]

# torchvision's googlenet / inception_v3 warn unless told which init to use; this is their default.
_EXPLICIT_INIT = ("googlenet", "inception_v3")
# Modules and exception types whose errors mean "the weights could not be fetched".
_NETWORK_MODULES = ("urllib", "http", "socket", "ssl", "requests", "urllib3", "httpx", "httpcore", "huggingface_hub")


def create_model(name: str, num_classes: int, weights: str | os.PathLike | None = None, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build ``name`` with ``weights``, adapt it to ``in_chans`` input channels, and give it a new
    head with ``num_classes`` outputs.

    ``weights``: ``None`` (random init), ``"DEFAULT"`` or a weights name (torchvision enum member
    such as ``"IMAGENET1K_V1"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``; a timm tag such as
    ``"a1_in1k"``), downloaded by the zoo's own code, or a path to a local checkpoint
    (``.pth``/``.pt``/``.bin``/``.safetensors``). ``kwargs`` go to the zoo's builder
    (``image_size=`` for torchvision ViTs, ``drop_rate=`` for timm, ...).

    With ``in_chans != 3`` the first convolution's pretrained RGB kernels are summed (1 channel)
    or repeated and rescaled (more). The model carries no note of ``name``: callers that need it
    keep it themselves (the training set-up records it in the model's anatomy).

    Output in train mode: torchvision ``googlenet`` and ``inception_v3`` (built with their
    auxiliary heads) return a namedtuple ``(logits, aux_logits2, aux_logits1)`` /
    ``(logits, aux_logits)``; in eval mode, and for every other model, a ``(batch, num_classes)``
    tensor.
    """
    spec = parse_name(name)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ModelError(f"in_chans must be a positive integer, got {in_chans!r}")
    path = _local_path(weights)
    if spec.source == "timm":
        model = _build_timm(spec, None if path else weights, in_chans if path is None else 3, kwargs)
    else:
        model = _build_torchvision(spec, None if path else weights, kwargs)
    if path is not None:
        _load_local(model, path)
    if in_chans != 3 and (spec.source == "torchvision" or path is not None):
        adapt_first_conv(model, in_chans)
    replace_head(model, num_classes)
    logger.debug("built %s (weights=%s, in_chans=%d) with a new %d-class head", name, weights, in_chans, num_classes)
    return model


def _local_path(weights) -> Path | None:
    """The checkpoint file ``weights`` names, or None when it is a zoo weights name / None."""
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ModelError(f"weights must be None, a weights name such as 'DEFAULT', or a file path, got {shown(weights)}")
    text = os.fspath(weights)
    looks_like_file = (isinstance(weights, os.PathLike) or "/" in text or os.sep in text
                       or Path(text).suffix in WEIGHT_SUFFIXES or Path(text).is_file())
    if not looks_like_file:
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist; pass an existing {'/'.join(WEIGHT_SUFFIXES)} file")
    return path


def _load_local(model: nn.Module, path: Path) -> None:
    load_weights(model, path, match="auto")  # logs its own report of what was loaded


# --- torchvision ----------------------------------------------------------------------------------


def torchvision_weights(arch: str, weights: str | None):
    """The torchvision weights enum member for ``weights`` (``None`` and paths: DEFAULT)."""
    import torchvision.models

    enum = torchvision.models.get_model_weights(arch)
    if weights is None or _local_path(weights) is not None:
        return enum.DEFAULT
    member = weights.rsplit(".", 1)[-1] if weights.startswith(enum.__name__ + ".") else weights
    try:
        return enum[member]
    except KeyError:
        valid = ", ".join(["DEFAULT"] + list(enum.__members__))
        raise ModelError(f"unknown weights {shown(weights)} for {arch}; choose one of {valid}, or pass a file path") from None


def _build_torchvision(spec: ModelSpec, weights: str | None, kwargs: dict) -> nn.Module:
    import torchvision.models

    enum_member = torchvision_weights(spec.arch, weights) if weights is not None else None
    if spec.arch in _EXPLICIT_INIT and enum_member is None:
        kwargs = {"init_weights": True, **kwargs}
    try:
        return torchvision.models.get_model(spec.arch, weights=enum_member, **kwargs)
    except Exception as error:
        if enum_member is not None and _is_download_error(error):
            raise ModelError(_offline_message(spec.arch, str(enum_member), error)) from error
        if isinstance(error, (TypeError, ValueError)):
            raise ModelError(f"torchvision cannot build {spec.arch} with {kwargs or 'no options'}: {error}") from error
        raise


# --- timm -----------------------------------------------------------------------------------------


def _timm_arch(spec: ModelSpec, weights: str | None) -> str:
    """timm's ``arch.tag`` for a weights name: "DEFAULT" keeps timm's default tag."""
    if weights is None or weights == "DEFAULT":
        return spec.arch
    import timm

    arch = spec.arch.split(".", 1)[0]
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if weights not in tags:
        raise ModelError(f"unknown weights {shown(weights)} for timm:{arch}; choose DEFAULT or one of {', '.join(tags) or '(none)'}")
    return f"{arch}.{weights}"


def _build_timm(spec: ModelSpec, weights: str | None, in_chans: int, kwargs: dict) -> nn.Module:
    import timm

    arch = _timm_arch(spec, weights)
    try:
        return timm.create_model(arch, pretrained=weights is not None, in_chans=in_chans, **kwargs)
    except Exception as error:
        if weights is not None and _is_download_error(error):
            raise ModelError(_offline_message(f"timm:{arch}", weights, error)) from error
        if isinstance(error, (TypeError, ValueError)):
            raise ModelError(f"timm cannot build {arch} with {kwargs or 'no options'}: {error}") from error
        raise


# --- shared ---------------------------------------------------------------------------------------


def _is_download_error(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OSError, ConnectionError, TimeoutError)):
            return True
        if type(error).__module__.split(".", 1)[0] in _NETWORK_MODULES:
            return True
        error = error.__cause__ or error.__context__
    return False


def _offline_message(model: str, weights: str, error: BaseException) -> str:
    return (
        f"could not download the pretrained weights {weights} for {model} ({type(error).__name__}: {error}); "
        "this machine may be offline. Download the file elsewhere and pass it as a local file: "
        "weights=PATH (Python) or --weights PATH (command line)"
    )


def adapt_first_conv(model: nn.Module, in_chans: int) -> nn.Module:
    """Replace the first 3-channel ``nn.Conv2d`` with one taking ``in_chans`` channels whose kernel
    is derived from the RGB kernel by timm's ``adapt_input_conv`` (sum for 1 channel, repeat and
    rescale by 3/in_chans for more)."""
    from timm.models import adapt_input_conv

    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), (None, None))
    if conv is None or conv.groups != 1:
        raise ModelError(f"cannot adapt {type(model).__name__} to in_chans={in_chans}: no plain 3-channel first convolution found")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(name, new)
    if getattr(model, "transform_input", False):
        model.transform_input = False  # googlenet/inception re-normalise 3 RGB channels; not others
    return model


def resolve_preprocessing(name: str, weights=None) -> Preprocessing:
    """How images must be prepared for ``name`` with ``weights``, read from the weights' metadata
    (torchvision ``weights.transforms()``, timm ``pretrained_cfg``); works offline. ``None`` and
    file paths use the DEFAULT weights' preprocessing."""
    spec = parse_name(name)
    if spec.source == "timm":
        return _timm_preprocessing(spec, weights)
    transform = torchvision_weights(spec.arch, weights).transforms()
    interpolation = getattr(transform.interpolation, "value", str(transform.interpolation))
    return Preprocessing(
        crop_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        interpolation=str(interpolation),
    )


def _timm_preprocessing(spec: ModelSpec, weights) -> Preprocessing:
    import timm.data
    import timm.models

    arch = spec.arch if weights is None or _local_path(weights) is not None else _timm_arch(spec, weights)
    cfg = timm.models.get_pretrained_cfg(arch)
    config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    crop = int(config["input_size"][-1])
    return Preprocessing(
        crop_size=crop,
        resize_size=int(crop / config.get("crop_pct", 0.875)),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=str(config.get("interpolation", "bilinear")),
    )

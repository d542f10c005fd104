"""Which architectures visiontune can build, found by name without building anything.

Two zoos are offered: torchvision's classification models under their own names (``resnet18``)
and timm's under a ``timm:`` prefix (``timm:efficientnet_lite0``). Listing reads only the zoos'
registries and weight metadata, so it is instant; parameter counts for timm models need a build
and are computed on demand on the meta device (:func:`count_parameters`).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass
from functools import lru_cache

from visiontune.errors import ModelError, shown

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"

# Where torchvision keeps each family's classifier (checked against find_head by the tests), so
# that listing needs no model build. Longest prefix wins.
TORCHVISION_HEADS = {
    "alexnet": "classifier.6",
    "convnext": "classifier.2",
    "densenet": "classifier",
    "efficientnet": "classifier.1",
    "googlenet": "fc",
    "inception": "fc",
    "maxvit": "classifier.5",
    "mnasnet": "classifier.1",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3": "classifier.3",
    "regnet": "fc",
    "resnet": "fc",
    "resnext": "fc",
    "shufflenet": "fc",
    "squeezenet": "classifier.1",
    "swin": "head",
    "vgg": "classifier.6",
    "vit": "heads.head",
    "wide_resnet": "fc",
}


@dataclass
class ModelInfo:
    """One buildable architecture, as listed by :func:`list_models`."""

    name: str  # what create_model accepts: "resnet18" or "timm:resnet18"
    source: str  # "torchvision" | "timm"
    head: str | None  # qualified name of the classifier in the freshly built model
    num_params: int | None  # with the zoo's default (usually 1000-class) head; None: not counted yet
    default_weights: str | None  # the weights "DEFAULT" resolves to, if any


@dataclass(frozen=True)
class ModelSpec:
    """A user's model name split into its zoo and the zoo's own name."""

    source: str  # "torchvision" | "timm"
    arch: str  # the zoo's name, e.g. "resnet18" or "resnet18.a1_in1k"


def torchvision_names() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def timm_names() -> list[str]:
    return list(_timm_names())


def parse_name(name: str) -> ModelSpec:
    """Check that ``name`` is buildable; raise a ModelError that suggests close matches if not."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {shown(name)}")
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        import timm

        if timm.is_model(arch.split(".", 1)[0]):
            return ModelSpec("timm", arch)
    elif name in torchvision_names():
        return ModelSpec("torchvision", name)
    raise ModelError(_unknown_name_message(name))


def _unknown_name_message(name: str) -> str:
    bare = name.removeprefix(TIMM_PREFIX)
    candidates = torchvision_names() + [TIMM_PREFIX + n for n in _timm_names()]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not name.startswith(TIMM_PREFIX) and bare in _timm_names():
        close.insert(0, TIMM_PREFIX + bare)  # the user forgot the prefix
    close += [c for c in difflib.get_close_matches(TIMM_PREFIX + bare, candidates, n=3) if c not in close]
    hint = f"did you mean: {', '.join(close[:5])}?" if close else "no similar name found."
    return (
        f"unknown model {shown(name)}; {hint} Run 'visiontune models [PATTERN]' to list the torchvision "
        f"names and the timm names (which take the prefix '{TIMM_PREFIX}')."
    )


def torchvision_head_name(arch: str) -> str | None:
    prefixes = [p for p in TORCHVISION_HEADS if arch.startswith(p)]
    return TORCHVISION_HEADS[max(prefixes, key=len)] if prefixes else None


def _matches(pattern: str | None, *names: str) -> bool:
    if not pattern:
        return True
    pattern = pattern.lower()
    wildcard = any(c in pattern for c in "*?[")
    for n in names:
        n = n.lower()
        if (fnmatch.fnmatchcase(n, pattern) if wildcard else pattern in n):
            return True
    return False


def list_models(pattern: str | None = None) -> list[ModelInfo]:
    """Every buildable architecture whose name matches ``pattern``, torchvision first, then timm.

    ``pattern`` is an fnmatch pattern when it holds ``*``, ``?`` or ``[`` (``"resnet*"``),
    else a substring (``"vit"``); case does not matter, and timm names match with or without
    their ``timm:`` prefix. Nothing is built: torchvision parameter counts come from the weights'
    metadata, timm ones are left ``None`` (see :func:`count_parameters`).
    """
    found = [_torchvision_info(n) for n in torchvision_names() if _matches(pattern, n)]
    found += [_timm_info(n) for n in _timm_names() if _matches(pattern, n, TIMM_PREFIX + n)]
    return found


def _torchvision_info(arch: str) -> ModelInfo:
    import torchvision.models

    default = torchvision.models.get_model_weights(arch).DEFAULT
    return ModelInfo(
        name=arch,
        source="torchvision",
        head=torchvision_head_name(arch),
        num_params=int(default.meta["num_params"]),
        default_weights=f"{type(default).__name__}.{default.name}",
    )


def _timm_info(arch: str) -> ModelInfo:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    head = cfg.classifier if cfg is not None else None
    if isinstance(head, (tuple, list)):
        head = ",".join(head)  # distilled models have two heads
    tag = getattr(cfg, "tag", None) if cfg is not None else None
    return ModelInfo(TIMM_PREFIX + arch, "timm", head, None, f"{arch}.{tag}" if tag else None)


def count_parameters(name: str) -> int | None:
    """Parameters of ``name`` with its default head, counted on the meta device (no memory, no
    initialisation). ``None`` when the architecture cannot be built there."""
    import torch

    spec = parse_name(name)
    try:
        with torch.device("meta"):
            if spec.source == "timm":
                import timm

                model = timm.create_model(spec.arch, pretrained=False)
            else:
                import torchvision.models

                model = torchvision.models.get_model(spec.arch, weights=None)
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:  # some builders need real tensors
        logger.debug("could not count the parameters of %s on the meta device: %s", name, error)
        return None
    return sum(p.numel() for p in model.parameters())

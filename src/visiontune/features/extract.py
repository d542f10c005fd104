"""Feature cache: when only the head trains, the frozen backbone runs once per image.

A frozen backbone (BatchNorm in eval mode, no trainable parameter before the head) maps an image
to the same features every epoch, so ``linear-probe`` and the first phase of ``gradual`` can compute
them once and train the head on them: the epochs cost almost nothing. The head's input is captured
with a forward pre-hook on the head that the model's :class:`~visiontune.model.anatomy.Anatomy`
names (the training set-up passes its own; without one it is found here), and each model is
checked once: ``head(features)`` must reproduce ``model(images)``. Models whose output goes through
more operations after the head (squeezenet's ReLU and pooling after its conv classifier) fail that
check and train the normal way.

With a random training transform one copy per image would freeze the augmentation, so K augmented
copies are cached (epoch ``e`` trains on copy ``e % K``): the caller asks for ``views=K``, or passes
``choose_views`` (usually :func:`visiontune.features.views.choose_cache_views`, which picks K from
the phase's epochs and the memory budget). :func:`plan_feature_cache` decides and says why, in
words for the log.

Where: in memory when the features fit the RAM budget, otherwise (or with ``store="disk"``) in
``$VISIONTUNE_CACHE`` (default ``~/.cache/visiontune``) under a key that hashes the model name, its
backbone tensors, the transform, the view count and every file's path, label, size and mtime, so a
changed dataset or model is never served stale features. On disk they are ``.npy`` arrays (written
batch by batch and memory-mapped when read; loaded with ``allow_pickle=False``, so no code runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import nn

from visiontune.features.store import (
    CACHE_FORMAT_VERSION,
    CachedFeatures,
    allocate_features,
    cache_root,
    load_cached_features,
    publish_entry,
)
from visiontune.memory import MemoryBudget
from visiontune.model.anatomy import Anatomy, anatomy_of
from visiontune.model.freeze import set_train_mode as loop_train_mode

log = logging.getLogger(__name__)

STORES = ("auto", "memory", "disk")


class HeadNotReproducible(Exception):
    """``head(captured input)`` differs from the model's output: the cache cannot stand in for it."""


@dataclass(frozen=True)
class CachePlan:
    """Whether a phase trains on cached features, and why (one sentence for the log and report)."""

    mode: str  # "features" (deterministic transform, one copy), "views" (K augmented copies) or "off"
    views: int  # copies cached per image; 0 when off
    reason: str

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "views": self.views, "reason": self.reason}


def _off(reason: str) -> CachePlan:
    return CachePlan("off", 0, reason)


def plan_feature_cache(
    model: nn.Module,
    *,
    deterministic_transform: bool,
    views: int = 0,
    batch_mixing: bool = False,
    set_train_mode: Callable[[nn.Module], None] = loop_train_mode,
    anatomy: Anatomy | None = None,
    choose_views: Callable[[], tuple[int, str]] | None = None,
) -> CachePlan:
    """Can the head train on cached features? Call after freezing for the phase.

    ``deterministic_transform``: the training transform has no random step
    (:func:`visiontune.data.is_deterministic`); ``views``: augmented copies per image to cache when
    it is random (0: train uncached); ``batch_mixing``: mixup/cutmix are on (they mix images, not
    features, so they rule the cache out); ``set_train_mode``: how the training loop puts the model
    in training mode (default :func:`visiontune.model.freeze.set_train_mode`, which keeps frozen
    BatchNorm in eval mode), to see which layers would behave differently while training;
    ``anatomy``: the model's, when the caller has it; ``choose_views``: with ``views=0`` and a
    random transform, called (only then: it may run the model) for ``(K, why)``, usually
    :func:`visiontune.features.views.choose_cache_views` over the phase's epochs and the memory budget."""
    anatomy = anatomy or anatomy_of(model)
    head_name, head = anatomy.head, anatomy.head_module(model)
    head_params = {id(p) for p in head.parameters()}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in head_params]
    if outside:
        return _off(f"parameters outside the head train ({outside[0]}, ...), so the backbone's output changes")
    if not any(p.requires_grad for p in head.parameters()):
        return _off(f"the head {head_name} has no trainable parameter")
    if batch_mixing:
        return _off("mixup/cutmix mix images, and mixed images have no cached features")
    training_bn = _backbone_batchnorm_in_training(model, head, set_train_mode)
    if training_bn:
        return _off(f"batch norm {training_bn} in the frozen backbone uses batch statistics in training mode")
    note = _dropout_note(model, head)
    if deterministic_transform:
        return CachePlan("features", 1, "only the head trains and the training transform is deterministic" + note)
    if views > 0:
        return CachePlan("views", views, f"only the head trains; caching {views} augmented view(s) per image" + note)
    if choose_views is not None:
        views, why = choose_views()
        return CachePlan("views", views, f"only the head trains; {why}" + note)
    return _off("the training transform is random and cache_views is 0 (train uncached); cache_views=K caches "
                "K augmented views per image, leaving it unset chooses K, augment='none' caches one copy")


def _backbone_batchnorm_in_training(model: nn.Module, head: nn.Module, set_train_mode) -> str | None:
    """The first BatchNorm outside the head that would normalise with batch statistics in training."""
    was_training = {module: module.training for module in model.modules()}
    set_train_mode(model)
    try:
        head_modules = set(head.modules())
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in head_modules and module.training:
                return name
        return None
    finally:
        for module, mode in was_training.items():
            module.training = mode


def _dropout_note(model: nn.Module, head: nn.Module) -> str:
    """Features are computed in eval mode, as a linear probe's are: say so when the model would
    drop out activations before its head while training (timm's ``drop_rate``, Dropout modules)."""
    head_modules = set(head.modules())
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                and m not in head_modules]
    if dropouts or float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:
        return " (features come from the backbone in eval mode, without the dropout before the head)"
    return ""


@contextlib.contextmanager
def capture_head_input(model: nn.Module, *, anatomy: Anatomy | None = None) -> Iterator[dict]:
    """While active, ``captured["features"]`` holds the input of the last head call of ``model``."""
    anatomy = anatomy or anatomy_of(model)
    head_name, head = anatomy.head, anatomy.head_module(model)
    captured: dict = {}

    def keep_input(module: nn.Module, args: tuple) -> None:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise HeadNotReproducible(f"the head {head_name} takes {len(args)} inputs, not one tensor")
        captured["features"] = args[0].detach()

    handle = head.register_forward_pre_hook(keep_input)
    try:
        yield captured
    finally:
        handle.remove()


def check_head_reproduces_output(model: nn.Module, features: torch.Tensor, output, *,
                                 anatomy: Anatomy | None = None) -> None:
    """Raise HeadNotReproducible unless ``head(features)`` equals ``output``, the model's output
    whose head input was ``features``."""
    anatomy = anatomy or anatomy_of(model)
    head_name, head = anatomy.head, anatomy.head_module(model)
    if not isinstance(output, torch.Tensor):
        raise HeadNotReproducible(f"the model returns {type(output).__name__}, not one tensor of logits")
    with torch.no_grad():
        from_head = head(features)
    if from_head.shape != output.shape or not torch.allclose(from_head, output, rtol=1e-4, atol=1e-5):
        raise HeadNotReproducible(
            f"{head_name}(features) does not reproduce the model's output (operations follow the head)")


def feature_cache_key(model: nn.Module, samples: Iterable, *, transform_description: str, views: int,
                      model_name: str | None = None, anatomy: Anatomy | None = None) -> str:
    """A hex digest of everything the cached features depend on.

    ``samples``: objects with ``.path`` and ``.label`` in dataset order (size and mtime are read
    here, so an edited or replaced file gives a new key); ``transform_description``: the training
    transform's ``repr`` (it lists every step and parameter, including the normalisation);
    ``model_name``: recorded in the key (default: the anatomy's name)."""
    anatomy = anatomy or anatomy_of(model)
    digest = hashlib.blake2b(digest_size=20)
    name = model_name or anatomy.name
    header = {"version": CACHE_FORMAT_VERSION, "model": name, "transform": transform_description, "views": views}
    digest.update(json.dumps(header, sort_keys=True).encode())
    head_name = anatomy.head
    for key, tensor in model.state_dict().items():
        if key == head_name or key.startswith(head_name + "."):
            continue  # the head trains: its values must not change the key
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for sample in samples:
        stat = os.stat(sample.path)
        digest.update(f"{os.fspath(sample.path)}\0{sample.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def build_feature_cache(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    views: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    key: str | None = None,
    cache_dir: str | Path | None = None,
    store: str = "auto",
    seed: int = 0,
    memory_budget: MemoryBudget | None = None,
    anatomy: Anatomy | None = None,
) -> CachedFeatures:
    """Run ``model`` over ``dataset`` ``views`` times (in eval mode, in order) and keep the head's input.

    ``key`` (from :func:`feature_cache_key`) names the disk entry: a hit is read instead of running
    the model; without a key nothing touches the disk. ``store``: ``auto`` keeps the features in
    memory when they fit in what is left of ``memory_budget`` (the run's, shared with its decoded
    images; default: :data:`~visiontune.memory.MEMORY_FRACTION` of the available RAM), else on
    disk. View ``v`` is computed under torch seed ``seed + v``, so the augmented copies are
    reproducible. Raises HeadNotReproducible (before any long work) when the model fails the head check.
    ``anatomy``: the model's, when the caller has it."""
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    if store == "disk" and key is None:
        raise ValueError("store='disk' needs a key (feature_cache_key) to name the cache entry")
    entry = cache_root(cache_dir) / "features" / key if key else None
    if entry is not None and (entry / "meta.json").is_file():
        log.info("feature cache hit: %s", entry)
        return load_cached_features(entry)
    device = torch.device(device)
    anatomy = anatomy or anatomy_of(model)
    was_training = {module: module.training for module in model.modules()}
    model.eval()  # dropout and stochastic depth off: the backbone is a fixed function
    try:
        with capture_head_input(model, anatomy=anatomy) as captured:
            return _extract(model, anatomy, dataset, captured, views, batch_size, num_workers, device, entry, store,
                            seed, memory_budget)
    finally:
        for module, mode in was_training.items():
            module.training = mode


def _extract(model, anatomy, dataset, captured, views, batch_size, num_workers, device, entry, store, seed,
             memory_budget) -> CachedFeatures:
    features = None  # allocated once the first batch shows the feature shape
    labels = torch.empty(len(dataset), dtype=torch.int64)
    staging = None
    for view in range(views):
        start = 0
        for images, targets in _ordered_batches(dataset, batch_size, num_workers, seed + view):
            with torch.no_grad():
                output = model(images.to(device, non_blocking=True))
            batch_features = captured["features"].float().cpu()
            if features is None:
                check_head_reproduces_output(model, captured["features"], output, anatomy=anatomy)
                feature_shape = tuple(batch_features.shape[1:])
                features, staging = allocate_features(views, len(dataset), feature_shape, entry, store,
                                                      memory_budget)
            features[view, start:start + len(targets)] = batch_features.numpy() if staging else batch_features
            labels[start:start + len(targets)] = torch.as_tensor(targets)
            start += len(targets)
    if features is None:
        raise ValueError("cannot build a feature cache of an empty dataset")
    if staging is None:
        log.info("feature cache: %s features in memory (%.1f MiB)", tuple(features.shape), features.numel() * 4 / 2**20)
        return CachedFeatures(features, labels, "memory")
    features.flush()
    del features  # close the memory map before the folder moves
    np.save(staging / "labels.npy", labels.numpy(), allow_pickle=False)
    meta = {"version": CACHE_FORMAT_VERSION, "views": views, "count": len(labels)}
    (staging / "meta.json").write_text(json.dumps(meta))
    publish_entry(staging, entry)
    return load_cached_features(entry)


def _ordered_batches(dataset, batch_size: int, num_workers: int, seed: int):
    """Batches in dataset order; random transforms draw from torch seed ``seed``, leaving the
    caller's random state as it was."""
    generator = torch.Generator().manual_seed(seed)  # seeds the workers' transforms
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the main process's transforms when num_workers == 0
        yield from loader



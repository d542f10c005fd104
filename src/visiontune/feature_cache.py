"""Feature cache: when only the head trains, the frozen backbone runs once per image.

A frozen backbone (BatchNorm in eval mode, no trainable parameter before the head) maps an image
to the same features every epoch, so ``linear-probe`` and the first phase of ``gradual`` can compute
them once and train the head on them: the epochs cost almost nothing. The head's input is captured
with a forward pre-hook on the module :func:`visiontune.heads.find_head` names, and each model is
checked once: ``head(features)`` must reproduce ``model(images)``. Models whose output goes through
more operations after the head (squeezenet's ReLU and pooling after its conv classifier) fail that
check and train the normal way.

With a random training transform one copy per image would freeze the augmentation, so the caller
either asks for ``views=K`` (K augmented copies per image, epoch ``e`` trains on copy ``e % K``) or
trains uncached. :func:`plan_feature_cache` decides and says why, in words for the log.

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
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from torch import nn

log = logging.getLogger(__name__)

CACHE_ENV = "VISIONTUNE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/visiontune")
MEMORY_FRACTION = 0.25  # of the RAM available now: the rest is for decoded images, the model and workers
CACHE_FORMAT_VERSION = 1  # bump when the on-disk layout changes, so old entries are not read
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


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$VISIONTUNE_CACHE``, else ``~/.cache/visiontune``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def plan_feature_cache(
    model: nn.Module,
    *,
    deterministic_transform: bool,
    views: int = 0,
    batch_mixing: bool = False,
    set_train_mode: Callable[[nn.Module], None] | None = None,
) -> CachePlan:
    """Can the head train on cached features? Call after freezing for the phase.

    ``deterministic_transform``: the training transform has no random step
    (:func:`visiontune.data.is_deterministic`); ``views``: augmented copies per image to cache when
    it is random (0: train uncached); ``batch_mixing``: mixup/cutmix are on (they mix images, not
    features, so they rule the cache out); ``set_train_mode``: how the training loop puts the model
    in training mode (default :func:`visiontune.loops.set_train_mode`, which keeps frozen
    BatchNorm in eval mode), to see which layers would behave differently while training."""
    from visiontune.heads import find_head

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _off("distributed training: a head trained outside the wrapped model would not sync gradients")
    head_name, head = find_head(model)
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
    if deterministic_transform:
        return CachePlan("features", 1, "only the head trains and the training transform is deterministic")
    if views > 0:
        return CachePlan("views", views, f"only the head trains; caching {views} augmented view(s) per image")
    return _off("the training transform is random; set cache_views=K to cache K augmented views per image, "
                "or augment='none'")


def _backbone_batchnorm_in_training(model: nn.Module, head: nn.Module, set_train_mode) -> str | None:
    """The first BatchNorm outside the head that would normalise with batch statistics in training."""
    if set_train_mode is None:
        from visiontune.loops import set_train_mode
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


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[dict]:
    """While active, ``captured["features"]`` holds the input of the last head call of ``model``."""
    from visiontune.heads import find_head

    head_name, head = find_head(model)
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


def check_head_reproduces_output(model: nn.Module, images: torch.Tensor, features: torch.Tensor,
                                 output) -> None:
    """Raise HeadNotReproducible unless ``head(features)`` equals the model's ``output`` on ``images``."""
    from visiontune.heads import find_head

    head_name, head = find_head(model)
    if not isinstance(output, torch.Tensor):
        raise HeadNotReproducible(f"the model returns {type(output).__name__}, not one tensor of logits")
    with torch.no_grad():
        from_head = head(features)
    if from_head.shape != output.shape or not torch.allclose(from_head, output, rtol=1e-4, atol=1e-5):
        raise HeadNotReproducible(
            f"{head_name}(features) does not reproduce the model's output (operations follow the head)")


@dataclass
class CachedFeatures:
    """The backbone's output for every sample: ``features[view, i]`` and ``labels[i]``."""

    features: torch.Tensor | np.ndarray  # (views, N, *feature_shape) float32; ndarray when memory-mapped
    labels: torch.Tensor  # int64 (N,)
    location: str  # "memory" or the cache folder it lives in

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self, epoch: int = 0) -> torch.utils.data.Dataset:
        """``(features, label)`` pairs of the view that ``epoch`` trains on (``epoch % views``)."""
        view = epoch % self.views
        if isinstance(self.features, torch.Tensor):
            return torch.utils.data.TensorDataset(self.features[view], self.labels)
        return _MappedFeatures(self.features, view, self.labels)


class _MappedFeatures(torch.utils.data.Dataset):
    """One view of memory-mapped features: rows are read from the page cache on access."""

    def __init__(self, features: np.ndarray, view: int, labels: torch.Tensor):
        self.features, self.view, self.labels = features, view, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.features[self.view, index])), self.labels[index]


def feature_cache_key(model: nn.Module, samples: Iterable, *, transform_description: str, views: int,
                      model_name: str | None = None) -> str:
    """A hex digest of everything the cached features depend on.

    ``samples``: objects with ``.path`` and ``.label`` in dataset order (size and mtime are read
    here, so an edited or replaced file gives a new key); ``transform_description``: the training
    transform's ``repr`` (it lists every step and parameter, including the normalisation)."""
    from visiontune.heads import find_head

    digest = hashlib.blake2b(digest_size=20)
    name = model_name or getattr(model, "visiontune_name", type(model).__name__)
    header = {"version": CACHE_FORMAT_VERSION, "model": name, "transform": transform_description, "views": views}
    digest.update(json.dumps(header, sort_keys=True).encode())
    head_name, _ = find_head(model)
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
) -> CachedFeatures:
    """Run ``model`` over ``dataset`` ``views`` times (in eval mode, in order) and keep the head's input.

    ``key`` (from :func:`feature_cache_key`) names the disk entry: a hit is read instead of running
    the model; without a key nothing touches the disk. ``store``: ``auto`` keeps the features in
    memory when they fit :data:`MEMORY_FRACTION` of the available RAM, else on disk. View ``v`` is
    computed under torch seed ``seed + v``, so the augmented copies are reproducible. Raises
    HeadNotReproducible (before any long work) when the model fails the head check."""
    if store not in STORES:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    if store == "disk" and key is None:
        raise ValueError("store='disk' needs a key (feature_cache_key) to name the cache entry")
    entry = cache_root(cache_dir) / "features" / key if key else None
    if entry is not None and (entry / "meta.json").is_file():
        log.info("feature cache hit: %s", entry)
        return load_cached_features(entry)
    device = torch.device(device)
    was_training = model.training
    model.eval()  # dropout and stochastic depth off: the backbone is a fixed function
    try:
        with capture_head_input(model) as captured:
            return _extract(model, dataset, captured, views, batch_size, num_workers, device, entry, store, seed)
    finally:
        model.train(was_training)


def _extract(model, dataset, captured, views, batch_size, num_workers, device, entry, store, seed) -> CachedFeatures:
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
                check_head_reproduces_output(model, images, captured["features"], output)
                features, staging = _allocate(views, len(dataset), tuple(batch_features.shape[1:]), entry, store)
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
    (staging / "meta.json").write_text(json.dumps({"version": CACHE_FORMAT_VERSION, "views": views, "count": len(labels)}))
    _publish(staging, entry)
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


def _allocate(views: int, count: int, feature_shape: tuple, entry: Path | None, store: str):
    """A (views, count, *feature_shape) float32 buffer: a tensor in memory, or a .npy memory map
    in a staging folder beside ``entry``; returns ``(buffer, staging folder or None)``."""
    from visiontune.data.cache import available_memory_bytes

    shape = (views, count, *feature_shape)
    needed = int(np.prod(shape)) * 4
    budget = int(available_memory_bytes() * MEMORY_FRACTION)
    if store == "memory" or (store == "auto" and (needed <= budget or entry is None)):
        if store == "auto" and needed > budget:
            log.warning("features need %.0f MiB, over the %.0f MiB budget, but without a key they stay in memory",
                        needed / 2**20, budget / 2**20)
        return torch.empty(shape, dtype=torch.float32), None
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    log.info("feature cache: %.0f MiB of features go to disk at %s", needed / 2**20, entry)
    return np.lib.format.open_memmap(staging / "features.npy", mode="w+", dtype=np.float32, shape=shape), staging


def _publish(staging: Path, entry: Path) -> None:
    """Move a complete staging folder into place; if another process won the race, keep theirs."""
    try:
        os.replace(staging, entry)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (entry / "meta.json").is_file():
            raise


def load_cached_features(entry: Path) -> CachedFeatures:
    """Memory-map a cache entry written by :func:`build_feature_cache`."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"feature cache {entry} has format {meta.get('version')}, expected {CACHE_FORMAT_VERSION}")
    features = np.load(entry / "features.npy", mmap_mode="r", allow_pickle=False)
    labels = torch.from_numpy(np.load(entry / "labels.npy", allow_pickle=False))
    return CachedFeatures(features, labels, str(entry))

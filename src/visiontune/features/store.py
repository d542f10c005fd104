"""Where cached features live: a tensor in memory, or ``.npy`` files in the cache folder.

The disk format is numpy's ``.npy`` because it can be written batch by batch through a memory map
(features larger than the RAM budget never have to be in memory at once) and read back memory-mapped
with ``allow_pickle=False`` (no code runs on load). An entry is a folder ``<cache>/features/<key>/``
with ``features.npy`` (views, N, *feature shape; float32), ``labels.npy`` and ``meta.json``; it is
written under a temporary name and renamed into place complete, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from visiontune.memory import MemoryBudget

log = logging.getLogger(__name__)

CACHE_ENV = "VISIONTUNE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/visiontune")
CACHE_FORMAT_VERSION = 1  # bump when the on-disk layout changes, so old entries are not read


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$VISIONTUNE_CACHE``, else ``~/.cache/visiontune``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


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

    @property
    def memory_bytes(self) -> int:
        """RAM the features hold (0 when memory-mapped from disk: the page cache may drop them)."""
        return self.features.numel() * self.features.element_size() if isinstance(self.features, torch.Tensor) else 0

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


def allocate_features(views: int, count: int, feature_shape: tuple, entry: Path | None, store: str,
                      budget: MemoryBudget | None = None):
    """A (views, count, *feature_shape) float32 buffer: a tensor in memory, or a .npy memory map
    in a staging folder beside ``entry``; returns ``(buffer, staging folder or None)``.

    ``store="auto"`` keeps the features in memory when they fit in what is left of ``budget`` (the
    run's, shared with the decoded images; default: a budget of their own), and claims them there."""
    shape = (views, count, *feature_shape)
    needed = int(np.prod(shape)) * 4  # float32
    budget = budget if budget is not None else MemoryBudget.from_available()
    if store == "auto" and budget.claim(needed, "cached features"):
        return torch.empty(shape, dtype=torch.float32), None
    if store == "memory" or (store == "auto" and entry is None):
        # Asked for memory, or no key to name a disk entry: memory it is, counted against the budget.
        budget.force(needed, "cached features" if store == "memory" else "cached features (no key for a disk entry)")
        return torch.empty(shape, dtype=torch.float32), None
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    log.info("feature cache: %.0f MiB of features go to disk at %s", needed / 2**20, entry)
    return np.lib.format.open_memmap(staging / "features.npy", mode="w+", dtype=np.float32, shape=shape), staging


def publish_entry(staging: Path, entry: Path) -> None:
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

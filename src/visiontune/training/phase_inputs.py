"""The training loop's side of the feature cache: which model and loaders an epoch uses.

:func:`visiontune.training.engine.fit` asks :meth:`PhaseInputs.for_epoch` at every epoch. In a phase where
only the head trains on a frozen backbone (see :func:`visiontune.features.extract.plan_feature_cache`)
the answer is the head module and loaders over cached features (train and val), built once when
the phase starts; otherwise it is the whole model and the setup's own loaders. The head is the
model's own module, so the optimizer, the best-weights file and the checkpoint are unchanged, and
the cached loaders visit the images in the same seeded order as the image loaders. The head, the
cache plan and the cache key all come from the set-up's :class:`~visiontune.model.anatomy.Anatomy`.

With a random training transform and ``cache_views`` unset, K augmented views are chosen per phase
(:func:`~visiontune.features.views.choose_cache_views`: from the phase's epochs and what is left
of the run's memory budget) and recorded in the plan. A resumed run reuses the K its checkpoint
recorded rather than choosing again, because epoch ``e`` trains on view ``e % K``: a different
K (the free RAM differs between the two starts) would feed the resumed epochs other features.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from visiontune import distributed
from visiontune.data import is_deterministic
from visiontune.features.extract import (
    CachedFeatures,
    CachePlan,
    HeadNotReproducible,
    build_feature_cache,
    feature_cache_key,
    plan_feature_cache,
)
from visiontune.features.views import choose_cache_views, feature_bytes_per_image

log = logging.getLogger(__name__)


@dataclass
class EpochInputs:
    """What one epoch trains and evaluates: ``model(batch of train_loader)`` gives logits."""

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


class _EpochView(torch.utils.data.Dataset):
    """The cached view of the current epoch, indexed as the image dataset is (SeededSamples keys)."""

    def __init__(self, cache: CachedFeatures):
        self.cache, self.epoch = cache, 0
        self.current = cache.dataset(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.current = epoch, self.cache.dataset(epoch)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # SeededSamples keys are (index, seed)
        return self.current[index]


class PhaseInputs:
    """Per phase: the plan (logged, and kept for report.json) and the cached loaders if any."""

    def __init__(self, setup, earlier_plans: dict[str, dict] | None = None):
        self.setup = setup
        self.plans: dict[str, dict] = {}  # phase name -> CachePlan.to_dict(), for the report
        # A resumed run's plans (TrainingState.feature_cache): their automatic K is kept.
        self.earlier_plans = dict(earlier_plans or {})
        self._phase_index: int | None = None
        self._cached: EpochInputs | None = None
        self._train_view: _EpochView | None = None
        self._cached_bytes = 0  # RAM the cached features claimed from setup.memory_budget

    def for_epoch(self, phase_index: int, epoch: int) -> EpochInputs:
        """The model and loaders of ``epoch`` (in phase ``phase_index``), sampler set to the epoch."""
        if phase_index != self._phase_index:
            self._phase_index = phase_index
            self._release_cache()
            self._cached = self._prepare(phase_index)
        inputs = self._cached or EpochInputs(self.setup.model, self.setup.train_loader, self.setup.val_loader)
        if self._cached is not None:
            self._train_view.set_epoch(epoch)
        for ordered in (inputs.train_loader.sampler, inputs.train_loader.dataset):  # a stream orders itself
            if hasattr(ordered, "set_epoch"):
                ordered.set_epoch(epoch)
        return inputs

    def _release_cache(self) -> None:
        """Drop the last phase's cached features and give their RAM back to the run's budget."""
        if self._cached is not None:
            self.setup.memory_budget.release(self._cached_bytes)
        self._cached, self._train_view, self._cached_bytes = None, None, 0

    def _prepare(self, phase_index: int) -> EpochInputs | None:
        phase = self.setup.phases[phase_index]
        plan = self._plan(phase)
        if plan.enabled:
            try:
                inputs = self._cached_inputs(plan)
            except HeadNotReproducible as error:
                plan = CachePlan("off", 0, f"{error}; training through the whole model")
                inputs = None
        else:
            inputs = None
        log.info("phase %s: feature cache %s (%s)", phase.name, plan.mode, plan.reason)
        self.plans[phase.name] = plan.to_dict()
        return inputs

    def _plan(self, phase) -> CachePlan:
        setup = self.setup
        mode = getattr(setup.config, "feature_cache", "auto")
        if mode == "off":
            return CachePlan("off", 0, "turned off (feature_cache: off)")
        if isinstance(setup.train_loader.dataset, torch.utils.data.IterableDataset):
            return CachePlan("off", 0, "streamed training data is read as it comes, never cached")
        transform = getattr(_image_dataset(setup.train_loader), "transform", None)
        asked = getattr(setup.config, "cache_views", None)  # None: choose K; 0: train uncached
        earlier = self.earlier_plans.get(phase.name, {})
        if asked is None and earlier.get("mode") == "views":
            # Resume: the K the run started with; same model and config, so the same plan and reason.
            plan = plan_feature_cache(setup.model, deterministic_transform=False, views=int(earlier["views"]),
                                      batch_mixing=setup.batch_mixer is not None, anatomy=setup.anatomy)
            return dataclasses.replace(plan, reason=earlier.get("reason", plan.reason)) if plan.enabled else plan
        return plan_feature_cache(
            setup.model,
            deterministic_transform=transform is not None and is_deterministic(transform),
            views=asked or 0,
            batch_mixing=setup.batch_mixer is not None,
            anatomy=setup.anatomy,
            choose_views=None if asked is not None else lambda: self._choose_views(phase),
        )

    def _choose_views(self, phase) -> tuple[int, str]:
        """K for ``phase``: its epochs against what the memory budget has left, after the
        validation features (one copy, cached after the training views) are set aside. Under
        torchrun every process takes rank 0's K: their budgets differ, their views must not."""
        setup = self.setup
        train_images = _image_dataset(setup.train_loader)
        per_image = feature_bytes_per_image(setup.model, train_images, device=setup.device, anatomy=setup.anatomy)
        val_bytes = per_image * len(setup.val_loader.dataset)
        chosen = choose_cache_views(phase.epochs, bytes_per_view=per_image * len(train_images),
                                    free_bytes=max(0, setup.memory_budget.free_bytes - val_bytes))
        return distributed.broadcast_object(chosen)

    def _cached_inputs(self, plan: CachePlan) -> EpochInputs:
        setup = self.setup
        store = getattr(setup.config, "feature_cache", "auto")
        train_cache = self._cache(_image_dataset(setup.train_loader), plan.views, store)
        val_cache = self._cache(setup.val_loader.dataset, 1, store)
        self._cached_bytes = train_cache.memory_bytes + val_cache.memory_bytes
        self._train_view = _EpochView(train_cache)
        train = setup.train_loader
        # The image loader's own sampler: the same seeded order; features need no worker processes.
        train_loader = DataLoader(self._train_view, batch_size=train.batch_size, sampler=train.sampler,
                                  drop_last=train.drop_last)
        val_features = val_cache.dataset(0)
        val_loader = DataLoader(val_features, batch_size=setup.val_loader.batch_size,
                                sampler=distributed.make_eval_sampler(val_features))
        return EpochInputs(setup.anatomy.head_module(setup.model), train_loader, val_loader)

    def _sharded_cache(self, dataset, views: int) -> CachedFeatures:
        """Under torchrun: each process runs the backbone over its shard of the images (rows r,
        r+W, ...) and the shards are gathered back into dataset order, so every image's features
        are computed once rather than once per process. Kept in memory: every process needs all
        of them, since each epoch's shard of the training order is different."""
        setup = self.setup
        local = build_feature_cache(
            setup.model, distributed.shard_dataset(dataset), views=views, batch_size=setup.config.batch_size,
            device=setup.device, store="memory", seed=setup.config.seed, anatomy=setup.anatomy)
        features = torch.stack([distributed.all_gather_shards(torch.as_tensor(local.features[view]), len(dataset))
                                for view in range(views)])
        gathered = CachedFeatures(features, distributed.all_gather_shards(local.labels, len(dataset)), "memory")
        setup.memory_budget.force(gathered.memory_bytes, "gathered cached features")  # the shard is freed on return
        return gathered

    def _cache(self, dataset, views: int, store: str) -> CachedFeatures:
        """Features of ``dataset``; a disk entry is keyed by its files when it reads files."""
        setup = self.setup
        if distributed.world_size() > 1:
            return self._sharded_cache(dataset, views)
        samples = getattr(dataset, "samples", None)  # ImageDataset has them; decoded images live in memory
        key = None
        if samples is not None:
            key = feature_cache_key(setup.model, samples, transform_description=repr(dataset.transform),
                                    views=views, model_name=f"{setup.config.model}|{setup.config.weights}",
                                    anatomy=setup.anatomy)
        return build_feature_cache(
            setup.model, dataset, views=views, batch_size=setup.config.batch_size,
            # Decoded images only need the cheap tensor transforms: worker processes would cost more
            # to start than they save. Files still need decoding, in the configured workers.
            num_workers=setup.train_loader.num_workers if samples is not None else 0, device=setup.device, key=key,
            store=store if store in ("memory", "disk") and (key or store == "memory") else "auto",
            seed=setup.config.seed, memory_budget=setup.memory_budget, anatomy=setup.anatomy)


def _image_dataset(loader: DataLoader):
    """The dataset of images under the training loader's seeding wrapper (SeededSamples)."""
    return getattr(loader.dataset, "dataset", loader.dataset)

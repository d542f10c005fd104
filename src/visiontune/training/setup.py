"""Everything a training run needs before its first step: data, model, optimizer, loss.

:func:`build_training` is the one place that turns a :class:`~visiontune.config.TrainConfig` into
live objects; the training loop and the LR finder both start from its :class:`TrainingSetup`.
The training loader reads its images in the seeded order of :mod:`visiontune.training.samplers`,
so an epoch gives the same batches straight through or after a resume.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

# Modules rather than their functions: tests replace data.fits_in_memory and create.create_model there.
from visiontune import data, distributed
from visiontune.checkpoint import load_weights
from visiontune.checkpoint.suffixes import has_weight_suffix
from visiontune.config import TrainConfig
from visiontune.data.datasets import require_trainable
from visiontune.data.samples import DatasetSplit
from visiontune.data.sources import VAL_PATHS, hf_datasets, source_kind, streamed_datasets, validation_dataset
from visiontune.data.multilabel import require_trainable_multilabel
from visiontune.data.multilabel_sources import discover_for_task, resolve_task
from visiontune.features.store import cache_root
from visiontune.device import (Precision, configure_threads, default_workers, prefers_channels_last, resolve_device,
                               resolve_precision)
from visiontune.errors import ConfigError
from visiontune.memory import MemoryBudget
from visiontune.model import create
from visiontune.model.anatomy import Anatomy, anatomy_of
from visiontune.model.preprocessing import Preprocessing
from visiontune.training.memory_estimate import check_training_memory
from visiontune.training.samplers import EpochSampler, SeededSamples
from visiontune.training.strategies import Phase, apply_phase, build_optimizer, plan_phases
from visiontune.training.task import SINGLE_LABEL, SingleLabel, task_for

log = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    """Live objects for training ``config`` (the optimizer is the first phase's)."""

    config: TrainConfig
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    classes: list[str]
    device: torch.device
    precision: Precision
    preprocessing: Preprocessing
    phases: list[Phase]
    anatomy: Anatomy  # the model's heads and layer groups, found once here and passed to every stage
    batch_mixer: Callable | None = None
    val_samples: list = field(default_factory=list)  # Sample(path, label) per val image, loader order
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped
    split_info: dict = field(default_factory=dict)
    load_report: dict | None = None  # what loading a weights file did (None for built-in weights)
    num_train_images: int = 0
    # RAM the run's caches share: the decoded images claim theirs here, the feature cache what is left
    memory_budget: MemoryBudget = field(default_factory=MemoryBudget.from_available)
    task: SingleLabel = SINGLE_LABEL  # single-label, or multi-label (BCE, mAP, thresholds)


# -- building ------------------------------------------------------------------------------------


def build_training(config: TrainConfig) -> TrainingSetup:
    """Data, model (on its device, first phase's parameters trainable), optimizer and loss."""
    torch.manual_seed(config.seed)  # the new head's initialisation
    random.seed(config.seed)
    device = distributed.device_for_rank(resolve_device(config.device))  # cuda:LOCAL_RANK under torchrun
    precision = resolve_precision(device, config.precision)
    configure_threads(device)
    # Before any image is decoded or weights file read: refuse what cannot fit in memory.
    check_training_memory(config, resolve_run_preprocessing(config), device, precision)
    memory_budget = MemoryBudget.from_available()  # measured once, before anything of the run is in memory
    # The config is the run's resolved copy: config.yaml then records the task that trained.
    task_requested = config.task
    config.task = resolve_task(config.data, config.task)
    split, train_set, val_set, val_samples, bad, preprocessing = _build_datasets(config, memory_budget)
    task = task_for(config.task, len(split.classes))
    model, load_report = build_model(config, len(split.classes))
    refuse_single_value_batchnorm(model, config, preprocessing.crop_size)
    model.to(device)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, device)
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)
    if config.compile:
        _keep_compile_caches_in(cache_root())
        model.compile()  # in place: parameter and module names, hence the anatomy, are unchanged
    # Found once, on the model as it will train (SyncBatchNorm swapped in): nothing later searches it again.
    anatomy = anatomy_of(model, name=config.model)
    phases = plan_phases(config)
    apply_phase(model, phases[0], anatomy)
    optimizer = build_optimizer(model, phases[0], config, anatomy)
    workers = default_workers(device=device) if config.workers is None else config.workers
    train_targets = list(train_set.targets)
    return TrainingSetup(
        config=config,
        model=model,
        train_loader=_train_loader(train_set, config, workers, device),
        val_loader=_eval_loader(val_set, config.batch_size, workers, device),
        optimizer=optimizer,
        loss_fn=task.build_loss(config, train_targets, len(split.classes)).to(device),
        classes=list(split.classes),
        device=device,
        precision=precision,
        preprocessing=preprocessing,
        phases=phases,
        anatomy=anatomy,
        batch_mixer=task.batch_mixer(len(split.classes), config.mixup, config.cutmix),
        val_samples=val_samples,
        bad_files=bad,
        split_info={"source": split.source, "train_images": len(train_set), "val_images": len(val_set),
                    **split.split_info, "task": config.task, "task_requested": task_requested},
        load_report=load_report,
        num_train_images=len(train_set),
        memory_budget=memory_budget,
        task=task,
    )


def resolve_run_preprocessing(config: TrainConfig) -> Preprocessing:
    preprocessing = create.resolve_preprocessing(config.model, weights=_builtin_weights(config.weights))
    return preprocessing.with_image_size(config.image_size) if config.image_size else preprocessing


def _builtin_weights(weights: str) -> str | None:
    """The weights create_model loads itself; None for 'none' and for a file (loaded afterwards)."""
    return None if weights.lower() == "none" or is_weights_file(weights) else weights


def is_weights_file(weights: str) -> bool:
    return Path(weights).expanduser().exists() or has_weight_suffix(weights)


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The architecture with its pretrained weights; a weights file goes through load_weights,
    whose report is returned (as a dict) for report.json."""
    model = create.create_model(config.model, num_classes=num_classes, weights=_builtin_weights(config.weights))
    if not is_weights_file(config.weights):
        return model, None
    report = load_weights(model, Path(config.weights).expanduser(), source_model=config.source_model)
    log.info("%s", report)
    return model, report.to_dict()


def refuse_single_value_batchnorm(model: nn.Module, config: TrainConfig, crop_size: int) -> None:
    """A BatchNorm layer in training mode needs more than one value per channel (batch x height x
    width); with one image per step and a 1x1 feature map it would stop the first step with a
    traceback. One eval-mode forward of one blank image (running statistics untouched) finds such
    layers before training starts. The lone last image of an epoch is dropped by the train loader."""
    batch_size = distributed.per_process_batch_size(config.batch_size)
    norms = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    if batch_size > 1 or config.strategy == "linear-probe" or not norms:
        return
    single: list[str] = []
    hooks = [module.register_forward_pre_hook(
        lambda module, inputs, name=name: single.append(name) if inputs[0].numel() == inputs[0].shape[1] else None)
        for name, module in norms.items()]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, crop_size, crop_size))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    if single:
        raise ConfigError(
            f"--batch-size {config.batch_size} gives {batch_size} image per step, and BatchNorm layer {single[0]} of "
            f"{config.model} then sees a single value per channel at {crop_size} px, which it cannot normalise; "
            "use --batch-size 2 or more (per process), a larger --image-size, or --strategy linear-probe")


def build_loss(config: TrainConfig, train_targets: list[int], num_classes: int) -> nn.Module:
    """The single-label loss (see :meth:`visiontune.training.task.SingleLabel.build_loss`)."""
    return SINGLE_LABEL.build_loss(config, train_targets, num_classes)


def _build_datasets(config: TrainConfig, memory_budget: MemoryBudget):
    preprocessing = resolve_run_preprocessing(config)
    train_transform, eval_transform = data.build_transforms(preprocessing, config.augment)
    if source_kind(config.data) == "shards":
        return (*_streamed(config, train_transform, eval_transform), preprocessing)
    if source_kind(config.data) == "hf":
        return (*_from_hf(config, train_transform, eval_transform), preprocessing)
    # A folder or CSV given by --val-data is decoded once like the training images (and a multi-label
    # run's must be a CSV: discover_for_task says so); shards and hf: validation are read as they come.
    streamed_val = config.val_data is not None and config.task != "multilabel" and \
        source_kind(config.val_data) in ("shards", "hf")
    split = discover_for_task(config.data, config.task, val_data=None if streamed_val else config.val_data,
                              val_split=config.val_split, seed=config.seed)
    if streamed_val:  # all of --data trains
        split = dataclasses.replace(split, train=split.train + split.val, val=[])
    total = len(split.train) + len(split.val)
    nbytes = data.decoded_bytes(total, preprocessing.resize_size)
    spill_dir = cache_root() / DECODED_SPILL_DIR
    in_memory = data.fits_in_memory(total, preprocessing.resize_size, memory_budget)
    if in_memory or data.fits_on_disk(nbytes, spill_dir):
        if in_memory:
            memory_budget.claim(nbytes, "decoded images")
        else:  # over the run's memory budget: memory-mapped on disk rather than decoded again every epoch
            log.info("decoded images (%.0f MiB) exceed the memory budget left (%.0f MiB); memory-mapping them "
                     "from %s", nbytes / 2**20, memory_budget.free_bytes / 2**20, spill_dir)
        # Decode once: every epoch after the first would otherwise decode and resize every file again.
        def decoded(samples):
            return data.decode_to_uint8(samples, preprocessing.resize_size, crop_size=preprocessing.crop_size,
                                        interpolation=preprocessing.interpolation, on_bad_image=config.on_bad_image,
                                        spill_dir=None if in_memory else spill_dir)

        train_images, val_images = decoded(split.train), decoded(split.val)
        train_set = data.InMemoryDataset.from_decoded(train_images, train_transform)
        val_set = data.InMemoryDataset.from_decoded(val_images, eval_transform)
        if not in_memory:  # still the files' images: a feature cache on disk is keyed by them
            train_set.samples, val_set.samples = train_images.samples, val_images.samples
        bad, val_samples = train_images.bad + val_images.bad, val_images.samples
        where = "memory (decoded once)" if in_memory else f"disk (decoded once, memory-mapped from {spill_dir})"
    else:
        log.warning("decoded images (%.0f MiB) fit neither the memory budget nor the free disk of %s; decoding "
                    "every file again every epoch", nbytes / 2**20, spill_dir)
        where = "files (decoded every epoch)"
        train_samples, train_bad = data.check_images(split.train, config.on_bad_image)
        val_samples, val_bad = data.check_images(split.val, config.on_bad_image)
        train_set = data.ImageDataset(train_samples, train_transform)
        val_set = data.ImageDataset(val_samples, eval_transform)
        bad = train_bad + val_bad
    val_path = where
    if streamed_val:
        val_set, val_samples, val_bad = validation_dataset(config.val_data, split.classes, eval_transform,
                                                           config.on_bad_image, image_column=config.image_column,
                                                           label_column=config.label_column)
        bad, val_path = bad + val_bad, VAL_PATHS[source_kind(config.val_data)]
        split.split_info.update(val_data=config.val_data, val_kind=source_kind(config.val_data))
    # after dropping unreadable files
    if config.task == "multilabel":
        require_trainable_multilabel(split.classes, list(train_set.targets), list(val_set.targets))
    else:
        require_trainable(split, list(train_set.targets), list(val_set.targets), len(bad))
    split.split_info.update(train_path=where, val_path=val_path)  # report.json: where each split's images came from
    return split, train_set, val_set, val_samples, bad, preprocessing


def _streamed(config: TrainConfig, train_transform, eval_transform):
    """Training shards streamed (data/shards.py): nothing is listed, decoded ahead or cached."""
    streamed = streamed_datasets(config.data, config.val_data, train_transform, eval_transform, seed=config.seed,
                                 epoch_samples=config.epoch_samples, rank=distributed.rank(),
                                 world=distributed.world_size(), on_bad_image=config.on_bad_image,
                                 balance=config.balance)
    split = DatasetSplit(streamed.classes, [], [], source="shards", split_info=streamed.split_info)
    return split, streamed.train_set, streamed.val_set, streamed.val_samples, streamed.bad


def _from_hf(config: TrainConfig, train_transform, eval_transform):
    """``hf:`` data (data/hf_datasets.py): rows read from the dataset's memory-mapped Arrow files."""
    loaded = hf_datasets(config.data, config.val_data, train_transform, eval_transform, seed=config.seed,
                         val_split=config.val_split, on_bad_image=config.on_bad_image,
                         image_column=config.image_column, label_column=config.label_column)
    split = DatasetSplit(loaded.classes, [], [], source="hf", split_info=loaded.split_info)
    require_trainable(split, list(loaded.train_set.targets), list(loaded.val_set.targets), len(loaded.bad))
    return split, loaded.train_set, loaded.val_set, loaded.val_samples, loaded.bad


def _train_loader(dataset: Dataset, config: TrainConfig, workers: int, device: torch.device) -> DataLoader:
    if isinstance(dataset, IterableDataset):
        # The stream splits itself between processes and workers and orders each epoch by its
        # set_epoch; workers are started per epoch so that they see that epoch.
        batch_size = distributed.per_process_batch_size(config.batch_size)
        if workers > dataset.readers_per_process:
            log.info("%d loader workers for %d shard(s) per process: using %d (each worker reads its own shards)",
                     workers, dataset.readers_per_process, dataset.readers_per_process)
            workers = dataset.readers_per_process
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=len(dataset) % batch_size == 1,
                          pin_memory=device.type == "cuda")
    # Under torchrun each process takes its share of the epoch's order and of the global batch.
    sampler = distributed.shard_sampler(EpochSampler(len(dataset), config.seed))
    batch_size = distributed.per_process_batch_size(config.batch_size)
    # A lone last image would make BatchNorm fail on 1x1 feature maps; drop only that case.
    drop_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, persistent_workers=workers > 0, drop_last=drop_last,
                      pin_memory=device.type == "cuda")


def _eval_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    if isinstance(dataset, IterableDataset):  # streamed validation: every process reads all of it
        return DataLoader(dataset, batch_size=batch_size, num_workers=0, pin_memory=device.type == "cuda")
    # Each process evaluates its unpadded shard; loops.evaluate sums the metrics over processes.
    return DataLoader(dataset, batch_size=batch_size, sampler=distributed.make_eval_sampler(dataset),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


DECODED_SPILL_DIR = "decoded"  # under the cache folder: decoded images over the memory budget, memory-mapped
COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def _keep_compile_caches_in(cache: Path) -> None:
    """torch.compile caches its kernels under $TMPDIR/torchinductor_<user> and ~/.triton by default;
    unless the user chose other places, they go into visiontune's cache folder (read at compile time)."""
    for variable, folder in COMPILE_CACHES.items():
        os.environ.setdefault(variable, str(cache / folder))

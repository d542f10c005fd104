"""Everything a training run needs before its first step: data, model, optimizer, loss.

:func:`build_training` is the one place that turns a :class:`~visiontune.config.TrainConfig` into
live objects; the training loop and the LR finder both start from its :class:`TrainingSetup`.

Reproducibility: the training order and every image's augmentation derive from
``(seed, epoch, index)`` alone (:class:`EpochSampler` draws a permutation and one seed per image
from a generator seeded with ``seed + epoch``; :class:`SeededSamples` applies the transform under
that seed). So an epoch gives the same batches whether it runs straight through or after a
resume, with or without worker processes.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from visiontune import distributed
from visiontune.config import TrainConfig
from visiontune.features.store import cache_root
from visiontune.device import (Precision, configure_threads, default_workers, prefers_channels_last, resolve_device,
                               resolve_precision)
from visiontune.model.preprocessing import Preprocessing
from visiontune.training.strategies import Phase, apply_phase, build_optimizer, plan_phases

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
    batch_mixer: Callable | None = None
    val_samples: list = field(default_factory=list)  # Sample(path, label) per val image, loader order
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped
    split_info: dict = field(default_factory=dict)
    load_report: dict | None = None  # what loading a weights file did (None for built-in weights)
    num_train_images: int = 0


class EpochSampler(Sampler):
    """Yields ``(index, augmentation seed)`` in an order fixed by ``seed + epoch`` (call set_epoch)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class SeededSamples(Dataset):
    """``dataset[index]`` computed under torch and Python RNGs seeded with the sampler's per-image
    seed, leaving the process's own RNG streams untouched."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]


@contextmanager
def _seeded(seed: int):
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)  # CPU generator only: CUDA streams stay untouched
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


# -- building ------------------------------------------------------------------------------------


def build_training(config: TrainConfig) -> TrainingSetup:
    """Data, model (on its device, first phase's parameters trainable), optimizer and loss."""
    from visiontune.data import build_batch_mixer, build_transforms

    torch.manual_seed(config.seed)  # the new head's initialisation
    random.seed(config.seed)
    device = distributed.device_for_rank(resolve_device(config.device))  # cuda:LOCAL_RANK under torchrun
    precision = resolve_precision(device, config.precision)
    configure_threads(device)
    split, train_set, val_set, val_samples, bad, preprocessing = _build_datasets(config, build_transforms)
    model, load_report = build_model(config, len(split.classes))
    model.to(device)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, device)
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)
    if config.compile:
        _keep_compile_caches_in(cache_root())
        model.compile()  # in place: parameter names, checkpoints and find_head are unchanged
    phases = plan_phases(config)
    apply_phase(model, phases[0])
    optimizer = build_optimizer(model, phases[0], config)
    workers = default_workers() if config.workers is None else config.workers
    train_targets = list(train_set.targets)
    return TrainingSetup(
        config=config,
        model=model,
        train_loader=_train_loader(train_set, config, workers, device),
        val_loader=_eval_loader(val_set, config.batch_size, workers, device),
        optimizer=optimizer,
        loss_fn=build_loss(config, train_targets, len(split.classes)).to(device),
        classes=list(split.classes),
        device=device,
        precision=precision,
        preprocessing=preprocessing,
        phases=phases,
        batch_mixer=build_batch_mixer(len(split.classes), config.mixup, config.cutmix),
        val_samples=val_samples,
        bad_files=bad,
        split_info={"source": split.source, "train_images": len(train_set), "val_images": len(val_set),
                    **split.split_info},
        load_report=load_report,
        num_train_images=len(train_set),
    )


def resolve_run_preprocessing(config: TrainConfig) -> Preprocessing:
    from visiontune.model.create import resolve_preprocessing

    preprocessing = resolve_preprocessing(config.model, weights=_builtin_weights(config.weights))
    return preprocessing.with_image_size(config.image_size) if config.image_size else preprocessing


def _builtin_weights(weights: str) -> str | None:
    """The weights create_model loads itself; None for 'none' and for a file (loaded afterwards)."""
    return None if weights.lower() == "none" or is_weights_file(weights) else weights


def is_weights_file(weights: str) -> bool:
    return Path(weights).expanduser().exists() or any(
        weights.endswith(suffix) for suffix in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"))


def build_model(config: TrainConfig, num_classes: int) -> tuple[nn.Module, dict | None]:
    """The architecture with its pretrained weights; a weights file goes through load_weights,
    whose report is returned (as a dict) for report.json."""
    from visiontune.model.create import create_model

    model = create_model(config.model, num_classes=num_classes, weights=_builtin_weights(config.weights))
    if not is_weights_file(config.weights):
        return model, None
    from visiontune.checkpoint import load_weights

    report = load_weights(model, Path(config.weights).expanduser())
    log.info("%s", report)
    return model, report.to_dict()


def build_loss(config: TrainConfig, train_targets: list[int], num_classes: int) -> nn.Module:
    """Cross-entropy with label smoothing; ``balance`` weights each class by n / (k * count).

    Why a weighted loss rather than a balanced sampler: every image is still seen once per epoch
    (no duplicated minority images, no dropped majority ones), the epoch stays a fixed
    permutation that resumes exactly, and it shards unchanged across processes."""
    weight = None
    if config.balance:
        counts = torch.bincount(torch.tensor(train_targets, dtype=torch.long), minlength=num_classes).clamp(min=1)
        weight = (len(train_targets) / (num_classes * counts.double())).float()
        log.info("class weights: %s", [round(w, 3) for w in weight.tolist()])
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def _build_datasets(config: TrainConfig, build_transforms):
    from visiontune.data import ImageDataset, InMemoryDataset, check_images, decode_to_uint8, discover, fits_in_memory

    split = discover(config.data, val_split=config.val_split, seed=config.seed)
    preprocessing = resolve_run_preprocessing(config)
    train_transform, eval_transform = build_transforms(preprocessing, config.augment)
    total = len(split.train) + len(split.val)
    if fits_in_memory(total, preprocessing.resize_size):
        # Decode once: every epoch after the first would otherwise decode and resize every file again.
        def decoded(samples):
            return decode_to_uint8(samples, preprocessing.resize_size, crop_size=preprocessing.crop_size,
                                   interpolation=preprocessing.interpolation, on_bad_image=config.on_bad_image)

        train_images, val_images = decoded(split.train), decoded(split.val)
        train_set = InMemoryDataset.from_decoded(train_images, train_transform)
        val_set = InMemoryDataset.from_decoded(val_images, eval_transform)
        bad, val_samples = train_images.bad + val_images.bad, val_images.samples
    else:
        train_samples, train_bad = check_images(split.train, config.on_bad_image)
        val_samples, val_bad = check_images(split.val, config.on_bad_image)
        train_set, val_set = ImageDataset(train_samples, train_transform), ImageDataset(val_samples, eval_transform)
        bad = train_bad + val_bad
    _require_images(train_set, val_set, config)
    return split, train_set, val_set, val_samples, bad, preprocessing


def _require_images(train_set: Dataset, val_set: Dataset, config: TrainConfig) -> None:
    from visiontune.errors import DataError

    for name, dataset in (("training", train_set), ("validation", val_set)):
        if len(dataset) == 0:
            raise DataError(f"no readable {name} images in {config.data}; every file failed to decode "
                            "(see the warnings above, or run with --on-bad-image error to stop at the first)")


def _train_loader(dataset: Dataset, config: TrainConfig, workers: int, device: torch.device) -> DataLoader:
    # Under torchrun each process takes its share of the epoch's order and of the global batch.
    sampler = distributed.shard_sampler(EpochSampler(len(dataset), config.seed))
    batch_size = distributed.per_process_batch_size(config.batch_size)
    # A lone last image would make BatchNorm fail on 1x1 feature maps; drop only that case.
    drop_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, persistent_workers=workers > 0, drop_last=drop_last,
                      pin_memory=device.type == "cuda")


def _eval_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    # Each process evaluates its unpadded shard; loops.evaluate sums the metrics over processes.
    return DataLoader(dataset, batch_size=batch_size, sampler=distributed.make_eval_sampler(dataset),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


COMPILE_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def _keep_compile_caches_in(cache: Path) -> None:
    """torch.compile caches its kernels under $TMPDIR/torchinductor_<user> and ~/.triton by default;
    unless the user chose other places, they go into visiontune's cache folder (read at compile time)."""
    for variable, folder in COMPILE_CACHES.items():
        os.environ.setdefault(variable, str(cache / folder))

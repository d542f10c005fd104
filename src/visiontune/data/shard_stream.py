"""The epoch stream over WebDataset shards (:class:`ShardStream`); the shards themselves: :mod:`.shards`.

How an epoch is cut from the shards (:class:`ShardStream`):

* shards are split between torchrun processes (process ``r`` of ``W`` owns shards ``r, r+W, ...``)
  and, inside a process, between loader workers, so no two readers ever open the same shard;
* each reader streams its shards in passes (pass ``p`` in an order seeded by ``seed + p``) and an
  epoch is the next ``epoch_samples / (W x workers)`` samples of that endless stream -- an epoch
  is a sample count (as ``WebDataset.with_epoch``), not necessarily one pass;
* those samples go through a shuffle buffer seeded by ``(seed, epoch)`` that is emptied at the end
  of the epoch, and each image's augmentation is seeded per sample.

So epoch ``e`` is a pure function of ``(seed, e, W, workers, shards)``: a resumed run skips the
samples of epochs ``0..e-1`` (whole shards by their counts, without opening them) and continues
at the same shard and sample position with the same order. "Exact" means: the same samples in the
same order with the same augmentation, provided the shards, the process count and the worker
count are the ones the run started with. Checkpoints are written per epoch, so an interruption
mid-epoch resumes at the start of that epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import IterableDataset, get_worker_info

from visiontune.data.images import BadImageError
from visiontune.data.shards import SHARD_INDEX, ShardSet, iter_shard, sample_image, sample_label
from visiontune.errors import ConfigError, DataError, shown

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000  # samples held (still encoded) for shuffling: ~ a few MB of small JPEGs


class ShardStream(IterableDataset):
    """``(transform(image), label)`` for one process's part of an epoch (see the module docstring).

    ``train=False`` reads every shard once in order, unshuffled, in every process (validation)."""

    def __init__(self, shards: ShardSet, transform: Callable | None, *, seed: int = 0,
                 epoch_samples: int | None = None, train: bool = True, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, targets: list[int] | None = None,
                 on_bad_image: str = "skip"):
        self.shards, self.transform, self.seed, self.train = shards, transform, seed, train
        self.rank, self.world, self.shuffle_buffer, self.epoch = rank, world, shuffle_buffer, 0
        self.on_bad_image = on_bad_image  # skip: an undecodable image is left out of its epoch (logged)
        self.classes = shards.classes
        self._targets = list(targets or [])  # known for validation (listed); never for training
        total = shards.total
        self.epoch_samples = epoch_samples if epoch_samples is not None else total
        if self.epoch_samples is None:
            raise ConfigError(f"the shards {shown(shards.pattern)} do not say how many samples they hold (no counts in "
                              f"{SHARD_INDEX}); give --epoch-samples N, the training samples per epoch")
        if train and len(shards.urls) < world:
            raise DataError(f"{len(shards.urls)} shard(s) for {world} processes: each process needs its own shards; "
                            "write smaller shards (visiontune shard --shard-size) or use fewer processes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this process yields per epoch (every process reads all of validation)."""
        return self.epoch_samples // self.world if self.train else self.epoch_samples

    @property
    def readers_per_process(self) -> int:
        """How many loader workers can each read shards of their own in this process."""
        return len(self.shards.urls[self.rank::self.world])

    @property
    def targets(self) -> list[int]:
        # Validation's labels, listed up front; training's are unknown without reading the stream
        # (so class weights, --balance, are refused for shards).
        return self._targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        if not self.train:
            for url in self.shards.urls:
                for sample in iter_shard(url):
                    yield self._prepared(sample, None)
            return
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        own = self.shards.urls[self.rank::self.world]
        if len(own) < workers:
            raise DataError(f"process {self.rank} has {len(own)} shard(s) for {workers} loader workers; use "
                            f"--workers {len(own)} or fewer, or write smaller shards")
        per_process = len(self)
        quota = per_process // workers + (worker_id < per_process % workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker_id}")
        samples = _take(self._reader_stream(own, worker_id, workers, skip=self.epoch * quota), quota)
        for sample in _buffer_shuffle(samples, self.shuffle_buffer, rng):
            seed = rng.getrandbits(62)  # drawn whether or not the image decodes: later samples keep their seeds
            try:
                yield self._prepared(sample, seed)
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise
                log.warning("skipping %s: %s", error.path, error.reason)

    def _reader_stream(self, own: list[str], worker_id: int, workers: int, skip: int) -> Iterator[dict]:
        """The endless stream of this reader's shards, pass after pass, ``skip`` samples dropped
        (whole shards by their counts, without opening them)."""
        passes = 0
        while True:
            order = own[:]
            random.Random(f"{self.seed}/pass/{passes}/{self.rank}").shuffle(order)
            mine = order[worker_id::workers]
            read_any = False
            for url in mine:
                count = self.shards.count(url)
                if count is not None and skip >= count:
                    skip -= count
                    read_any = read_any or count > 0
                    continue
                for sample in iter_shard(url):
                    read_any = True
                    if skip > 0:
                        skip -= 1
                        continue
                    yield sample
            if not read_any:
                raise DataError(f"the shards {', '.join(mine[:3])} hold no samples; check them with tar tf")
            passes += 1

    def _prepared(self, sample: dict, seed: int | None):
        label = sample_label(sample, self.classes)
        image = sample_image(sample)
        if self.transform is None:
            return image, label
        with _seeded(seed):
            return self.transform(image), label


def _take(stream: Iterator[dict], count: int) -> Iterator[dict]:
    for index, sample in enumerate(stream):
        if index >= count:
            return
        yield sample


def _buffer_shuffle(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle with a buffer of ``size`` samples; the buffer is emptied when ``stream`` ends."""
    buffer: list[dict] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@contextmanager
def _seeded(seed: int | None):
    """The sample's augmentation under its own seed, leaving the process's RNG streams untouched
    (as training.samplers does for map-style datasets; the data layer cannot import it)."""
    if seed is None:
        yield
        return
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)

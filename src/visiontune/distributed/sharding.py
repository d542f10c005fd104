"""Which images each process reads: its share of every training epoch (padded, so all ranks
take the same number of steps) and of the validation set (unpadded: each image exactly once)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Dataset, Sampler, Subset

from visiontune.distributed.group import rank, world_size


class ShardedSampler(Sampler):
    """This process's share of another sampler's order: rank r takes items r, r+W, r+2W, ...

    Every rank iterates the same base order (a seeded permutation is the same everywhere), so
    together the ranks read each item once. ``pad=True`` (training) repeats items from the start
    so every rank takes the same number of steps, which DDP needs; ``pad=False`` (evaluation)
    reads each item exactly once, the shards differing in length by at most one.
    ``set_epoch`` is forwarded to the base sampler.
    """

    def __init__(self, base, rank: int = 0, world_size: int = 1, pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        self.base, self.rank, self.world_size, self.pad = base, rank, world_size, pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(len(self.base) / self.world_size)
        return len(range(self.rank, len(self.base), self.world_size))

    def __iter__(self) -> Iterator:
        items = list(self.base)
        if self.pad and items:
            shortfall = len(self) * self.world_size - len(items)
            items += (items * math.ceil(shortfall / len(items)))[:shortfall]
        return iter(items[self.rank :: self.world_size])


def shard_sampler(base, pad: bool = True) -> Sampler:
    """``base`` unchanged in one process, else this rank's :class:`ShardedSampler` of it. With a
    seeded base order and per-process batch = global batch / W, the global batches are exactly
    those of one process: the step-k batch of rank r holds positions kB..(k+1)B-1 of the order."""
    return base if world_size() == 1 else ShardedSampler(base, rank(), world_size(), pad=pad)


def make_eval_sampler(dataset) -> Sampler:
    """This process's share of the validation set, every image exactly once over all ranks, in
    order (rank r: r, r+W, ...); reduce metrics with :func:`all_reduce_sum`, reassemble per-image
    results with :func:`all_gather_shards`."""
    return ShardedSampler(range(len(dataset)), rank(), world_size(), pad=False)


def shard_batches(num_items: int, batch_size: int) -> list[int]:
    """Indices of this process's share of ``range(num_items)`` cut into batches of ``batch_size``,
    by whole batches: rank r takes batches r, r+W, ... unpadded (every index once over all
    ranks; all of them in one process). Batch the result with the same ``batch_size`` and every
    forward pass sees exactly the images it sees in one process, so per-image results (and
    metrics summed from them) are those of one process, not merely close: the kernels that a
    batch's size and contents select are the same."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = shard_sampler(range(math.ceil(num_items / batch_size)), pad=False)
    return [index for k in batches for index in range(k * batch_size, min((k + 1) * batch_size, num_items))]


def shard_dataset(dataset: Dataset) -> Dataset:
    """This rank's rows r, r+W, ... of ``dataset`` (itself in one process): compute something
    per image on the shard, then :func:`all_gather_shards` the result (the feature cache)."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, list(make_eval_sampler(dataset)))


"""The training order and each image's augmentation, fixed by ``(seed, epoch, index)`` alone.

:class:`EpochSampler` draws a permutation and one seed per image from a generator seeded with
``seed + epoch``; :class:`SeededSamples` computes each image's transform under its seed. So an
epoch gives the same batches whether it runs straight through or after a resume, with or without
worker processes, and whatever the process's own RNGs did before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset, Sampler


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
    seed, leaving the process's own RNG streams untouched.

    The data loader fetches a whole batch through :meth:`__getitems__`: the process's RNG states
    are saved and restored once per batch rather than once per image, and each image is still
    computed right after its own seed is set, so its augmentation depends on ``(index, seed)``
    alone, never on the other images of the batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with _restored_rng():
            _reseed(seed)
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        indices, seeds = [index for index, _ in keys], [seed for _, seed in keys]
        with _restored_rng():
            get_batch = getattr(self.dataset, "get_batch", None)  # InMemoryDataset: normalises once per batch
            if get_batch is not None:
                return get_batch(indices, before_each=lambda position: _reseed(seeds[position]))
            items = []
            for index, seed in keys:
                _reseed(seed)
                items.append(self.dataset[index])
            return items


def _reseed(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)  # CPU generator only: CUDA streams stay untouched
    random.seed(seed)


@contextmanager
def _restored_rng():
    """Whatever the body seeds, the process's torch (CPU) and Python RNG states afterwards are the ones before."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)

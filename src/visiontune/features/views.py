"""How many augmented views of each image the feature cache keeps when nobody said.

With a random training transform the cache keeps K augmented copies of each image's features and
epoch ``e`` trains on copy ``e % K`` (:mod:`visiontune.features.extract`). K trades speed for
augmentation: each view costs a backbone pass over the training images, as an uncached epoch
does, and fewer views mean fewer distinct augmentations. :func:`choose_cache_views` picks K from
the phase's epochs and the RAM the run's :class:`~visiontune.memory.MemoryBudget` has left;
:func:`feature_bytes_per_image` measures what one image's features take.
"""

from __future__ import annotations

import math

import torch
import torch.utils.data
from torch import nn

from visiontune.features.extract import capture_head_input
from visiontune.model.anatomy import Anatomy, anatomy_of

# Automatic views. Caching one view costs one backbone pass over the training images, as one
# uncached epoch does, so K views for a phase of E epochs cost K/E of uncached training's backbone
# time: one view per 10 epochs keeps the cache near a tenth of it (a linear probe >= 8x faster than
# a loop that runs the backbone every epoch), while each view is seen in several differently shuffled epochs.
EPOCHS_PER_AUTO_VIEW = 10
# With a random transform one view would train every epoch on the same augmented copy.
MIN_AUTO_VIEWS = 2


def choose_cache_views(epochs: int, *, bytes_per_view: int, free_bytes: int) -> tuple[int, str]:
    """How many augmented views to cache for a frozen phase of ``epochs`` epochs, and why.

    ``bytes_per_view``: one view of the training features (images x feature size x 4 bytes);
    ``free_bytes``: what the run's memory budget has left for them. K is one view per
    :data:`EPOCHS_PER_AUTO_VIEW` epochs, at least :data:`MIN_AUTO_VIEWS`, at most ``epochs``
    (a view no epoch trains on is wasted work) and at most what fits in memory; when not even
    the minimum fits, the minimum is cached anyway: ``store="auto"`` puts it on disk."""
    if epochs < 1:
        raise ValueError(f"a phase has at least one epoch, got {epochs}")
    wanted = min(epochs, max(MIN_AUTO_VIEWS, math.ceil(epochs / EPOCHS_PER_AUTO_VIEW)))
    fitting = free_bytes // max(1, bytes_per_view)
    budget = f"{free_bytes / 2**20:.1f} MiB left of the memory budget, {bytes_per_view / 2**20:.1f} MiB per view"
    rule = (f"one per {EPOCHS_PER_AUTO_VIEW} of the phase's {epochs} epoch(s), at least {min(MIN_AUTO_VIEWS, epochs)}"
            f", at most {epochs}")
    if fitting >= wanted:
        return wanted, f"caching {wanted} augmented views per image (auto: {rule}; {budget})"
    if fitting >= min(MIN_AUTO_VIEWS, epochs):
        return int(fitting), (f"caching {fitting} augmented views per image (auto: {rule} would be {wanted}, "
                              f"but only {fitting} fit in memory: {budget})")
    views = min(MIN_AUTO_VIEWS, epochs)
    return views, (f"caching {views} augmented views per image (auto: {rule}); they do not fit in memory "
                   f"({budget}), so they go to disk when the images are files")


def feature_bytes_per_image(model: nn.Module, dataset: torch.utils.data.Dataset, *,
                            device: torch.device | str = "cpu", anatomy: Anatomy | None = None) -> int:
    """Bytes of float32 head input per image, measured by running ``dataset[0]`` through ``model``
    in eval mode. The caller's random state and the model's training modes are left as they were,
    so measuring does not change what a seeded (or resumed) run draws."""
    anatomy = anatomy or anatomy_of(model)
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), capture_head_input(model, anatomy=anatomy) as captured:
            image = dataset[0][0]
            with torch.no_grad():
                model(image.unsqueeze(0).to(device))
        return captured["features"][0].numel() * 4
    finally:
        for module, mode in was_training.items():
            module.training = mode

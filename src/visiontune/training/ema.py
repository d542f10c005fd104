"""``--ema DECAY``: an exponential moving average of the whole model's weights.

The average is torch's own :class:`~torch.optim.swa_utils.AveragedModel` with
``get_ema_multi_avg_fn`` (one fused lerp over all tensors per step) and ``use_buffers=True``, so
BatchNorm running statistics are averaged along with the weights rather than copied from the
live model. It averages the full model (``source``), whichever module the step trained: in a
phase that trains the head on cached features the loop steps the head alone, and the frozen
backbone's tensors would only be averaged with themselves (``lerp(x, x, w) == x`` exactly). So
after :meth:`WeightAverage.follow` names the head, each update folds in the head's tensors alone:
the same numbers, without a pass over millions of unchanging weights per step of a tiny head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from visiontune.model.anatomy import Anatomy


class WeightAverage:
    """The EMA of ``source``'s parameters and buffers, with ``decay`` per optimiser step (0..1)."""

    def __init__(self, source: nn.Module, decay: float):
        self.source, self.decay = source, decay
        self.averaged = AveragedModel(source, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)  # never trained: autograd need not track the copy
        self.averaged.eval()
        self._part: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (averaged, source) tensors

    def follow(self, trained: nn.Module, anatomy: Anatomy) -> None:
        """Average only ``trained``'s tensors from now on when it is the source's head (cached
        features: nothing else can change), else the whole model."""
        if trained is self.source:
            self._part = None
            return
        counterpart = self.view_of(trained, anatomy)
        self._part = ([*counterpart.parameters(), *counterpart.buffers()],
                      [*trained.parameters(), *trained.buffers()])

    @property
    def model(self) -> nn.Module:
        """The averaged weights as a model of the source's architecture (what best.safetensors saves)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self) -> None:
        """Fold the source's current weights in; the first call copies them (AveragedModel's rule)."""
        if self._part is None or self.averaged.n_averaged == 0:
            self.averaged.update_parameters(self.source)
            return
        averaged, source = self._part
        # AveragedModel's own step on the part that trains: its EMA function per kind of tensor
        # (a fused lerp for floats, its own formula for integer counters), then one more average.
        for floating in (True, False):
            pairs = [(a, s) for a, s in zip(averaged, source) if a.is_floating_point() == floating]
            if pairs:
                self.averaged.multi_avg_fn([a for a, _ in pairs], [s for _, s in pairs], self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    def view_of(self, trained: nn.Module, anatomy: Anatomy) -> nn.Module:
        """The averaged counterpart of ``trained``: the whole averaged model, or its head when the
        epoch trains the head alone on cached features (``trained`` is then the source's head)."""
        if trained is self.source:
            return self.model
        if trained is anatomy.head_module(self.source):
            return anatomy.head_module(self.model)
        raise ValueError(f"the EMA averages the whole model; it has no counterpart of {type(trained).__name__}")

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def make_weight_average(model: nn.Module, decay: float) -> WeightAverage | None:
    """``--ema``'s average of ``model``, or None when ``decay`` is 0 (off)."""
    return WeightAverage(model, decay) if decay > 0 else None

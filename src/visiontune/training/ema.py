"""``--ema DECAY``: an exponential moving average of the whole model's weights.

The average is torch's own :class:`~torch.optim.swa_utils.AveragedModel` with
``get_ema_multi_avg_fn`` (one fused lerp over all tensors per step) and ``use_buffers=True``, so
BatchNorm running statistics are averaged along with the weights rather than copied from the
live model. It always averages the full model (``source``), whichever module the step trained:
in a phase that trains the head on cached features the loop steps the head alone, and the frozen
backbone's tensors are then averaged with themselves, which leaves them exactly as they are.
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

    @property
    def model(self) -> nn.Module:
        """The averaged weights as a model of the source's architecture (what best.safetensors saves)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self) -> None:
        """Fold the source's current weights in; the first call copies them (AveragedModel's rule)."""
        self.averaged.update_parameters(self.source)

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

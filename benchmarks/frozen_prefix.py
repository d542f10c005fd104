"""What a frozen prefix costs in memory: the bytes autograd keeps for the backward pass.

Autograd records an operation only when one of its inputs requires a gradient. With ``partial``
the frozen first layer groups have ``requires_grad=False`` parameters and the images never
require grad, so nothing before the first trainable layer is recorded or saved: the frozen
prefix already runs "under no_grad", without wrapping it in ``torch.no_grad()`` (measured on
resnet18 with only ``layer4`` + ``fc`` training: the same bytes are saved for backward with or
without the wrapper, a fifth of what full fine-tuning saves). What makes it so is that
:func:`visiontune.model.freeze.freeze` clears ``requires_grad``; :func:`saved_activation_bytes` is the
measurement that shows it, used by the speed benchmark and by the tests that guard it.

``torch.profiler`` and ``tracemalloc`` do not see tensor storage on the CPU and
``torch.cuda.max_memory_allocated`` needs a GPU; the saved-tensor hooks count, deterministically
on any device, exactly the activations a training step has to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def saved_activation_bytes(forward: Callable[[], T], ignore: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run ``forward()`` and return its result and the bytes autograd saved for backward.

    Each storage counts once (an activation saved by several operations is one tensor in memory).
    Pass the model's parameters as ``ignore``: autograd saves the trainable weights too, but they
    are in memory anyway, so they are no cost of the step."""
    ignored = {tensor.untyped_storage().data_ptr() for tensor in ignore}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in ignored:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return result, sum(storages.values())

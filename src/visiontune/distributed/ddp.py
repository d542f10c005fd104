"""The model under DistributedDataParallel: wrapping (frozen parameters left out), SyncBatchNorm,
BatchNorm buffers."""

from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from visiontune.distributed.group import _communication_device, is_distributed
from visiontune.errors import ConfigError

logger = logging.getLogger(__name__)


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Share BatchNorm statistics over all GPUs (``--sync-bn``): worth it in full fine-tuning with
    small per-GPU batches. Frozen BN layers stay frozen (same parameter objects, eval mode)."""
    if torch.device(device).type != "cuda":
        raise ConfigError("--sync-bn needs CUDA GPUs; on the CPU leave it off (BatchNorm layers stay per process)")
    if not is_distributed():
        return model  # one process: plain BatchNorm already sees the whole batch
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP: save its state_dict (no ``module.`` prefixes) and evaluate it."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def has_trainable_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm layer updates running statistics during training (not frozen)."""
    return any(
        isinstance(module, _BatchNorm)
        and module.track_running_stats
        and not isinstance(module, nn.SyncBatchNorm)
        and any(param.requires_grad for param in module.parameters(recurse=False))
        for module in model.modules()
    )


def wrap_ddp(model: nn.Module, device: torch.device | str, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel (or return it unchanged in one process).

    Call again whenever the set of trainable parameters changes (e.g. after unfreezing the
    backbone): DDP decides which gradients to reduce when it is built, and frozen parameters
    (requires_grad=False) are never handed to it. ``find_unused_parameters`` costs a graph walk
    per step; it is only needed when a trainable parameter gets no gradient (the engine's loss
    uses the auxiliary heads of googlenet/inception_v3, so they are not unused). Buffers (BN
    running statistics) are broadcast from rank 0 each step only when some BatchNorm trains
    without SyncBatchNorm; frozen BN statistics never change, so broadcasting them is wasted.
    """
    model = unwrap(model)
    if not is_distributed():
        return model
    if not any(param.requires_grad for param in model.parameters()):
        logger.warning("no trainable parameters: not wrapping the model in DistributedDataParallel")
        return model
    device = torch.device(device)
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        forward_sync_buffers=has_trainable_batchnorm(model),
    )


# module -> (its trainable parameters when wrapped, the DDP wrapper); weak, so a dropped model goes.
_wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ddp_view(model: nn.Module, device: torch.device | str) -> nn.Module:
    """:func:`wrap_ddp` of ``model``, built once and reused until its trainable parameters change
    (a new phase), so the training loop can ask for it every epoch. ``model`` itself stays the
    plain module that is saved, evaluated and re-frozen."""
    if not is_distributed():
        return model
    trainable = tuple(id(param) for param in model.parameters() if param.requires_grad)
    cached = _wrappers.get(model)
    if cached is None or cached[0] != trainable:
        cached = (trainable, wrap_ddp(model, device))
        _wrappers[model] = cached
    return cached[1]


def sync_buffers_from_main(model: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, e.g. before sharded
    evaluation: after the last step of an epoch each rank's statistics saw only its own batch."""
    if not is_distributed():
        return
    for buffer in unwrap(model).buffers():
        staged = buffer.data.to(_communication_device())
        dist.broadcast(staged, src=0)
        if staged is not buffer.data:
            buffer.data.copy_(staged)

"""Multi-process training on PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel keeps their weights in step, ``nccl`` on GPUs and ``gloo`` on CPUs.

Every function here is a no-op (or the one-process answer) when the process was not launched by
torchrun, so the training engine calls them unconditionally and one code path serves both.

The rules the engine follows, and why:

* ``--batch-size`` is the GLOBAL batch: each of W processes loads ``batch_size / W`` images per
  step and DDP averages the gradients, so a run gives the same updates whatever W is.
* Training reads :func:`make_train_sampler` (a ``DistributedSampler`` even for one process, so
  the same seed gives the same global batches for any W); call ``set_epoch`` every epoch.
* Evaluation reads :func:`make_eval_sampler`, which shards the validation set WITHOUT padding
  (``DistributedSampler`` repeats images to even out the shards, which would count them twice)
  and metrics are summed over processes with :func:`all_reduce_sum` before anyone reads them.
  Evaluate the unwrapped module (:func:`unwrap`): shards differ in length by one batch, and a DDP
  forward may run a collective that the shorter rank would never join.
* Every decision that changes control flow (best epoch, early stop) is taken from reduced
  metrics, so all processes agree on it without talking.
* Only the main process prints, writes the run folder and saves checkpoints; the others wait at
  :func:`barrier`. Paths chosen by the main process travel with :func:`broadcast_object`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

from visiontune.errors import ConfigError, VisiontuneError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a collective may wait for a rank before the job fails. A rank that DIES is noticed by
# torchrun at once (it stops the others); this bounds a rank that HANGS. It must outlast the
# longest stretch the main process works alone between barriers (final evaluation, plots).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "VISIONTUNE_DIST_TIMEOUT_S"


# -- process group --------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher following its env:// contract) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / MASTER_ADDR variables.

    ``backend``: None picks ``nccl`` when CUDA is available and ``gloo`` otherwise.
    ``timeout_s``: how long a collective waits for a missing rank (default
    ``$VISIONTUNE_DIST_TIMEOUT_S`` or 1800 s). Returns True when this call created the group
    (and :func:`shutdown` should destroy it); False when not launched by torchrun, when the world
    has one process, or when the caller had already initialised the group.
    """
    if dist.is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())  # before init, so nccl binds each rank to its own GPU
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def shutdown() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(backend: str | None = None, timeout_s: float | None = None) -> Iterator[bool]:
    """``with session():`` joins the group if launched by torchrun and always leaves it again."""
    created = init_from_env(backend, timeout_s)
    try:
        yield created
    finally:
        if created:
            shutdown()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, the one process that prints and writes. Before the group is joined, torchrun's
    RANK says (so the CLI can decide what to print before training starts)."""
    if is_distributed():
        return rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def device_for_rank(device: torch.device | str) -> torch.device:
    """The device this process should use: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def per_process_batch_size(global_batch_size: int) -> int:
    """Images each process loads per step, given the global batch (ConfigError if W does not divide it)."""
    size = world_size()
    if global_batch_size % size:
        raise ConfigError(
            f"batch size {global_batch_size} cannot be split evenly over {size} processes; "
            f"use a multiple of {size} (the batch size is the global batch of all processes together)"
        )
    return global_batch_size // size


# -- collectives (all no-ops in one process) -------------------------------------------------


def _communication_device() -> torch.device:
    """nccl only moves CUDA tensors; gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (on its original device)."""
    if not is_distributed():
        return tensor
    buffer = tensor.to(_communication_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_metrics(metrics):
    """Sum a ClassificationMetrics' state over all processes (in place; returns it): afterwards
    every rank's ``compute()`` gives the metrics of the whole validation set."""
    if is_distributed():
        metrics.load_state_tensor(all_reduce_sum(metrics.state_tensor()))
    return metrics


def sum_over_processes(*values: float) -> list[float]:
    """Plain numbers (a loss sum, a count) summed over all processes, in float64."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def on_main_process(function: Callable[..., T], *args, **kwargs) -> T:
    """Run ``function`` on the main process only and hand every process its result.

    A VisiontuneError raised there (a run folder that exists, a checkpoint that does not) is
    raised on every process, so all of them stop with the same message instead of the others
    waiting forever for a main process that has given up.
    """
    outcome: tuple[bool, Any] | None = None
    if is_main_process():
        try:
            outcome = (True, function(*args, **kwargs))
        except VisiontuneError as error:
            outcome = (False, error)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def main_process_first(function: Callable[..., T], *args, **kwargs) -> T:
    """Run ``function`` on the main process, then, once it has succeeded, on the others; each
    process returns its own result. E.g. reading ``last.ckpt``: rank 0 confirms it is there and
    readable before anyone else opens it, and if not, every process raises rank 0's error."""
    result, failure = None, None
    if is_main_process():
        try:
            result = function(*args, **kwargs)
        except VisiontuneError as error:
            failure = error
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure
    return result if is_main_process() else function(*args, **kwargs)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Every process gets the main process's ``value`` (a run folder path, "checkpoint exists")."""
    if not is_distributed():
        return value
    holder = [value if rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble, on every process, rows computed shard-wise in dataset order.

    ``local`` holds this rank's rows for the indices of :func:`make_eval_sampler` (r, r+W, ...);
    ``total`` is the dataset length. Used for per-image predictions and the feature cache, so a
    quantity is computed once per image, not once per process.
    """
    size = world_size()
    if size == 1:
        return local[:total]
    rows = math.ceil(total / size)
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    padded = padded.to(_communication_device())
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    return interleave_shards(torch.stack(gathered).to(local.device), total)


def interleave_shards(stacked: torch.Tensor, total: int) -> torch.Tensor:
    """(W, rows, ...) where rank r's row j is dataset index r + j*W  ->  (total, ...) in order."""
    size, rows = stacked.shape[:2]
    return stacked.transpose(0, 1).reshape(size * rows, *stacked.shape[2:])[:total]


# -- samplers --------------------------------------------------------------------------------


def make_train_sampler(dataset, seed: int, shuffle: bool = True, drop_last: bool = False) -> DistributedSampler:
    """This process's share of the training set, reshuffled each epoch from ``seed`` (for loops
    without their own seeded sampler; the engine shards its EpochSampler with :func:`shard_sampler`).

    Call ``sampler.set_epoch(epoch)`` at the start of every epoch (else every epoch repeats the
    first one's order). Shards are padded to equal length, so every rank takes the same number
    of steps, which DDP needs. Pass ``shuffle=False`` to the DataLoader: the sampler shuffles.
    """
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


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


def shard_dataset(dataset: Dataset) -> Dataset:
    """This rank's rows r, r+W, ... of ``dataset`` (itself in one process): compute something
    per image on the shard, then :func:`all_gather_shards` the result (the feature cache)."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, list(make_eval_sampler(dataset)))


def set_sampler_epoch(loader, epoch: int) -> None:
    """Reshuffle a loader whose sampler is epoch-aware (DistributedSampler); others are left alone."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# -- the model --------------------------------------------------------------------------------


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


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """``with gradient_sync(model, sync=last_micro_step):`` skips DDP's all-reduce on gradient
    accumulation steps that are not the last; a no-op outside DDP."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# -- launching -------------------------------------------------------------------------------


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the launched processes must not relaunch)."""
    stripped: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--nproc":
            skip_next = True
        elif not arg.startswith("--nproc="):
            stripped.append(arg)
    return stripped


def torchrun_arguments(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments for running ``python -m visiontune <argv>`` in ``nproc`` local processes."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: need at least 1 process")
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "visiontune", *strip_nproc(argv)]


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``visiontune <argv>`` as ``nproc`` processes on this machine under torchrun (in this
    process: no extra interpreter start). Returns the exit status: 0, or the first failed
    process's (torchrun has then stopped the others and printed that process's error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    arguments = torchrun_arguments(nproc, argv)
    logger.info("running: torchrun %s", " ".join(arguments))
    try:
        torchrun_main(arguments)
    except ChildFailedError as error:
        failed_rank, failure = error.get_first_failure()
        logger.error("process %d of %d failed (exit code %s)", failed_rank, nproc, failure.exitcode)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0

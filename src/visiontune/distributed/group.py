"""The process group: joining it from torchrun's environment, who is who, and the collectives
the engine needs (all no-ops, or the one-process answer, outside torchrun)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

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


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 outside torchrun): they share its RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1


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


def all_gather_objects(value: T) -> list[T]:
    """Every process's ``value`` (picklable: a list of predictions, of skipped files), in rank
    order, on every process; ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


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

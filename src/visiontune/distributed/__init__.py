"""Multi-process training on PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel keeps their weights in step, ``nccl`` on GPUs and ``gloo`` on CPUs.

Every function here is a no-op (or the one-process answer) when the process was not launched by
torchrun, so the training engine calls them unconditionally and one code path serves both.

The rules the engine follows, and why:

* ``--batch-size`` is the GLOBAL batch: each of W processes loads ``batch_size / W`` images per
  step and DDP averages the gradients, so a run gives the same updates whatever W is.
* Training shards the engine's seeded epoch order with :func:`shard_sampler` (rank r takes
  positions r, r+W, ...), so the global batches are those of one process for any W.
* Evaluation reads :func:`make_eval_sampler`, which shards the validation set WITHOUT padding
  (``DistributedSampler`` repeats images to even out the shards, which would count them twice),
  and metrics are summed over processes (:func:`all_reduce_metrics`) before anyone reads them.
  Evaluate the unwrapped module (:func:`unwrap`): shards differ in length by one batch, and a DDP
  forward may run a collective that the shorter rank would never join.
* ``visiontune evaluate`` and ``predict`` split their files by whole batches
  (:func:`shard_batches`), so every forward pass sees the images it sees in one process and the
  results are one process's exactly; metrics are summed and predictions gathered
  (:func:`all_gather_objects`).
* Every decision that changes control flow (best epoch, early stop) is taken from reduced
  metrics, so all processes agree on it without talking.
* Only the main process prints, writes the run folder and saves checkpoints; the others wait at
  :func:`barrier`. What the main process decides reaches the others through
  :func:`broadcast_object`, :func:`on_main_process` and :func:`main_process_first`.

Modules: :mod:`~visiontune.distributed.group` (process group and collectives),
:mod:`~visiontune.distributed.sharding` (samplers), :mod:`~visiontune.distributed.ddp` (the
wrapped model), :mod:`~visiontune.distributed.launch` (``visiontune train --nproc``, and torchrun's
parser without abbreviations).
"""

from visiontune.distributed.ddp import (
    convert_sync_batchnorm,
    ddp_view,
    has_trainable_batchnorm,
    sync_buffers_from_main,
    unwrap,
    wrap_ddp,
)
from visiontune.distributed.group import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    all_gather_objects,
    all_gather_shards,
    all_reduce_metrics,
    all_reduce_sum,
    barrier,
    broadcast_object,
    device_for_rank,
    init_from_env,
    interleave_shards,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    local_rank,
    local_world_size,
    main_process_first,
    on_main_process,
    per_process_batch_size,
    rank,
    session,
    shutdown,
    sum_over_processes,
    world_size,
)
from visiontune.distributed.launch import launch_local, parse_torchrun_arguments, strip_nproc, torchrun_arguments
from visiontune.distributed.sharding import (
    ShardedSampler,
    make_eval_sampler,
    shard_batches,
    shard_dataset,
    shard_sampler,
)

__all__ = [
    "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "ShardedSampler", "all_gather_objects", "all_gather_shards", "all_reduce_metrics",
    "all_reduce_sum", "barrier", "broadcast_object", "convert_sync_batchnorm", "ddp_view", "device_for_rank",
    "has_trainable_batchnorm", "init_from_env", "interleave_shards", "is_distributed",
    "is_main_process", "launch_local", "launched_by_torchrun", "local_rank", "local_world_size", "main_process_first",
    "make_eval_sampler", "on_main_process", "parse_torchrun_arguments", "per_process_batch_size", "rank", "session",
    "shard_batches", "shard_dataset", "shard_sampler", "shutdown", "strip_nproc", "sum_over_processes",
    "sync_buffers_from_main", "torchrun_arguments", "unwrap", "world_size", "wrap_ddp",
]

"""Device, precision, threads and "who writes" — decided here and nowhere else.

The CPU path always works: CUDA is used only when asked for (or ``auto`` finds it), and reduced
precision only where the hardware does it natively (bf16 on CUDA when supported, else fp16 with
loss scaling; bf16 on CPUs with AMX tiles, fp32 on every other CPU).
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch

from visiontune.errors import ConfigError

log = logging.getLogger(__name__)

# Only AMX makes bf16 training faster on a CPU. AVX-512 BF16 alone has a bf16 dot product but no
# fast bf16 kernels for the rest of a step (depthwise convolutions, BatchNorm, the casts autocast
# adds): measured on a 2-core avx512_bf16 CPU without AMX, EfficientNet-Lite0 at 64 px trained at
# 150-170 images/s under bf16 autocast and 320-345 in fp32.
_CPU_BF16_FLAGS = ("amx_bf16",)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: ``dtype`` None means plain fp32; ``needs_scaler`` for fp16."""

    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16


# Every evaluation runs in float32, whatever the training precision: the per-epoch validation, the
# final report, evaluate, predict and an exported file then compute the same numbers (bf16 autocast
# would move probabilities by ~1e-2 and accuracy by whole images, and could pick another best epoch).
EVAL_PRECISION = Precision(None)

DEVICES = ("auto", "cpu", "cuda")  # the names resolve_device (and every --device flag) takes


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists AMX bf16 (elsewhere bf16 training on a CPU is slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_precision(device: torch.device, requested: str = "auto") -> Precision:
    """The autocast dtype for ``device``; asking for one the device cannot do is a ConfigError."""
    if requested == "fp32":
        return Precision(None)
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise ConfigError("--precision bf16 needs a GPU that supports bfloat16; use fp16, fp32 or auto")
        if requested == "fp16":
            return Precision(torch.float16)
        return Precision(torch.bfloat16 if bf16_ok else torch.float16)
    if requested == "fp16":
        raise ConfigError("--precision fp16 is only supported on CUDA; use bf16, fp32 or auto on the CPU")
    if requested == "bf16" or cpu_has_native_bf16():
        return Precision(torch.bfloat16)
    return Precision(None)


def autocast(device: torch.device, precision: Precision):
    """Context manager for the forward pass (a no-op in fp32)."""
    if precision.dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def prefers_channels_last(model: torch.nn.Module) -> bool:
    """Convolutional networks train faster with channels_last weights: oneDNN (CPU) and cuDNN
    (tensor cores) pick their fastest kernels for it (measured on a 2-core AVX2 EPYC: resnet18
    training 1.4x, EfficientNet-Lite0 inference 1.7x). Models without convolutions stay as they are."""
    return sum(isinstance(module, torch.nn.Conv2d) for module in model.modules()) > 1


def default_workers(cpu_count: int | None = None, device: torch.device | None = None) -> int:
    """Data loader processes.

    Training on a GPU: leave one core for the main process, at most 4 (decoding small images rarely
    needs more). Training on the CPU: the step's intra-op threads already use every core and wait
    for each other at every operation, so a worker process that takes a core stalls them all
    (measured on 2 cores: EfficientNet-Lite0 at 64 px trained at 200-310 images/s with 1 worker,
    320-345 with none, while the worker's own share, augmenting decoded images, is ~5 % of a step); so no
    worker on up to 3 cores, and one per 2 cores beyond the first 2 on larger machines, at most 4."""
    cpus = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                    else os.cpu_count() or 1)
    if device is not None and device.type == "cpu":
        return max(0, min(4, (cpus - 2) // 2))
    return max(0, min(4, cpus - 1))


def configure_threads(device: torch.device) -> int:
    """Intra-op threads for the training process; torch's default (one per core) is right on CPU,
    this only records the choice so every run logs it."""
    threads = torch.get_num_threads()
    log.debug("device %s, %d intra-op threads", device, threads)
    return threads


def out_of_memory_error(error: BaseException, batch_size: int) -> ConfigError:
    """A CUDA out-of-memory error turned into advice: the batch is the usual culprit."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    smaller = f"--batch-size {batch_size // 2}, " if batch_size > 1 else ""
    return ConfigError(
        f"the GPU ran out of memory with --batch-size {batch_size} ({detail}); try a smaller batch ({smaller}"
        "--precision bf16 or fp16 also halves activations), a smaller --image-size, or a smaller model")

"""Refuse a training configuration that cannot fit in memory, before anything is allocated.

``--image-size 100000`` once ran until the kernel's OOM killer ended it (exit 137, no message, a
half-made run folder). :func:`check_training_memory` runs first in the training set-up, before
any image is decoded, any weights file is read or any run folder exists, and refuses such a
request with a one-line ConfigError that names the flags to change.

How the memory is estimated: the architecture is built a second time with its parameters on
PyTorch's ``meta`` device (shapes only: no storage, no weights, no download) and one forward pass of the
per-process batch at the training crop size records every layer's output size. Then

* activations: a step that backpropagates through the backbone (``full``, ``gradual``) keeps
  most layer outputs for the backward pass. Autograd's saved tensors measured 0.85 to 1.6 times
  the sum of the layer outputs (in-place layers, which allocate nothing, left out) on twelve
  torchvision and timm architectures, so half that sum is counted. With a frozen backbone
  (``linear-probe``, ``partial``) a forward pass holds at least the largest layer output;
* weights: every parameter, plus a gradient and the optimizer state (AdamW 2, SGD with momentum 1
  per parameter) for each trained one (the whole model for ``full`` and ``gradual``);
* input batches: the float batch being trained and those the loader workers prepare ahead
  (2 per worker), plus each image decoded at the resize size on its way there.

It is a LOWER bound: residual additions and other functional ops, gradients of activations
during the backward pass, allocator slack and the framework itself are not counted. So a
refusal is certain (the configuration could not have run), while one that passes may still be
tight. The decoded-image cache is not counted here: it is built only when it fits
in its own share of the RAM (:data:`visiontune.data.decoded_cache.DEFAULT_MEMORY_FRACTION`), and
is skipped otherwise.

An architecture that cannot run on the meta device (a model that asserts its input size, as
torchvision's ViTs do) gets no estimate; then only crop sizes up to
:data:`MAX_UNESTIMATED_IMAGE_SIZE` are accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from visiontune import distributed
from visiontune.config import TrainConfig
from visiontune.memory import available_memory_bytes
from visiontune.device import Precision, default_workers
from visiontune.errors import ConfigError
from visiontune.model.create import create_model
from visiontune.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

# Pixels per side accepted without an estimate: 4096 is beyond every pretrained classifier's
# native size (the largest common ones are 518-800 px), so a larger value is almost surely a typo.
MAX_UNESTIMATED_IMAGE_SIZE = 4096
LOADER_PREFETCH = 2  # batches each loader worker prepares ahead (DataLoader's prefetch_factor)
NOMINAL_CLASSES = 2  # the class count is not known yet; the head's size is negligible beside the rest
BACKBONE_TRAINING = ("full", "gradual")  # strategies that backpropagate through the whole model


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower bounds, in bytes, of what one training step of a configuration holds at once."""

    activations: int  # layer outputs kept for the backward pass (or in flight when frozen)
    weights: int  # parameters, gradients and optimizer state
    input_batch: int  # one float batch, and its images decoded at the resize size
    batches_in_flight: int  # the batch being trained plus those the loader workers prepare ahead

    @property
    def input_batches(self) -> int:
        return self.input_batch * self.batches_in_flight

    @property
    def on_device(self) -> int:
        """What the training device holds (the loader's batches wait in RAM)."""
        return self.activations + self.weights + self.input_batch

    @property
    def total(self) -> int:
        """What one CPU process holds."""
        return self.activations + self.weights + self.input_batches


def check_training_memory(config: TrainConfig, preprocessing: Preprocessing, device: torch.device,
                          precision: Precision) -> MemoryEstimate | None:
    """ConfigError when a training step of ``config`` cannot fit in the memory available now (GPU
    memory free on ``device``; on the CPU, the RAM available divided among this machine's
    processes). Returns the estimate (None when the architecture could not be estimated)."""
    batch = distributed.per_process_batch_size(config.batch_size)
    workers = default_workers(device=device) if config.workers is None else config.workers
    estimate = estimate_training_memory(config, preprocessing, batch, precision, workers)
    size = preprocessing.crop_size
    if estimate is None:
        if size > MAX_UNESTIMATED_IMAGE_SIZE:
            raise ConfigError(
                f"{_size_flag(config, size)}: images over {MAX_UNESTIMATED_IMAGE_SIZE} px per side are refused "
                f"when the memory cannot be estimated ({config.model} does not run on PyTorch's meta device at "
                f"that size); use --image-size {MAX_UNESTIMATED_IMAGE_SIZE} or less")
        return None
    needed, available, where = _need_and_room(estimate, device)
    parts = (f"activations {_human(estimate.activations)}, weights and optimizer {_human(estimate.weights)}, "
             f"input batches {_human(needed - estimate.activations - estimate.weights)}")
    log.debug("a training step needs at least %s (%s); %s %s", _human(needed), parts, _human(available), where)
    if available and needed > available:
        raise ConfigError(
            f"{_size_flag(config, size)} with --batch-size {config.batch_size}: one training step of {config.model} "
            f"needs at least {_human(needed)} ({parts}) but {_human(available)} {where}; "
            f"lower {_advice(config, estimate)}")
    return estimate


def estimate_training_memory(config: TrainConfig, preprocessing: Preprocessing, batch: int, precision: Precision,
                             workers: int) -> MemoryEstimate | None:
    """The :class:`MemoryEstimate` of ``config`` at ``batch`` images per process, or None when
    the architecture cannot be built or run on the meta device."""
    size = preprocessing.crop_size
    try:
        with torch.random.fork_rng(devices=[]):  # initialising the meta copy must not move the seed's stream
            with _parameters_on_meta():
                model = create_model(config.model, num_classes=NOMINAL_CLASSES, weights=None)
            model.to("meta")  # the buffers (BatchNorm statistics: small) were made on the CPU
            total_elements, largest_elements = _layer_outputs(model, batch, size)
    except Exception as error:  # noqa: BLE001 - any failure only means "no estimate", never a crash
        log.debug("no memory estimate for %s at %d px: %s", config.model, size, error)
        return None
    parameters = sum(param.numel() * param.element_size() for param in model.parameters())
    backbone_trains = config.strategy in BACKBONE_TRAINING
    optimizer_slots = 2 if config.optimizer == "adamw" else (1 if config.momentum > 0 else 0)
    trained_copies = (1 + optimizer_slots) if backbone_trains else 0  # gradients + optimizer state
    activation_bytes = 2 if precision.dtype is not None else 4  # autocast computes in 16 bits
    activations = (total_elements // 2 if backbone_trains else largest_elements) * activation_bytes
    batches_in_flight = 1 + LOADER_PREFETCH * workers
    per_image = 3 * size * size * 4 + 3 * preprocessing.resize_size**2  # float crop + uint8 decoded image
    return MemoryEstimate(activations=activations, weights=parameters * (1 + trained_copies),
                          input_batch=per_image * batch, batches_in_flight=batches_in_flight)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered, so the
    initialisers that follow do nothing and no weight memory is kept (accelerate's
    ``init_empty_weights`` technique). Other tensors stay real: ``with torch.device("meta")``
    would also make meta the tensors some architectures compute their shapes from (regnet's
    ``torch.pow(...).tolist()``), which cannot be read. The patch is process-wide while it lasts;
    the set-up runs before any loader worker or training thread exists."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def _layer_outputs(model: nn.Module, batch: int, size: int) -> tuple[int, int]:
    """(sum, largest) of the element counts of the leaf modules' outputs in one forward pass;
    in-place layers (ReLU(inplace=True)) return their input's storage and are not counted."""
    counts: list[int] = []

    def record(module, inputs, output) -> None:
        if getattr(module, "inplace", False):
            return
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        counts.append(sum(t.numel() for t in tensors if isinstance(t, torch.Tensor)))

    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(batch, 3, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return sum(counts), max(counts, default=0)


def _need_and_room(estimate: MemoryEstimate, device: torch.device) -> tuple[int, int, str]:
    """(bytes needed, bytes available, where) for the device that must hold the step."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return estimate.on_device, free, f"is free on {device}"
    processes = distributed.local_world_size()  # torchrun's processes on this machine share its RAM
    available = available_memory_bytes() // processes
    share = f" (shared by {processes} processes)" if processes > 1 else ""
    return estimate.total, available, f"of RAM is available{share}"


def _size_flag(config: TrainConfig, size: int) -> str:
    return f"--image-size {size}" if config.image_size else f"the weights' image size {size}"


def _advice(config: TrainConfig, estimate: MemoryEstimate) -> str:
    if estimate.weights > estimate.activations + estimate.input_batches:
        return "--strategy (linear-probe trains only the head) or choose a smaller --model"
    advice = "--image-size or --batch-size"
    if config.strategy in BACKBONE_TRAINING:
        advice += ", or train fewer layers (--strategy partial or linear-probe)"
    return advice


def _human(size: int) -> str:
    """Bytes for people: 1.5 GiB."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"

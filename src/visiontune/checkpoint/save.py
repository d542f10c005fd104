"""Saving weights (safetensors or torch state dicts) and whole pickled models, always atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from visiontune.checkpoint.finite import require_finite
from visiontune.atomic_io import atomic_write
from visiontune.checkpoint.io import read_checkpoint
from visiontune.checkpoint.suffixes import SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from visiontune.errors import CheckpointError

logger = logging.getLogger(__name__)


def save_weights(model_or_state_dict, path: str | os.PathLike) -> Path:
    """Write a model's (or a state dict's) tensors to ``path`` atomically and return the path.

    The suffix picks the format: ``.safetensors`` (recommended: holds only tensors, loads fastest)
    or ``.pth``/``.pt``/``.bin``/``.ckpt`` (a ``torch.save`` of the state dict). A path without a
    suffix gets ``.safetensors``. Both formats round-trip every tensor bit-exactly.
    """
    path = weights_path(path)
    state_dict = _as_state_dict(model_or_state_dict)
    require_finite(state_dict, "The weights to save", f"so '{path}' was not written")
    if path.suffix == SAFETENSORS_SUFFIX:
        _save_safetensors(state_dict, path)
    elif path.suffix in TORCH_SUFFIXES:
        _save_torch(state_dict, path)
    else:
        raise CheckpointError(f"Cannot save weights to '{path}': unknown suffix {path.suffix!r}. Use .safetensors (recommended) or one of {', '.join(TORCH_SUFFIXES)}.")
    logger.info("saved %d tensors to %s", len(state_dict), path)
    return path


def weights_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_weights` writes for ``path``: a path without a suffix gets ``.safetensors``."""
    path = Path(path)
    return path if path.suffix else path.with_suffix(".safetensors")


def _as_state_dict(model_or_state_dict) -> dict:
    import torch

    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, dict):
        not_tensors = [key for key, value in model_or_state_dict.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise CheckpointError(f"save_weights() takes a model or a dict of tensors; these entries are not tensors: {not_tensors[:5]}.")
        return dict(model_or_state_dict)
    raise CheckpointError(f"save_weights() takes an nn.Module or a dict of tensors, not {type(model_or_state_dict).__name__}.")


def _save_safetensors(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = _standalone_tensors(state_dict)
    with named_write_errors(path), atomic_write(path) as temp_path:
        save_file(tensors, str(temp_path), metadata={"format": "pt"})


def _standalone_tensors(state_dict: dict) -> dict:
    """Give each tensor its own contiguous memory: safetensors refuses shared or strided storage.

    Tied weights (a decoder sharing an embedding) and views into a bigger buffer are cloned; the
    values are unchanged, so loading gives back the same numbers under every name.
    """
    seen_storages: set[int] = set()
    tensors = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        shares_memory = storage.data_ptr() in seen_storages and storage.nbytes() > 0
        covers_storage = tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.nbytes == storage.nbytes()
        if shares_memory or not covers_storage:
            tensor = tensor.contiguous().clone()
        seen_storages.add(storage.data_ptr())
        tensors[key] = tensor
    return tensors


def _save_torch(state_dict: dict, path: Path) -> None:
    import torch

    tensors = {key: tensor.detach().cpu() for key, tensor in state_dict.items()}
    with named_write_errors(path), atomic_write(path) as temp_path:
        torch.save(tensors, temp_path)


def save_model(model, path: str | os.PathLike) -> Path:
    """Pickle the whole model (architecture and weights) to ``path`` atomically — the tutorial's second way.

    Convenient, but the file can only be read back by unpickling, which runs code named in the file:
    only load such files from sources you trust. Prefer :func:`save_weights`.
    """
    import torch

    path = Path(path)
    with named_write_errors(path), atomic_write(path) as temp_path:
        torch.save(model, temp_path)
    return path


def load_model(path: str | os.PathLike, allow_unsafe: bool = False):
    """Load a whole pickled model written by :func:`save_model`; refuses unless ``allow_unsafe=True``."""
    import torch

    path = Path(path)
    if not allow_unsafe:
        raise CheckpointError(
            f"Refusing to load the whole pickled model in '{path}': unpickling can run code stored in the file. "
            "If you trust the file, call load_model(path, allow_unsafe=True); otherwise ask for its weights as .safetensors "
            "and load them with load_weights(create_model(...), path)."
        )
    loaded = read_checkpoint(path, allow_unsafe=True)
    if not isinstance(loaded, torch.nn.Module):
        raise CheckpointError(f"'{path}' does not hold a whole model but a {type(loaded).__name__}; load it with load_weights(model, path) instead.")
    return loaded


# torch.save reports a short write as "RuntimeError: [enforce fail at inline_container.cc:672] .
# unexpected pos 704 vs 598", safetensors as "SafetensorError: Error while serializing: I/O error:
# ...": neither names the file nor says that the disk is full.
_WRITE_FAILURE = re.compile(r"unexpected pos|failed writing|file write failed|I/O error|IoError", re.IGNORECASE)


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``path`` (full disk, quota, ``ulimit -f``, a read-only folder) into a
    one-line CheckpointError naming the file and the cause. Wrap it around :func:`atomic_write`,
    which has already removed its temporary file and kept any previous ``path`` by then."""
    path = Path(path)
    try:
        yield
    except OSError as error:
        raise CheckpointError(f"could not write '{path}': {error.strerror or error}{_space_left(path)}") from None
    except Exception as error:  # noqa: BLE001 - only write failures are translated, the rest re-raised
        if isinstance(error, CheckpointError) or not _WRITE_FAILURE.search(str(error)):
            raise
        cause = str(error).strip().splitlines()[-1][:200]
        raise CheckpointError(f"could not write '{path}': the write stopped part-way ({cause}){_space_left(path)}; "
                              "any previous file there was kept") from None


def _space_left(path: Path) -> str:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if free < 64 * 2**20:  # bytes; less than a small checkpoint needs
            return f" (only {free:,} bytes free on its disk: free some space or write elsewhere)"
    return ""

"""Reading checkpoints safely (writing goes through :mod:`visiontune.atomic_io`).

``read_checkpoint`` never runs code stored in a file unless the caller explicitly allows it: ``.pth``
and friends go through ``torch.load(weights_only=True)``, ``.safetensors`` through safetensors. The
format is sniffed from the first bytes rather than trusted from the suffix, so a renamed file, a
text file, an HTML error page or a Git LFS pointer each get a message that says what it really is.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import zipfile
from pathlib import Path

from visiontune.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch"  # torch.save's default zip container
TORCH_LEGACY = "torch-legacy"  # torch.save(..., _use_new_zipfile_serialization=False), a bare pickle

_UNSAFE_ADVICE = (
    "Loading it would mean unpickling arbitrary Python objects, which can run code hidden in the file. "
    "If you trust where the file came from, pass allow_unsafe=True (CLI: --allow-unsafe); better, ask for "
    "or re-save the weights as a .safetensors file, which holds only tensors."
)


def sniff_format(path: Path) -> str:
    """Name the container format of ``path`` from its first bytes; raise CheckpointError if it is none."""
    _check_is_file(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f"Checkpoint '{path}' is empty (0 bytes): the save or the download was interrupted. Save or download it again.")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return TORCH_ZIP
    if head[:1] == b"\x80":  # pickle protocol marker
        return TORCH_LEGACY
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return SAFETENSORS
    raise CheckpointError(_not_a_checkpoint_message(path, head))


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' is a folder, not a file. Pass the weights file inside it (for example model.safetensors or pytorch_model.bin).")
    if not path.exists():
        raise CheckpointError(f"Checkpoint '{path}' does not exist. Check the path (relative paths start at {Path.cwd()}).")


def _not_a_checkpoint_message(path: Path, head: bytes) -> str:
    text = _as_text(head)
    if text is None:
        return (
            f"Checkpoint '{path}' is not a format visiontune can read (not a torch.save file, not safetensors). "
            "It may be corrupt or written by another framework; re-save the weights with torch.save(model.state_dict(), ...) or as .safetensors."
        )
    if text.startswith("version https://git-lfs"):
        return f"Checkpoint '{path}' is a Git LFS pointer, not the weights themselves. Run 'git lfs pull' in its repository to fetch the real file."
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return f"Checkpoint '{path}' is an HTML page (probably an error or login page saved by a download). Download the weights file again from its direct link."
    first_line = text.splitlines()[0][:60] if text.strip() else ""
    return f"Checkpoint '{path}' is a text file (it starts with {first_line!r}), not saved weights. Pass the .pth/.pt/.bin/.ckpt or .safetensors file instead."


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return text if printable >= 0.95 * len(text) else None


def read_checkpoint(path: str | os.PathLike, allow_unsafe: bool = False) -> object:
    """Read a checkpoint file onto the CPU without running code from it (unless ``allow_unsafe``).

    Returns what the file holds: a dict of tensors for safetensors; for torch files whatever was
    saved (a state dict, a dict wrapping one, or, with ``allow_unsafe``, a whole pickled model).
    Every failure is a :class:`CheckpointError` naming the file and what to do.
    """
    path = Path(path)
    file_format = sniff_format(path)
    if file_format == SAFETENSORS:
        return _read_safetensors(path)
    return _read_torch(path, allow_unsafe)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise CheckpointError(
            f"Checkpoint '{path}' is a damaged .safetensors file ({error}); it is probably truncated by an interrupted save or download. Save or download it again."
        ) from error


def _read_torch(path: Path, allow_unsafe: bool) -> object:
    import torch

    try:
        # Training scripts (torchvision references, timm) store their argparse.Namespace beside the
        # weights; rebuilding one runs no code, so it is allowed alongside tensors.
        # An open handle, not the path: torch.load hands any path ending in .safetensors to safetensors,
        # so a torch file renamed .safetensors would fail there instead of being read (safely) as what it is.
        with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=not allow_unsafe)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            culprit = _blocked_global(str(error))
            raise CheckpointError(
                f"Checkpoint '{path}' holds Python objects other than tensors{culprit} (a whole pickled model, or code). "
                + _UNSAFE_ADVICE
            ) from error
        raise _corrupt(path, error) from error
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise _corrupt(path, error) from error


def _blocked_global(message: str) -> str:
    """Pull 'posix.system' out of torch's 'Unsupported global: GLOBAL posix.system ...' message."""
    for line in message.splitlines():
        if "GLOBAL" in line:
            words = line.split()
            name = words[words.index("GLOBAL") + 1] if words.index("GLOBAL") + 1 < len(words) else ""
            return f" (it asks for {name.rstrip(',.:')})" if name else ""
    return ""


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    reason = str(error).split(". ")[0] or type(error).__name__
    return CheckpointError(
        f"Checkpoint '{path}' is corrupt or truncated and cannot be read ({reason}). "
        "It was probably cut short by an interrupted save, copy or download: save or download it again."
    )

"""Refusing weights that hold NaN or infinity, naming the tensors.

One NaN in one weight makes every prediction NaN: training then blames the learning rate, and
predict/evaluate print ``nan%``. Such a file is damaged (or the run that wrote it diverged), so it
is refused where weights enter or leave visiontune: loading (:func:`~visiontune.checkpoint.load_weights`,
``--resume``, ``load_run``) and saving (:func:`~visiontune.checkpoint.save_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from visiontune.errors import CheckpointError

_SHOW = 3  # tensors named in a message


def non_finite_tensors(tensors: Mapping[str, object]) -> list[str]:
    """``"name (k NaN, m inf of n)"`` for every floating tensor holding a NaN or an infinity."""
    found = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        # A NaN or inf anywhere makes the sum non-finite, so a finite sum clears the tensor without
        # allocating a mask; a non-finite sum (or one that merely overflowed) gets the exact count.
        if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
            continue
        if bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        found.append(f"{name} ({nan} NaN, {inf} inf of {tensor.numel()} values)")
    return found


def require_finite(tensors: Mapping[str, object], origin: str, consequence: str) -> None:
    """Raise CheckpointError naming the tensors of ``tensors`` that hold NaN or inf.

    ``origin`` names the file ("checkpoint 'x.pth'"); ``consequence`` says what was not done."""
    found = non_finite_tensors(tensors)
    if not found:
        return
    shown = ", ".join(found[:_SHOW]) + (f" and {len(found) - _SHOW} more" if len(found) > _SHOW else "")
    raise CheckpointError(
        f"{origin} holds NaN or infinite values in {len(found)} tensor(s): {shown}; the weights are damaged "
        f"(or come from a run that diverged), {consequence}")

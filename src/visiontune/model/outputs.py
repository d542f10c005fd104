"""The class scores in whatever a classifier's forward returned.

Most models return a ``(batch, num_classes)`` tensor. torchvision's GoogLeNet and Inception v3
return a namedtuple with ``.logits`` first and the auxiliary heads' scores after it in train mode
(and when scripted); Hugging Face style models return a mapping or object with ``logits``; some
user models return a plain ``(logits, extra, ...)`` tuple. Training, evaluation, prediction and
export all read the main logits through :func:`main_logits`, so they agree on which output counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def main_logits(outputs) -> torch.Tensor:
    """The main classifier's logits in ``outputs``: the tensor itself, its ``logits`` field
    (namedtuple, dataclass or mapping), or the first element of a tuple/list of tensors."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), torch.Tensor):
            return outputs["logits"]
    elif isinstance(getattr(outputs, "logits", None), torch.Tensor):
        return outputs.logits
    elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find the logits in a model output of type {type(outputs).__name__}: the model's forward should "
        "return a (batch, classes) tensor, a tuple whose first element is that tensor, or something with a 'logits' entry"
    )

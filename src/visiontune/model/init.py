"""Weight initialisation for new layers (a replaced head) or any module.

The ``"kaiming"`` scheme is the tutorial's: a convolution's weight is drawn from
normal(0, sqrt(2 / n)) with n = kernel_h * kernel_w * out_channels (He et al., fan-out mode);
norm layers start as the identity (weight 1, bias 0, fresh running statistics); a linear layer
keeps PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights, which scale with its
input width, and gets a zero bias so that no class is favoured before training.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from visiontune.errors import ConfigError

SCHEMES = ("kaiming", "xavier", "trunc_normal", "zeros")

TRUNC_NORMAL_STD = 0.02  # ViT / timm convention for linear and conv weights


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str = "kaiming") -> nn.Module:
    """Initialise every convolution, linear and norm layer inside ``module`` (itself included).

    Schemes for convolution and linear weights (biases always start at 0):

    - ``"kaiming"``: conv normal(0, sqrt(2/n)), n = kernel_h*kernel_w*out_channels; linear
      uniform(+-1/sqrt(fan_in)).
    - ``"xavier"``: Glorot uniform.
    - ``"trunc_normal"``: normal(0, 0.02) truncated at +-2 std.
    - ``"zeros"``: all zeros; only sensible for a head (its gradient is still non-zero).

    Norm layers (BatchNorm, GroupNorm, LayerNorm, ...) get weight 1 and bias 0 under every scheme.
    Other layers with parameters are left as they are. Returns ``module``.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    for layer in module.modules():
        if isinstance(layer, (_ConvNd, nn.Linear)):
            _init_weight(layer, scheme)
            if layer.bias is not None:
                layer.bias.zero_()
        elif isinstance(layer, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
            _init_norm(layer)
    return module


def _init_weight(layer: nn.Module, scheme: str) -> None:
    weight = layer.weight
    if scheme == "zeros":
        weight.zero_()
    elif scheme == "xavier":
        nn.init.xavier_uniform_(weight)
    elif scheme == "trunc_normal":
        nn.init.trunc_normal_(weight, std=TRUNC_NORMAL_STD, a=-2 * TRUNC_NORMAL_STD, b=2 * TRUNC_NORMAL_STD)
    elif isinstance(layer, _ConvNd):
        n = math.prod(layer.kernel_size) * layer.out_channels
        weight.normal_(0.0, math.sqrt(2.0 / n))
    else:
        fan_in = weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        weight.uniform_(-bound, bound)


def _init_norm(layer: nn.Module) -> None:
    if getattr(layer, "weight", None) is not None:
        layer.weight.fill_(1.0)
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()
    if isinstance(layer, _NormBase) and layer.track_running_stats:
        layer.reset_running_stats()

"""A linear probe on cached features: how well a frozen backbone separates the classes.

The probe is multinomial logistic regression on the backbone's features (the head's input, as the
feature cache keeps them), fitted full-batch with L-BFGS: the problem is convex, so a few hundred
steps from zero weights reach the optimum whatever the backbone, and the result does not depend
on a learning rate, a batch order or a seed. Features are standardised with the training set's
mean and spread first, which keeps the problem well conditioned for backbones whose features
differ by orders of magnitude in scale (a random-init network's vs a pretrained one's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visiontune.features.store import CachedFeatures

log = logging.getLogger(__name__)

PROBE_STEPS = 200  # L-BFGS iterations; the probes of the tests and benchmarks converge well before
PROBE_WEIGHT_DECAY = 1e-4  # L2 penalty on the weights, per feature: keeps separable data from diverging


@dataclass(frozen=True)
class ProbeResult:
    """How a linear probe did: accuracy on the validation features, and the training loss it reached."""

    val_accuracy: float  # fraction of validation images classified right, 0..1
    train_accuracy: float
    train_loss: float  # cross-entropy on the training features once fitted (nats)
    feature_dim: int


def as_matrix(cached: CachedFeatures, view: int = 0) -> torch.Tensor:
    """One view of cached features as an (N, D) float32 matrix; spatial features (a head that
    takes a feature map) are averaged over their positions, as a global pooling head would."""
    features = cached.features[view]
    if isinstance(features, np.ndarray):  # memory-mapped from the disk cache (read-only): read it in
        features = torch.from_numpy(np.array(features, dtype=np.float32))
    matrix = features
    matrix = matrix.float()
    if matrix.dim() > 2:
        matrix = matrix.flatten(2).mean(dim=2)
    return matrix


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int, *,
                     steps: int = PROBE_STEPS, weight_decay: float = PROBE_WEIGHT_DECAY,
                     device: torch.device | str = "cpu") -> nn.Linear:
    """Logistic regression of ``train_labels`` on ``train_features`` (N, D), fitted on ``device``;
    returns a linear layer (on the CPU) that takes raw (unstandardised) features, the
    standardisation folded into its weights. Float64 throughout: L-BFGS's line search compares
    losses that differ in their last float32 digits near the optimum."""
    if train_features.dim() != 2 or len(train_features) != len(train_labels):
        raise ValueError(f"expected (N, D) features and N labels, got {tuple(train_features.shape)} and "
                         f"{tuple(train_labels.shape)}")
    device = torch.device(device)
    if device.type == "mps":
        device = torch.device("cpu")  # no float64 on Apple GPUs
    features = train_features.to(device, torch.float64)
    mean = features.mean(dim=0)
    # Constant features (spread 0) would divide by zero; they carry no information, so scale them by 1.
    spread = features.std(dim=0, unbiased=False)
    spread = torch.where(spread > 1e-12, spread, torch.ones_like(spread))
    standard = (features - mean) / spread
    labels = train_labels.long().to(device)
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss_and_grad() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(standard @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_and_grad)
    probe = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        scaled = weight.detach() / spread  # W (x - m) / s = (W / s) x - (W / s) m
        probe.weight.copy_(scaled.float().cpu())
        probe.bias.copy_((bias.detach() - scaled @ mean).float().cpu())
    return probe


def accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``features`` that ``probe`` classifies as ``labels``."""
    if len(labels) == 0:
        return float("nan")
    with torch.no_grad():
        return float((probe(features.float()).argmax(dim=1) == labels).double().mean())


def run_linear_probe(train: CachedFeatures, val: CachedFeatures, num_classes: int, *,
                     steps: int = PROBE_STEPS, device: torch.device | str = "cpu") -> ProbeResult:
    """Fit a probe on ``train``'s features (on ``device``) and measure it on ``val``'s."""
    train_x, val_x = as_matrix(train), as_matrix(val)
    probe = fit_linear_probe(train_x, train.labels, num_classes, steps=steps, device=device)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(probe(train_x), train.labels.long()))
    result = ProbeResult(val_accuracy=accuracy(probe, val_x, val.labels),
                         train_accuracy=accuracy(probe, train_x, train.labels),
                         train_loss=loss, feature_dim=int(train_x.shape[1]))
    log.info("linear probe on %d features: train %.3f, val %.3f", result.feature_dim, result.train_accuracy,
             result.val_accuracy)
    return result

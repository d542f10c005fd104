"""Auditing a labelled dataset on its backbone features: likely label errors and outliers.

Every image is scored by a model that never saw it: the images are cut into ``folds`` stratified,
seeded folds, and a linear probe (:func:`visiontune.features.probe.fit_linear_probe`) fitted on
the other folds predicts each fold's class probabilities (out-of-fold probabilities). From those,
**cleanlab** ranks the label issues (confident learning: ``cleanlab.filter.find_label_issues``)
and scores every label (``cleanlab.rank.get_label_quality_scores``); we do not rewrite either.
Outliers are images far from all others in feature space: their mean cosine distance to their
nearest neighbours is beyond the rule cleanlab's Datalab uses (Q3 + (1/t - 1) x IQR of those
distances). Duplicates are found in :mod:`visiontune.features.audit_duplicates`.

cleanlab is the ``[audit]`` extra: imported only when scoring starts, with a one-line error
naming ``pip install 'visiontune[audit]'`` when it is missing.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from visiontune.errors import ConfigError
from visiontune.features.probe import fit_linear_probe

log = logging.getLogger(__name__)

_AUDIT_EXTRA = "the audit needs cleanlab; install it with: pip install 'visiontune[audit]'"
# L2 penalty of the out-of-fold probes, per standardised feature. Stronger than the probe's default
# (1e-4): with noisy labels a nearly unregularised probe fits the flipped labels of its training
# folds, and its over-confident probabilities blur confident learning's per-class thresholds.
AUDIT_WEIGHT_DECAY = 1e-2
# L-BFGS iterations per out-of-fold probe. The probes only rank images, so they stop early: on the
# benchmark (1,807 digits, 1,280 features) 30 iterations flag the flips as well as 200 (precision
# 0.86 / recall 0.83 vs 0.85 / 0.83) at a sixth of the CPU time; the fit is most of an audit's
# time once the features are cached.
AUDIT_PROBE_STEPS = 30
# cleanlab's rule for a label issue: "both" flags an image only when both of its confident-learning
# rules agree (pruned by the estimated noise rate, and off the confident joint's diagonal). On the
# benchmark (real digits, 8 % flipped) it raised precision from 0.75 to 0.85 at recall 0.83 over the
# default "prune_by_noise_rate" (benchmarks/README.md).
LABEL_FILTER = "both"
OUTLIER_NEIGHBOURS = 10  # neighbours whose mean cosine distance measures how isolated an image is
# Datalab's default for feature-based outliers: flagged beyond Q3 + (1/t - 1) x IQR of the distances.
OUTLIER_THRESHOLD = 0.37037
_BLOCK_ROWS = 1024  # rows of the cosine-similarity matrix computed at once (bounds memory to ~N x 1024 floats)


@dataclass
class LabelScores:
    """Per image (rows in the order of the features): out-of-fold probabilities and what cleanlab made of them."""

    pred_probs: np.ndarray  # (N, C) out-of-fold class probabilities
    suggested: np.ndarray  # (N,) most probable class
    quality: np.ndarray  # (N,) cleanlab's label-quality score, 0 (surely wrong) .. 1
    label_issue: np.ndarray  # (N,) bool: cleanlab flags the given label
    ranked_issues: np.ndarray  # indices of the flagged images, most suspicious first


def require_cleanlab():
    """The cleanlab modules the audit uses, or a one-line ConfigError naming the extra."""
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise ConfigError(_AUDIT_EXTRA) from None
    return cleanlab.filter, cleanlab.rank


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per image: each class shuffled (seeded) and dealt round-robin over the folds,
    so every fold holds about ``1/folds`` of every class."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2 (each image is scored by a probe fitted on the others), "
                          f"got {folds}")
    if folds > len(labels):
        raise ConfigError(f"--folds {folds} is more than the {len(labels)} images; use at most {len(labels)}")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # Continue the round-robin where the last class stopped, so small classes do not all land in fold 0.
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return assignment


def out_of_fold_probabilities(features: torch.Tensor, labels: np.ndarray, num_classes: int, *, folds: int = 5,
                              seed: int = 0, steps: int = AUDIT_PROBE_STEPS, weight_decay: float = AUDIT_WEIGHT_DECAY,
                              device: torch.device | str = "cpu") -> np.ndarray:
    """(N, C) class probabilities, each row from a probe fitted without that image's fold."""
    fold_of = stratified_folds(labels, folds, seed)
    probabilities = np.zeros((len(labels), num_classes), dtype=np.float64)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    for fold in range(folds):
        held_out = fold_of == fold
        probe = fit_linear_probe(features[~held_out], targets[~held_out], num_classes, steps=steps,
                                 weight_decay=weight_decay, device=device)
        with torch.no_grad():
            probabilities[held_out] = torch.softmax(probe(features[held_out].float()), dim=1).double().numpy()
    return probabilities


def score_labels(pred_probs: np.ndarray, labels: np.ndarray) -> LabelScores:
    """cleanlab's verdict on each given label from out-of-fold ``pred_probs``."""
    clean_filter, rank = require_cleanlab()
    labels = np.asarray(labels, dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:  # cleanlab warns about tiny classes: log, not print
        warnings.simplefilter("always")
        ranked = clean_filter.find_label_issues(labels, pred_probs, filter_by=LABEL_FILTER,
                                                return_indices_ranked_by="self_confidence",
                                                n_jobs=1)  # no process pool on a shared machine
        quality = rank.get_label_quality_scores(labels, pred_probs, method="self_confidence")
    for warning in caught:
        log.info("cleanlab: %s", warning.message)
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[ranked] = True
    return LabelScores(pred_probs, pred_probs.argmax(axis=1), np.asarray(quality, dtype=np.float64), flagged,
                       np.asarray(ranked, dtype=np.int64))


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Features centred on their mean and scaled to unit length, so that a dot product is the
    cosine similarity (centring first: raw post-ReLU features of any two images point the same way)."""
    centred = features.float() - features.float().mean(dim=0)
    return torch.nn.functional.normalize(centred, dim=1)


def nearest_neighbours(unit: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, indices)``, each (N, k): the cosine distances to the ``k`` nearest other rows."""
    k = min(k, len(unit) - 1)
    distances, indices = [], []
    for start in range(0, len(unit), _BLOCK_ROWS):
        block = unit[start:start + _BLOCK_ROWS] @ unit.T
        rows = torch.arange(len(block))
        block[rows, rows + start] = -np.inf  # an image is not its own neighbour
        top = block.topk(k, dim=1)
        distances.append((1.0 - top.values).clamp(min=0.0))
        indices.append(top.indices)
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def outliers(neighbour_distances: np.ndarray, threshold: float = OUTLIER_THRESHOLD) -> tuple[np.ndarray, float]:
    """``(flags, limit)``: images whose mean distance to their neighbours exceeds Q3 + (1/t - 1) x IQR."""
    mean_distance = neighbour_distances.mean(axis=1)
    q1, q3 = np.percentile(mean_distance, [25, 75])
    limit = float(q3 + (1.0 / threshold - 1.0) * (q3 - q1))
    return mean_distance > limit, limit


def class_imbalance(labels: np.ndarray, num_classes: int, fraction: float = 0.1) -> list[int]:
    """Classes with fewer than ``fraction`` of the images an even share would give them (Datalab's rule)."""
    counts = np.bincount(labels, minlength=num_classes)
    return [int(c) for c in np.flatnonzero(counts < fraction * len(labels) / num_classes)]

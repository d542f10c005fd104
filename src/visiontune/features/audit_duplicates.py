"""Duplicate images: the same file bytes (exact) or nearly the same features (near), and leaks.

Exact duplicates share a hash of their file bytes (``hashlib``). Near duplicates (a re-encoded,
resized or lightly edited copy) are pairs whose cosine distance in feature space is below
``NEAR_DUPLICATE_FRACTION`` of the median nearest-neighbour distance, the rule cleanlab's Datalab
uses for its ``near_duplicate`` issue (relative to the data's own spacing, so it needs no tuning
per backbone). Pairs are joined into groups; a group with members in both the training and the
validation split is a **leak**: validation would score images the model trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEAR_DUPLICATE_FRACTION = 0.13  # Datalab's default near_duplicate threshold, times the median NN distance
_READ_BYTES = 1 << 20  # hashing reads files in 1 MiB pieces


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of each other; ``exact`` when all share the same file bytes."""

    members: tuple[int, ...]  # indices into the audited images, ascending
    exact: bool
    leak: bool  # members in both train and val


def file_digest(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(piece)
    return digest.hexdigest()


def duplicate_groups(digests: Sequence[str], neighbour_distances: np.ndarray, neighbour_indices: np.ndarray,
                     is_val: np.ndarray, fraction: float = NEAR_DUPLICATE_FRACTION) -> list[DuplicateGroup]:
    """Groups of two or more images joined by equal ``digests`` or by a near-duplicate pair among
    each image's nearest neighbours (``neighbour_distances``/``indices`` from
    :func:`visiontune.features.audit.nearest_neighbours`); leaks (train and val) first."""
    parent = list(range(len(digests)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    def join(first: int, second: int) -> None:
        parent[root(first)] = root(second)

    first_with: dict[str, int] = {}
    for index, digest in enumerate(digests):
        if digest in first_with:
            join(index, first_with[digest])
        else:
            first_with[digest] = index
    if neighbour_distances.size:
        median = max(float(np.median(neighbour_distances[:, 0])), 1e-12)  # avoid a limit of 0 on all-equal data
        rows, columns = np.nonzero(neighbour_distances < fraction * median)
        for row, column in zip(rows, columns):
            join(int(row), int(neighbour_indices[row, column]))
    members: dict[int, list[int]] = {}
    for index in range(len(digests)):
        members.setdefault(root(index), []).append(index)
    groups = [DuplicateGroup(tuple(group), exact=len({digests[i] for i in group}) == 1,
                             leak=bool(is_val[group].any() and not is_val[group].all()))
              for group in members.values() if len(group) > 1]
    return sorted(groups, key=lambda group: (not group.leak, group.members))

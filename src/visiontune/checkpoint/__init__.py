"""Checkpoint surgery: read safely, unwrap, clean prefixes, match keys, load, report; save atomically.

The chain of ``load_weights`` (each step a module of its own):
:mod:`.io` (read safely) -> :mod:`.unwrap` -> :mod:`.clean` (prefixes) -> :mod:`.match` /
:mod:`.align` (which tensor fills which) -> copy -> :mod:`.report`.
"""

from __future__ import annotations

from visiontune.atomic_io import atomic_write
from visiontune.checkpoint.io import read_checkpoint
from visiontune.checkpoint.load import load_weights
from visiontune.checkpoint.report import LoadReport
from visiontune.checkpoint.save import load_model, save_model, save_weights

__all__ = ["LoadReport", "atomic_write", "load_model", "load_weights", "read_checkpoint", "save_model", "save_weights"]

"""Errors meant for people.

Every mistake a user can make (a wrong path, an unknown model, a bad checkpoint, an impossible
config) raises a subclass of :class:`VisiontuneError` whose message says what was wrong, with the
offending value, and what to do instead. The CLI prints that message on one line and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VisiontuneError(Exception):
    """A user's mistake or bad input. The CLI prints ``str(error)`` and exits with status 2."""


class ConfigError(VisiontuneError, ValueError):
    """An option or config value that cannot work (unknown key, wrong type, out of range)."""


class ModelError(VisiontuneError, ValueError):
    """An unknown architecture, a model whose head cannot be found, or weights that cannot be had."""


class CheckpointError(VisiontuneError):
    """A checkpoint that is missing, corrupt, unsafe, or does not fit the model."""


class DataError(VisiontuneError):
    """An image folder, manifest or image that cannot be used for training."""

"""Errors meant for people.

Every mistake a user can make (a wrong path, an unknown model, a bad checkpoint, an impossible
config) raises a subclass of :class:`VisiontuneError` whose message says what was wrong, with the
offending value, and what to do instead. The CLI prints that message on one line and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib


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



SHOWN_CHARACTERS = 80  # how much of a user's value an error message quotes


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting a user's value in a message.

    A value can be arbitrarily large (a YAML alias expanding to megabytes, a whole file pasted into
    a flag), and a full ``repr`` of it can take gigabytes before it could be cut; ``reprlib`` stops
    early at every level, so this costs the same for any value."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still deserves a message
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


class _ShortRepr(reprlib.Repr):
    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 256:  # Python refuses to print ints past 4,300 digits, and it is slow before
            return f"<an integer of {value.bit_length() * 0.30103:.0f} digits>"
        return super().repr_int(value, level)


_SHORT_REPR = _ShortRepr()
_SHORT_REPR.maxstring = SHOWN_CHARACTERS
_SHORT_REPR.maxother = SHOWN_CHARACTERS
_SHORT_REPR.maxlong = SHOWN_CHARACTERS
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 8
_SHORT_REPR.maxlevel = 3

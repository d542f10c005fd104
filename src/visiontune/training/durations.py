"""Durations as people write them: ``90`` or ``90s`` (seconds), ``3m``, ``1.5h``, ``1h30m``."""

from __future__ import annotations

import re

from visiontune.errors import ConfigError, shown

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smh]?)")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number (seconds) or parts such as ``3m``, ``1h30m``, ``45s``; must be > 0."""
    if isinstance(value, bool):
        raise ConfigError(f"a duration must be a number of seconds or text such as '3m', got {shown(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = _PART.findall(text)
        if not text or "".join(number + unit for number, unit in parts) != text or \
                sum(1 for _, unit in parts if not unit) > (1 if len(parts) == 1 else 0):
            raise ConfigError(f"cannot read the duration {shown(value)}; write seconds or units s/m/h, "
                              "such as 90, 90s, 3m, 1.5h or 1h30m")
        seconds = sum(float(number) * _UNIT_SECONDS[unit or "s"] for number, unit in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"a duration must be more than 0 seconds and finite, got {shown(value)}")
    return seconds

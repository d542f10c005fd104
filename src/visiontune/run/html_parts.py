"""Small pieces of the self-contained HTML pages a run leaves (report.html): escaping, inlined
images, tables that scroll sideways on a phone, tolerant readers of the run's files.

Every piece of text goes through :func:`escape`; every image is a ``data:`` URI. A run's optional
file that is missing or damaged reads as None (with a log line), so its section says "not
available" instead of stopping the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

MAX_ITEMS = 40  # a load report can list hundreds of tensors: show this many of each list, and the count


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, css_class: str | None = None) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    css = f' class="{css_class}"' if css_class else ""
    return f'<img{css} alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def missing(what: str) -> str:
    return f'<p class="missing">not available: {escape(what)}</p>'


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def scrolling(table: str) -> str:
    """A wide table in a box that scrolls sideways, so a phone-width page never does."""
    return f'<div class="scroll">{table}</div>'


def key_value_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{escape(key)}</th><td>{escape(format_value(value))}</td></tr>"
                   for key, value in values.items())
    return scrolling(f"<table>{rows}</table>")


def render_value(value) -> str:
    """Nested dicts as tables, lists as bulleted lists (long ones truncated), scalars escaped."""
    if isinstance(value, dict):
        if not value:
            return "<em>none</em>"
        shown = list(value.items())[:MAX_ITEMS]
        rows = "".join(f"<tr><th>{escape(key)}</th><td>{render_value(item)}</td></tr>" for key, item in shown)
        hidden = len(value) - len(shown)
        more = f'<tr><td colspan="2">... and {hidden} more</td></tr>' if hidden else ""
        return scrolling(f"<table>{rows}{more}</table>")
    if isinstance(value, (list, tuple)):
        if not value:
            return "<em>none</em>"
        shown = value[:MAX_ITEMS]
        items = "".join(f"<li>{render_value(item)}</li>" for item in shown)
        more = f"<li>... and {len(value) - len(shown)} more</li>" if len(value) > len(shown) else ""
        return f"<ul>{items}{more}</ul>"
    return escape(format_value(value))


def find_key(tree, key: str):
    """The first value stored under ``key`` anywhere in nested dicts (breadth first), else None."""
    level = [tree]
    while level:
        next_level = []
        for node in level:
            if isinstance(node, dict):
                if key in node:
                    return node[key]
                next_level.extend(value for value in node.values() if isinstance(value, dict))
        level = next_level
    return None


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def format_value(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def format_cell(value) -> str:
    """A CSV cell: numbers formatted, anything else as written."""
    number = to_float(value)
    return format_value(number) if number is not None else format_value(value)


def to_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def read_json(path: Path, kind: type | None = None):
    """The JSON value in ``path``; None (its sections are left out, with a log line) when the file is
    missing, not JSON or not of ``kind`` (a damaged or swapped file)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        log.warning("%s is not valid JSON (%s); its sections are left out", path, str(error)[:80])
        return None
    if kind is not None and not isinstance(value, kind):
        log.warning("%s holds a %s, not a %s; its sections are left out", path, type(value).__name__, kind.__name__)
        return None
    return value


def read_csv(path: Path) -> list[dict] | None:
    text = read_text(path)
    return None if text is None else list(csv.DictReader(io.StringIO(text)))

"""Reading YAML (and JSON) that a user wrote: UTF-8 only, safe types only, aliases bounded.

Config files, ``convert --match`` rules and a run's ``config.yaml`` all come through
:func:`load_yaml_file` / :func:`load_yaml_text`, so every problem with one is a one-line
ConfigError naming the file, and no reader can be made to expand an alias bomb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from visiontune.errors import ConfigError


MAX_ALIAS_REPEATS = 10_000  # YAML nodes aliases may repeat in one document; a whole config has ~40 values


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past :data:`MAX_ALIAS_REPEATS`.

    A 330-byte file of nested anchors (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) composes into a
    few nodes but expands to billions of values the moment anything walks it (a message, a repr,
    a copy): a "billion laughs". Counting before constructing makes every reader of YAML safe."""

    def compose_document(self):
        node = super().compose_document()
        distinct, expanded = _count_nodes(node)
        if expanded is None:
            raise yaml.YAMLError("an alias refers to the value that contains it (a self-referencing anchor)")
        if expanded - distinct > MAX_ALIAS_REPEATS:
            raise yaml.YAMLError(
                f"its aliases (*name) would repeat {expanded - distinct:,} values, more than the {MAX_ALIAS_REPEATS:,} allowed; "
                "write the values out instead of nesting anchors")
        return node


def _count_nodes(root: yaml.Node) -> tuple[int, int | None]:
    """(distinct nodes, nodes once every alias is expanded; None if an alias contains itself).

    Iterative, memoised by node identity: the cost is the size of the file, not of the expansion."""
    expanded: dict[int, int] = {}
    on_path: set[int] = set()  # nodes whose children are being counted: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        key = id(node)
        if children_counted:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(child)] for child in _children(node))
            continue
        if key in expanded:
            continue
        if key in on_path:
            return len(expanded), None
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)
    return len(expanded), expanded[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The one way visiontune reads a YAML (or JSON) file: UTF-8, safe types only, aliases bounded.

    Every problem (unreadable, not UTF-8, not YAML, an alias bomb, absurd nesting) is a one-line
    ConfigError naming ``what`` and the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                          "save it as UTF-8") from None
    return load_yaml_text(text, f"{what} {path}")


def load_yaml_text(text: str, origin: str) -> Any:
    """Parse YAML text with :class:`_BoundedLoader`; any problem is a one-line ConfigError naming ``origin``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - _BoundedLoader is a SafeLoader
    except yaml.YAMLError as error:
        first_line = (str(error).splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{origin} is not valid YAML: {first_line}") from None
    except RecursionError:
        raise ConfigError(f"{origin} is nested too deeply to be read") from None
    except ValueError as error:  # PyYAML lets int() refuse a number of more than 4,300 digits
        raise ConfigError(f"{origin} holds a value that cannot be read: {str(error)[:80]}") from None

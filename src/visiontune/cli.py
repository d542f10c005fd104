"""The ``visiontune`` command line.

Each sub-command lives in its own module under :mod:`visiontune.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a function taking the parsed
arguments and returning an exit status. This module only dispatches and turns user errors into a
one-line message with exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from visiontune.errors import VisiontuneError

# Order is the order shown by --help.
COMMAND_MODULES = (
    "demo",
    "train",
    "evaluate",
    "predict",
    "models",
    "inspect",
    "convert",
    "export",
    "lr_find",
    "report",
)


class _Parser(argparse.ArgumentParser):
    """argparse already exits with status 2 on a usage error; keep its message to one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="visiontune",
        description="Fine-tune pretrained image classifiers (torchvision and timm).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"visiontune {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"visiontune.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"visiontune.commands.{name}":
                continue  # a command not built yet is simply not offered
            raise
        module.register(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("visiontune")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        # The help goes to stdout; the error, like every usage error, is one line on stderr.
        print("visiontune: error: a COMMAND is required (see 'visiontune --help')", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except VisiontuneError as error:
        if args.debug:
            raise
        print(f"visiontune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"visiontune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` or similar that stopped reading: not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

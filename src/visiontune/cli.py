"""The ``visiontune`` command line.

Each sub-command lives in its own module under :mod:`visiontune.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a function taking the parsed
arguments and returning an exit status. This module only dispatches and turns user errors into a
one-line message with exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys

from visiontune.errors import SHOWN_CHARACTERS, VisiontuneError, shown

# Order is the order shown by --help.
COMMAND_MODULES = (
    "demo",
    "train",
    "evaluate",
    "predict",
    "models",
    "select",
    "inspect",
    "convert",
    "export",
    "lr_find",
    "report",
    "audit",
    "explain",
    "shard",
)


class _Parser(argparse.ArgumentParser):
    """argparse already exits with status 2 on a usage error; keep its message to one line.

    Abbreviated flags are refused (``allow_abbrev=False``): ``--out`` must not silently mean
    ``--out-dir`` once such a flag exists, and a command line that works today must not become
    ambiguous when a flag is added. This class is the parser of every sub-command too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        # argparse quotes the offending value whole ("invalid int value: '<5,000 characters>'"); cut it.
        message = re.sub(r"'([^']{%d,})'" % (SHOWN_CHARACTERS + 1), lambda match: shown(match.group(1)), message)
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
        importlib.import_module(f"visiontune.commands.{name}").register(subparsers)
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
    except OSError as error:
        if args.debug or error.errno not in _USER_ERRNOS:
            raise
        print(f"visiontune {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        # A request larger than the machine (a billion classes, a giant image) fails in torch's
        # allocator; say so in one line. Any other RuntimeError is a bug and keeps its traceback.
        if args.debug or not is_allocation_failure(error):
            raise
        print(f"visiontune {args.command}: error: {describe_allocation_failure(error)}", file=sys.stderr)
        return 2


# What the file system says about a user's paths and disk, rather than about visiontune: a
# read-only or permission-less --out, a folder under /proc, a full disk. Other errnos stay bugs.
_USER_ERRNOS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.ENOENT: "check the path (a folder on the way may not exist or may not allow new entries)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder; give a file",
    errno.ENAMETOOLONG: "the path is too long for the file system",
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "the file grew past the size the system allows (ulimit -f)",
}


def is_allocation_failure(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error)


def describe_allocation_failure(error: BaseException) -> str:
    asked = re.search(r"allocate (\d+) bytes", str(error))
    size = f" ({int(asked.group(1)) / 2**30:.1f} GiB in one piece)" if asked else ""
    return (f"not enough memory for this request{size}; choose a smaller --num-classes, --image-size or "
            "--batch-size")


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    name = error.filename
    name = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else name
    where = f" {shown(str(name), limit=300)}" if name is not None else ""
    return f"{error.strerror or error}{':' if where else ''}{where}; {_USER_ERRNOS[error.errno]}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Arguments that several sub-commands share, each written (and validated) once.

Validation happens in argparse ``type=`` functions, so a bad value is a one-line usage error that
names the flag (``visiontune predict: error: argument --batch-size: must be at least 1, got 0``)
before any run folder is read or model loaded.
"""

from __future__ import annotations

import argparse

from visiontune.device import DEVICES

CHECKPOINTS = ("best", "last")  # the run folder's best.safetensors and last.ckpt


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_run_folder_argument(parser: argparse.ArgumentParser) -> None:
    """``--run RUN``: the folder a training run wrote."""
    # --run-dir: the same flag under a name torchrun's own parser does not take for its --run-path
    # (torchrun accepts abbreviations, so it would swallow `--run RUN` before visiontune starts).
    parser.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                        help="run folder written by 'visiontune train' (--run-dir: the same, for torchrun)")


def add_run_arguments(parser: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """``--run`` and ``--checkpoint``; with a default ``batch_size``, also ``--batch-size`` and
    ``--device`` for the commands that run the model over images."""
    add_run_folder_argument(parser)
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which weights (default: best)")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="B",
                            help=f"images per forward pass (default: {batch_size})")
        parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")

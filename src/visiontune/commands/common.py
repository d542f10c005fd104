"""Arguments that several sub-commands share, each written (and validated) once.

Validation happens in argparse ``type=`` functions, so a bad value is a one-line usage error that
names the flag (``visiontune predict: error: argument --batch-size: must be at least 1, got 0``)
before any run folder is read or model loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visiontune.device import DEVICES
from visiontune.errors import ConfigError

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


def add_run_folder_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--run RUN``: the folder a training run wrote (``required=False``: the command checks it)."""
    # --run-dir: the same flag under a name torchrun's own parser does not take for its --run-path
    # (torchrun accepts abbreviations, so it would swallow `--run RUN` before visiontune starts).
    parser.add_argument("--run", "--run-dir", required=required, metavar="RUN",
                        help="run folder written by 'visiontune train' (--run-dir: the same, for torchrun)")


def add_run_arguments(parser: argparse.ArgumentParser, batch_size: int | None = None, run_required: bool = True) -> None:
    """``--run`` and ``--checkpoint``; with a default ``batch_size``, also ``--batch-size`` and
    ``--device`` for the commands that run the model over images."""
    add_run_folder_argument(parser, required=run_required)
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="which weights (default: best)")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="B",
                            help=f"images per forward pass (default: {batch_size})")
        parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")


BACKENDS = ("torch", "onnx")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--model-file``: run an exported ONNX file with ONNX Runtime instead of the run's model."""
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="torch: the run's PyTorch model (default); onnx: an exported ONNX file with ONNX Runtime "
                        "and its FILE.json (no run folder needed)")
    parser.add_argument("--model-file", metavar="FILE.onnx",
                        help="with --backend onnx: the file 'visiontune export' wrote (default: RUN/model.onnx)")


def onnx_model_file(args: argparse.Namespace):
    """The ONNX file ``--backend onnx`` runs, or a one-line error; None for ``--backend torch``
    (whose ``--run`` is then required)."""
    if args.backend != "onnx":
        if args.model_file:
            raise ConfigError("--model-file is for --backend onnx; add --backend onnx, or drop --model-file")
        if not args.run:
            raise ConfigError("the following arguments are required: --run (or --backend onnx --model-file FILE.onnx)")
        return None
    if args.model_file:
        return Path(args.model_file)
    if not args.run:
        raise ConfigError("--backend onnx needs --model-file FILE.onnx (or --run RUN for RUN/model.onnx)")
    return Path(args.run) / "model.onnx"

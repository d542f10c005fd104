"""``visiontune train --nproc N``: start torchrun on this machine for the user."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import run as torchrun_run

from visiontune.errors import ConfigError

logger = logging.getLogger(__name__)


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the launched processes must not relaunch)."""
    stripped: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--nproc":
            skip_next = True
        elif not arg.startswith("--nproc="):
            stripped.append(arg)
    return stripped


def torchrun_arguments(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments for running ``python -m visiontune <argv>`` in ``nproc`` local processes."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: need at least 1 process")
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "visiontune", *strip_nproc(argv)]


def parse_torchrun_arguments(arguments: Sequence[str]) -> argparse.Namespace:
    """torchrun's own parser, minus abbreviations: its default would read a visiontune flag after
    ``-m visiontune`` as an abbreviation of one of ITS flags (``--run`` -> ``--run-path`` or
    ``--run_path``: "ambiguous option") and stop before starting anything. Without
    abbreviations every argument after the module name reaches visiontune unchanged."""
    parser = get_args_parser()
    parser.allow_abbrev = False
    return parser.parse_args(list(arguments))


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``visiontune <argv>`` as ``nproc`` processes on this machine under torchrun (in this
    process: no extra interpreter start). Returns the exit status: 0, or the first failed
    process's (torchrun has then stopped the others and printed that process's error)."""
    arguments = torchrun_arguments(nproc, argv)
    logger.info("running: torchrun %s", " ".join(arguments))
    try:
        torchrun_run(parse_torchrun_arguments(arguments))
    except ChildFailedError as error:
        failed_rank, failure = error.get_first_failure()
        logger.error("process %d of %d failed (exit code %s)", failed_rank, nproc, failure.exitcode)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0

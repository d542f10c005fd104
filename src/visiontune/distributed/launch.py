"""``visiontune train --nproc N``: start torchrun on this machine for the user."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``visiontune <argv>`` as ``nproc`` processes on this machine under torchrun (in this
    process: no extra interpreter start). Returns the exit status: 0, or the first failed
    process's (torchrun has then stopped the others and printed that process's error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    arguments = torchrun_arguments(nproc, argv)
    logger.info("running: torchrun %s", " ".join(arguments))
    try:
        torchrun_main(arguments)
    except ChildFailedError as error:
        failed_rank, failure = error.get_first_failure()
        logger.error("process %d of %d failed (exit code %s)", failed_rank, nproc, failure.exitcode)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0

"""``visiontune report``: (re)build a run's self-contained report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

from visiontune.errors import ConfigError

from visiontune.commands.common import add_run_folder_argument


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write RUN/report.html: result, curves, confusion matrix, worst mistakes with Grad-CAM",
        description="Build one self-contained HTML page (images inlined, opens offline, readable on a phone) from "
        "a run folder: the headline result, learning curves, confusion matrix, per-class precision/recall, the "
        "validation images it got most wrong (with Grad-CAM overlays when grad-cam is installed), the audit's "
        "counts if RUN/audit.json exists, and, folded, the configuration and the weights' load report.",
    )
    add_run_folder_argument(parser)
    parser.add_argument("--out", metavar="FILE", help="where to write (default: RUN/report.html)")
    parser.add_argument("--max-wrong", type=int, default=24, metavar="N",
                        help="how many misclassified validation images to show (default: 24)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.errors import ConfigError
    from visiontune.run.report_html import write_report

    if args.max_wrong < 0:
        raise ConfigError(f"--max-wrong must be 0 or more, got {args.max_wrong}")
    if args.out is not None:
        _prepare_out(Path(args.out))
    path = write_report(args.run, out=args.out, max_wrong=args.max_wrong)
    print(f"wrote {path}")
    return 0


def _prepare_out(out: Path) -> None:
    """--out names a file: refuse a folder, create missing parent folders (as export and convert do)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot create its folder {out.parent} ({error.strerror})") from None

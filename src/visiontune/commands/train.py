"""``visiontune train``: fine-tune a pretrained classifier on a folder of images.

The flags come from :class:`visiontune.config.TrainConfig` (one source of truth); this module
adds the run-control flags (--config, --resume, --overwrite, --quiet) and all the printing:
a progress bar per epoch when stderr is a terminal, one line per epoch, a final table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from visiontune.config import add_config_arguments, config_from_args, given_config_values, load_config_file
from visiontune.errors import ConfigError

BUDGET_LOGGER = "visiontune.training.budget_plan"
EPOCH_LINE = "epoch {epoch:>3}/{epochs} {phase:<7} train loss {train_loss:.4f} acc {train_acc:.3f} | " \
             "val loss {val_loss:.4f} acc {val_acc:.3f} | {seconds:.1f}s {images_per_s:.0f} img/s"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a pretrained image classifier on a folder of images",
        description="Fine-tune a pretrained image classifier. A YAML --config gives defaults; flags override it.")
    add_config_arguments(parser)
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="YAML file of TrainConfig keys")
    parser.add_argument("--resume", metavar="RUN", help="continue RUN from its last.ckpt with its saved config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files visiontune wrote in an existing run folder (others stay)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train in N processes on this machine (one per GPU) by starting torchrun; "
                             "the same as 'torchrun --nproc_per_node N -m visiontune train ...'")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = process_started()  # --budget counts the whole command: loading Python and torch is part of it
    from visiontune import distributed
    from visiontune.training.engine import resume, train

    if args.nproc is not None and args.nproc != 1 and not distributed.launched_by_torchrun():
        return distributed.launch_local(args.nproc, relaunch_arguments(args))
    main_process = distributed.is_main_process()  # under torchrun only rank 0 prints
    reporter = ConsoleReporter(quiet=args.quiet or not main_process)
    if main_process and not args.quiet and not getattr(args, "debug", False):  # --debug shows every log already
        show_budget_messages()
    config = None
    try:
        if args.resume:
            result = resume(args.resume, overrides=given_config_values(args), reporter=reporter, started=started)
        else:
            refuse_budget_with_epochs(args)
            config = config_from_args(args, args.config_file)
            result = train(config, overwrite=args.overwrite, reporter=reporter, started=started)
    except KeyboardInterrupt as interrupt:
        reporter.close()
        # An interrupt in the epoch loop names the run folder (also the default one train() chose).
        run_dir = getattr(interrupt, "run_dir", None) or args.resume or (config and config.out)
        print(f"visiontune train: {interrupted_message(run_dir and str(run_dir))}", file=sys.stderr)
        return 130
    finally:
        reporter.close()
    if not main_process:
        return 0
    if not args.quiet:
        print(final_table(result))
    measure = "mAP" if result.metrics.get("task") == "multilabel" else "accuracy"  # what chose the best epoch
    print(f"run folder: {result.run_dir}  (best val {measure} {result.best_accuracy:.4f} at epoch {result.best_epoch})")
    return 0


def process_started() -> float:
    """When this process started, as a ``time.monotonic()`` reading: from /proc on Linux (seconds
    since boot, then and now), else now."""
    now = time.monotonic()
    try:
        since_boot_now = float(Path("/proc/uptime").read_text().split()[0])
        # /proc/self/stat: "pid (name) state ..." and the name may hold spaces, so count after ")"
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot_then = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    age = since_boot_now - since_boot_then
    return now - age if 0 <= age < 3600 else now  # an implausible age (a clock oddity): count from now


def show_budget_messages() -> None:
    """--budget's plan (epochs chosen and why) and its hard stop are logged at info level, which the
    command otherwise keeps quiet: print those lines."""
    logger = logging.getLogger(BUDGET_LOGGER)
    if not any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):  # once per process
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the root handler would print them a second time


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (it may be replaced after the handler is made)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def refuse_budget_with_epochs(args: argparse.Namespace) -> None:
    """--budget chooses the epochs, so it cannot come with epochs the user set (by flag or in --config)."""
    given = given_config_values(args)
    from_file = load_config_file(args.config_file) if args.config_file else {}
    sources = {name: f"--{name}" if name in given else f"'{name}' in {args.config_file}"
               for name in ("budget", "epochs") if name in given or name in from_file}
    if len(sources) == 2 and (given.get("budget", from_file.get("budget")) is not None):
        raise ConfigError(f"{sources['budget']} chooses the number of epochs itself, so it cannot be combined with "
                          f"{sources['epochs']}; give one of them")


def interrupted_message(run_dir: str | None) -> str:
    from visiontune.run.folder import LAST_CHECKPOINT

    if run_dir and (Path(run_dir) / LAST_CHECKPOINT).is_file():
        return (f"interrupted; the last completed epoch is saved in {Path(run_dir) / LAST_CHECKPOINT}, "
                f"continue with: visiontune train --resume {run_dir}")
    return "interrupted before the first epoch finished; nothing to resume and nothing kept: run the same command again"


def relaunch_arguments(args: argparse.Namespace) -> list[str]:
    """The command line that repeats this one in every torchrun process (without --nproc)."""
    arguments = ["--debug"] if getattr(args, "debug", False) else []
    arguments.append("train")
    for name, value in given_config_values(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else f"--no-{flag[2:]}")
        else:
            arguments += [flag, str(value)]
    for flag, value in (("--config", args.config_file), ("--resume", args.resume)):
        if value:
            arguments += [flag, str(value)]
    arguments += [flag for flag, on in (("--overwrite", args.overwrite), ("--quiet", args.quiet)) if on]
    return arguments


class ConsoleReporter:
    """A tqdm bar per epoch (only on a terminal), one summary line per epoch (unless quiet)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self.epochs = 0

    def start_epoch(self, epoch: int, epochs: int, num_batches: int, phase: str) -> None:
        self.epochs = epochs
        if self.quiet or not self.stream.isatty():
            return
        from tqdm import tqdm

        self.bar = tqdm(total=num_batches, desc=f"epoch {epoch}/{epochs} {phase}", unit="batch", leave=False,
                        file=self.stream, dynamic_ncols=True)
        self.images, self.epoch = 0, epoch

    def advance(self, images: int) -> None:
        if self.bar is None:
            return
        self.images += images
        self.bar.update(1)
        elapsed = self.bar.format_dict["elapsed"]
        if elapsed > 0:
            self.bar.set_postfix_str(f"{self.images / elapsed:.0f} img/s", refresh=False)

    def end_epoch(self, row: dict) -> None:
        self.close()
        if not self.quiet:
            line = EPOCH_LINE.format(epochs=self.epochs, **row)
            if "val_map" in row:  # multi-label: the mAP that chooses the best epoch
                line += f" | val mAP {row['val_map']:.3f}"
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def final_table(result) -> str:
    """The epochs as a small fixed-width table, the best epoch marked with *."""
    header = f"{'epoch':>5} {'phase':<7} {'train loss':>10} {'train acc':>9} {'val loss':>9} {'val acc':>8} {'macro F1':>8}"
    lines = [header, "-" * len(header)]
    for row in result.history:
        mark = "*" if row["epoch"] == result.best_epoch else " "
        lines.append(f"{row['epoch']:>4}{mark} {row['phase']:<7} {row['train_loss']:>10.4f} {row['train_acc']:>9.3f} "
                     f"{row['val_loss']:>9.4f} {row['val_acc']:>8.3f} {row['val_macro_f1']:>8.3f}"
                     + (f" {row['val_map']:>8.3f}" if "val_map" in row else ""))
    if any("val_map" in row for row in result.history):  # multi-label: acc is exact match, mAP picks the best
        lines[0] += f" {'val mAP':>8}"
        lines[1] = "-" * len(lines[0])
    if result.stopped_early:
        lines.append(f"stopped early after epoch {result.epochs_completed} (no better val accuracy)")
    return "\n".join(lines)

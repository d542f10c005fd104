"""``visiontune lr-find``: the learning-rate range test on the model and data a run would use."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visiontune.atomic_io import write_text_atomically
from visiontune.config import add_config_arguments, config_from_args
from visiontune.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="suggest a learning rate with the range test (writes lr_find.png)",
        description="Train for up to --steps mini-batches with an exponentially growing learning rate on the "
        "model, strategy and data 'visiontune train' would use with the same flags; stop when the smoothed loss "
        "exceeds 4x its best; put the model back; suggest (rate at the lowest loss) / 10. The suggestion is for "
        "--lr: the head's rate keeps its ratio to it (10x unless --head-lr). Writes OUT/lr_find.png and "
        "OUT/lr_find.json.",
    )
    # The same model/strategy/data flags as train, except --out: no run folder is made, so it
    # names where the plot goes instead.
    add_config_arguments(parser, exclude=("out",))
    parser.add_argument("--out", dest="plot_dir", metavar="DIR",
                        help="folder for lr_find.png and lr_find.json (default: .)")
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="YAML file of TrainConfig keys")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="most steps to run (default: 100)")
    parser.add_argument("--start-lr", type=float, default=1e-7, metavar="LR", help="first rate (default: 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, metavar="LR", help="last rate (default: 10)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Deferred: torch and the training stack load only when the command runs, not for --help.
    from visiontune.training.lr_finder import REFERENCE_LR, lr_find_for_setup, plot_lr_find
    from visiontune.training.setup import build_training

    if args.steps < 2:
        raise ConfigError(f"--steps must be at least 2, got {args.steps}")
    if not 0 < args.start_lr < args.end_lr:
        raise ConfigError(f"need 0 < --start-lr < --end-lr, got {args.start_lr:g} and {args.end_lr:g}")
    config = config_from_args(args, args.config_file)
    out_dir = Path(args.plot_dir or config.out or ".")  # a YAML config's out: names the folder too
    config.out = None  # nothing is trained, so there is no run folder
    if config.lr == "auto":
        config.lr = REFERENCE_LR
    setup = build_training(config)
    result = lr_find_for_setup(setup, reference_lr=float(config.lr), start_lr=args.start_lr, end_lr=args.end_lr,
                               num_steps=args.steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_lr_find(result, out_dir / "lr_find.png")
    write_text_atomically(out_dir / "lr_find.json", json.dumps(result.to_dict(), indent=2) + "\n")
    ending = "stopped when the loss diverged" if result.diverged else "did not diverge"
    print(f"ran {len(result.lrs)} steps from {args.start_lr:g} to {result.lrs[-1]:.3g} ({ending})"
          if result.lrs else "the loss was not finite from the first step")
    if result.suggestion is None:
        raise ConfigError("the range test recorded no usable loss; try a smaller --start-lr or check the data")
    valley = f"; fastai's valley: {result.valley:.2e}" if result.valley is not None else ""
    print(f"suggested learning rate: {result.suggestion:.2e} (lowest smoothed loss / 10{valley})")
    print(f"plot: {plot}")
    print(f"use it with: visiontune train ... --lr {result.suggestion:.2e}")
    return 0

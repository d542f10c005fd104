"""``visiontune select --data DIR --models a,b,c``: which backbone to fine-tune.

Each candidate is scored by a linear probe on its frozen features and by the images per second
of its training step (:mod:`visiontune.training.select`); this module prints the ranked table.
"""

from __future__ import annotations

import argparse

from visiontune.commands.common import positive_int
from visiontune.device import DEVICES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "select", help="rank candidate backbones by a linear probe on their features and their training speed",
        description="Score each model of --models on --data: a linear probe on the frozen backbone's features "
        "(one forward pass per image) gives its validation accuracy, a few timed training steps its images/s. "
        "Prints a ranked table, recommended model first (most accurate; within half a point, the fastest), "
        "and writes select.json.")
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder or CSV manifest, as for train")
    parser.add_argument("--models", required=True, metavar="A,B,C",
                        help="candidates separated by commas: torchvision names and timm:<name>")
    parser.add_argument("--weights", default="DEFAULT", metavar="DEFAULT|none|PATH",
                        help="weights for every candidate: DEFAULT (each model's pretrained), none (random init), "
                             "or a file (one model only) (default: DEFAULT)")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="crop size in pixels for every candidate (default: each model's own)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                        help="training batch whose step is timed (default: train's)")
    parser.add_argument("--budget", default=None, metavar="TIME",
                        help="training time you plan, such as 3m or 1h: shows the epochs each model fits in it "
                             "and ranks models that fit no whole epoch last")
    parser.add_argument("--val-split", type=float, default=None, metavar="F",
                        help="fraction of each class for validation when DIR has no val/ folder (default: 0.2)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the split and the new heads (default: 0)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for select.json (default: runs/select-<timestamp>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.training.select import select_backbone

    result = select_backbone(args.data, args.models, weights=args.weights, image_size=args.image_size,
                             batch_size=args.batch_size, budget=args.budget, val_split=args.val_split,
                             seed=args.seed, device=args.device, out=args.out)
    print(f"{result.train_images} training and {result.val_images} validation images, {len(result.classes)} "
          f"classes; weights {result.weights}; training step timed at batch {result.batch_size}")
    print_table(result)
    if result.recommended is None:
        print("no candidate could be scored; see the notes above")
        return 1
    print(f"recommended: {result.recommended}")
    print(f"wrote {result.path}")
    return 0


def print_table(result) -> None:
    with_budget = result.budget_seconds is not None
    header = ["rank", "model", "probe acc", "images/s", "params (M)", "px"]
    header += ["epochs in budget"] if with_budget else []
    rows = []
    for index, candidate in enumerate(result.candidates, start=1):
        if candidate.error is not None:
            rows.append([str(index), candidate.model, "-", "-", _millions(candidate.parameters),
                         str(candidate.image_size or "-")] + (["-"] if with_budget else []) + [candidate.error])
            continue
        row = [str(index), candidate.model, f"{candidate.val_accuracy:.3f}", f"{candidate.images_per_second:.1f}",
               _millions(candidate.parameters), str(candidate.image_size)]
        if with_budget:
            row.append(f"{candidate.epochs_in_budget:.1f}" + ("" if candidate.fits_budget else " (< 1)"))
        rows.append(row)
    widths = [max(len(row[column]) for row in rows + [header]) for column in range(len(header))]
    for row in [header] + rows:
        cells = [cell.ljust(width) if column == 1 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        print("  ".join(cells + row[len(header):]).rstrip())


def _millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}"

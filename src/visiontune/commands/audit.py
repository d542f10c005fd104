"""``visiontune audit --data DIR --model NAME --out AUDIT_DIR``: wrong labels, duplicates, leaks, outliers.

The work is :func:`visiontune.training.audit.audit`; this module prints what it found, leaks first
(validation images with a copy in training make every validation figure too high).
"""

from __future__ import annotations

import argparse

from visiontune.commands.common import positive_int
from visiontune.device import DEVICES

LISTED = 5  # leaked images and label suspects named on the terminal; audit.csv has them all


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="find likely wrong labels, duplicates, train/val leaks and outliers in a labelled image set",
        description="Runs the backbone once over every image (feature cache: a second audit of the same data "
        "takes seconds), scores each image with linear probes fitted on the other folds, and ranks likely label "
        "errors with cleanlab; finds exact duplicates by file hash and near duplicates by feature cosine, and "
        "flags copies that cross the train/val split as leaks. Writes audit.html, audit.csv, audit.json and "
        "clean.csv (the unflagged images, for 'visiontune train --data clean.csv') into --out; never changes "
        "your files. Needs: pip install 'visiontune[audit]'.")
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder or CSV manifest, as for train")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="backbone whose features are audited: a torchvision name or timm:<name> "
                             "(or give --run)")
    parser.add_argument("--weights", default="DEFAULT", metavar="DEFAULT|none|PATH",
                        help="weights of --model: DEFAULT (pretrained), none (random init) or a file "
                             "(default: DEFAULT)")
    parser.add_argument("--run", "--run-dir", default=None, metavar="RUN",
                        help="a finished training run whose backbone gives the features (instead of --model)")
    parser.add_argument("--folds", type=_folds, default=5, metavar="K",
                        help="out-of-fold probes: each image is scored by a probe fitted on the other K-1 folds "
                             "(default: 5)")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="crop size in pixels (default: the weights' or the run's)")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                        help="images per forward pass (default: train's)")
    parser.add_argument("--val-split", type=float, default=None, metavar="F",
                        help="fraction of each class for validation when DIR has no val/ folder (default: 0.2)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the split and the folds (default: 0)")
    parser.add_argument("--out", metavar="AUDIT_DIR", default=None,
                        help="folder for the audit files (default: runs/audit-<timestamp>)")
    parser.set_defaults(func=run)


def _folds(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (each image is scored by probes fitted on the "
                                         f"others), got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from visiontune.training.audit import audit

    result = audit(args.data, args.model, weights=args.weights, run=args.run, folds=args.folds, out=args.out,
                   image_size=args.image_size, batch_size=args.batch_size, val_split=args.val_split,
                   seed=args.seed, device=args.device)
    counts = result.counts
    if result.leaks:
        print(f"LEAKAGE: {len(result.leaks)} validation image(s) have a copy in the training set; validation "
              "scores them after training on them:")
        for group in result.leaks[:LISTED]:
            print("  " + "  =  ".join(f"{result.rows[i].split}: {result.rows[i].path}" for i in group["members"]))
        if len(result.leaks) > LISTED:
            print(f"  ... and {len(result.leaks) - LISTED} more (audit.csv, issues 'leak')")
    print(f"{counts['images']} images ({counts['train']} train, {counts['val']} val), {len(result.classes)} classes"
          f"{' (features from the cache)' if result.feature_cache_hit else ''}")
    suspects = sorted(result.flagged("label"), key=lambda row: row.quality)
    print(f"likely label errors: {counts['label']}")
    for row in suspects[:LISTED]:
        print(f"  {row.path}: given {row.given}, suggested {row.suggested} (score {row.quality:.2f})")
    print(f"duplicates: {counts['duplicate']} images in {len(result.duplicates)} groups; outliers: {counts['outlier']}")
    if result.imbalanced:
        print(f"imbalanced classes (under a tenth of an even share): {', '.join(result.imbalanced)}")
    print(f"clean.csv keeps {counts['kept']} of {counts['images']} images")
    print(f"wrote {result.out}/audit.html, audit.csv, audit.json, clean.csv")
    return 0

"""``visiontune shard``: write a folder or CSV dataset into WebDataset shards plus its class list."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shard",
        help="write a folder or CSV into WebDataset shards (train-*.tar, val-*.tar, classes.json)",
        description="Split --data as training would (its val/ folder, CSV split column or --val-split) and write "
        "each part into tar shards of about --shard-size bytes, with the class list and each shard's sample count "
        "in classes.json, so the set can move to object storage and train with --data 'OUT/train-{000000..N}.tar'.",
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder or CSV manifest path,label")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards (new or empty)")
    parser.add_argument("--shard-size", default="1GB", metavar="SIZE", help="bytes per shard, e.g. 1GB, 200MB "
                        "(default: 1GB)")
    parser.add_argument("--val-split", type=float, default=None, metavar="F",
                        help="fraction held out for validation when --data has no val/ folder (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the shards' order (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.data.shard_writer import parse_size, write_shards

    summary = write_shards(args.data, args.out, shard_size=parse_size(args.shard_size), val_split=args.val_split,
                           seed=args.seed)
    train_shards = sum(1 for name in summary.counts if name.startswith("train-"))
    val_shards = sum(1 for name in summary.counts if name.startswith("val-"))
    print(f"wrote {summary.samples('train')} training samples in {train_shards} shard(s) and "
          f"{summary.samples('val')} validation samples in {val_shards} shard(s) to {summary.out} "
          f"({len(summary.classes)} classes)")
    for path, reason in summary.skipped[:5]:
        print(f"  skipped {path}: {reason}")
    print(f"train with: visiontune train --data '{summary.out}/train-{{000000..{max(0, train_shards - 1):06d}}}.tar' "
          "--model NAME")
    return 0

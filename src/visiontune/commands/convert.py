"""``visiontune convert CHECKPOINT --model NAME --out OUT.safetensors``: checkpoint surgery from the shell.

Builds the named model, loads the checkpoint into it with a matching strategy, prints the load
report, and writes the model's weights (a clean state dict under the model's own key names).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="load any checkpoint into a model (by name, order, mapping or automatically) and save it cleanly",
        description="Loads CHECKPOINT into a fresh MODEL, prints what was loaded, renamed, mismatched, missing or "
        "unused, and writes the result (.safetensors recommended). Exit status 2 when nothing fits; 1 with "
        "--strict when any model tensor was left out.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help=".safetensors, .pth, .pt, .bin or .ckpt file")
    parser.add_argument("--model", required=True, metavar="NAME", help="architecture, e.g. resnet18 or timm:efficientnet_b0")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="classes of the new head (default: the checkpoint's head size, else 1000)")
    parser.add_argument("--match", default="auto", metavar="auto|name|order|FILE",
                        help="how to pair tensors: auto (names, then structure; default), name, order, "
                        "or a YAML/JSON file with a {model_key: checkpoint_key} mapping or [pattern, replacement] rules")
    parser.add_argument("--source-model", metavar="NAME", default=None,
                        help="the architecture the checkpoint was saved from (e.g. regnet_y_400mf or timm:regnety_004): "
                        "with --match auto both models are traced and paired by data flow, not registration order")
    parser.add_argument("--out", metavar="OUT", help="where to write the weights (.safetensors or .pth); required unless --dry-run")
    parser.add_argument("--dry-run", action="store_true", help="print the report only; write nothing")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1, write nothing) if any model tensor is not filled")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint holds both")
    parser.add_argument("--allow-unsafe", action="store_true",
                        help="allow unpickling arbitrary objects (a whole saved model); only for files you trust")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.checkpoint import load_weights, save_weights
    from visiontune.atomic_io import same_file
    from visiontune.checkpoint.save import weights_path
    from visiontune.errors import ConfigError
    from visiontune.model.create import create_model

    if not args.dry_run and not args.out:
        raise ConfigError("convert needs --out OUT.safetensors (or --dry-run to only see the report).")
    # Checked first, before anything is read: the output must never replace the input (also not
    # through a symlink or hard link to it, nor as 'a' becoming 'a.safetensors').
    if args.out and not args.dry_run and same_file(weights_path(args.out), args.checkpoint):
        raise ConfigError(f"--out {args.out} is the input checkpoint {args.checkpoint} itself; converting would "
                          "replace the original. Write to another file, e.g. --out converted.safetensors")
    num_classes = args.num_classes if args.num_classes is not None else _checkpoint_classes(args)
    if num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {num_classes}.")
    model = create_model(args.model, num_classes=num_classes, weights=None)
    report = load_weights(model, args.checkpoint, match=args.match, dry_run=args.dry_run,
                          allow_unsafe=args.allow_unsafe, prefer_ema=args.ema, source_model=args.source_model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
    if args.strict and not report.complete:
        left_out = len(report.missing) + len(report.mismatched)
        print(f"visiontune convert: --strict: {left_out} model tensors were not filled from the checkpoint; nothing written.", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run: nothing written", file=sys.stderr)
        return 0
    path = save_weights(model, args.out)
    print(f"wrote {path} ({args.model}, {num_classes} classes)")
    return 0


def _checkpoint_classes(args: argparse.Namespace) -> int:
    """The class count of the checkpoint's own head, so a plain conversion keeps it."""
    from visiontune.checkpoint.summary import summarize_checkpoint

    head = summarize_checkpoint(args.checkpoint, allow_unsafe=args.allow_unsafe).head
    return head.num_classes if head else 1000

"""``visiontune inspect CHECKPOINT``: what a checkpoint file holds, without loading it into a model."""

from __future__ import annotations

import argparse
import json

_DEFAULT_ROWS = 40  # key/shape rows shown without --all


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what a checkpoint holds: format, wrapper, tensors, dtypes, keys and shapes, the head",
        description="Reads a checkpoint safely (never runs code from it unless --allow-unsafe) and prints its "
        "format, the wrapper keys, how many tensors and parameters, their dtypes, a key/shape table with "
        "numbered runs collapsed, and the classifier head it guesses.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help=".safetensors, .pth, .pt, .bin or .ckpt file")
    parser.add_argument("--all", action="store_true", help=f"show every key/shape row (default: the first {_DEFAULT_ROWS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--allow-unsafe", action="store_true",
                        help="allow unpickling arbitrary objects (a whole saved model); only for files you trust")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.checkpoint.summary import summarize_checkpoint

    summary = summarize_checkpoint(args.checkpoint, allow_unsafe=args.allow_unsafe)
    if args.json:
        print(json.dumps(_as_dict(summary), indent=2))
    else:
        print(format_summary(summary, max_rows=None if args.all else _DEFAULT_ROWS))
    return 0


def format_summary(summary, max_rows: int | None) -> str:
    wrapper = (
        f"dict with keys {', '.join(summary.wrapper_keys)}; weights under {summary.unwrapped_from!r}"
        if summary.unwrapped_from else "none (a bare state dict)"
    )
    dtypes = ", ".join(f"{name} x{count}" for name, count in summary.dtypes.most_common())
    head = (
        f"{summary.head.key} {summary.head.shape} -> {summary.head.num_classes} classes"
        if summary.head else "none found (no linear layer)"
    )
    lines = [
        f"checkpoint  {summary.path}",
        f"format      {summary.file_format}",
        f"wrapper     {wrapper}",
        f"tensors     {len(summary.shapes)} ({summary.num_parameters:,} parameters, {summary.num_buffer_values:,} buffer values)",
        f"dtypes      {dtypes or '-'}",
        f"head        {head} (a guess)",
        "",
    ]
    rows = summary.key_table()
    shown = rows if max_rows is None else rows[:max_rows]
    width = max((len(pattern) for pattern, _ in shown), default=3)
    lines.append(f"{'key':<{width}}  shape")
    lines += [f"{pattern:<{width}}  {shape}" for pattern, shape in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows (--all shows them)")
    return "\n".join(lines)


def _as_dict(summary) -> dict:
    return {
        "checkpoint": summary.path,
        "format": summary.file_format,
        "wrapper_keys": list(summary.wrapper_keys),
        "unwrapped_from": summary.unwrapped_from,
        "num_tensors": len(summary.shapes),
        "num_parameters": summary.num_parameters,
        "num_buffer_values": summary.num_buffer_values,
        "dtypes": dict(summary.dtypes),
        "head": {"key": summary.head.key, "shape": list(summary.head.shape), "num_classes": summary.head.num_classes} if summary.head else None,
        "tensors": {key: list(shape) for key, shape in summary.shapes.items()},
    }

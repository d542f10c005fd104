"""``visiontune models [PATTERN]``: list the architectures visiontune can build.

Listing is instant (registries and weight metadata only). timm parameter counts need a build on
the meta device, so they are counted only when few timm models are listed (or with ``--params``).
"""

from __future__ import annotations

import argparse
import json

MAX_TIMM_COUNTED = 25  # timm models counted without --params (each takes ~0.1-1 s on the meta device)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model architectures (torchvision and timm:) with parameter counts and head names",
        description="List the architectures create_model / --model accept: torchvision names as they "
        "are, timm names with the prefix 'timm:'. PATTERN is a substring ('vit') or a wildcard "
        "pattern ('resnet*', 'timm:convnext_*').",
    )
    parser.add_argument("pattern", nargs="?", default=None, metavar="PATTERN", help="substring or fnmatch pattern")
    parser.add_argument("--source", choices=("all", "torchvision", "timm"), default="all", help="which zoo to list")
    parser.add_argument("--params", action="store_true",
                        help=f"count timm parameters even when more than {MAX_TIMM_COUNTED} timm models match (slow)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.model.registry import count_parameters, list_models

    infos = [i for i in list_models(args.pattern) if args.source in ("all", i.source)]
    timm_infos = [i for i in infos if i.source == "timm"]
    if args.params or len(timm_infos) <= MAX_TIMM_COUNTED:
        for info in timm_infos:
            info.num_params = count_parameters(info.name)
    if args.json:
        print(json.dumps([_as_dict(i) for i in infos], indent=2))
        return 0
    if not infos:
        print(f"no model matches {args.pattern!r}; try a shorter pattern or a wildcard such as 'res*'")
        return 1
    rows = [(i.name, i.source, _millions(i.num_params), i.head or "?") for i in infos]
    header = ("name", "source", "params (M)", "head")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(4)]
    for row in [header] + rows:
        print("  ".join(cell.rjust(w) if c == 2 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if len(timm_infos) > MAX_TIMM_COUNTED and not args.params:
        print(f"({len(timm_infos)} timm models: parameters not counted; narrow PATTERN or pass --params)")
    return 0


def _millions(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.1f}"


def _as_dict(info) -> dict:
    return {"name": info.name, "source": info.source, "params": info.num_params, "head": info.head,
            "default_weights": info.default_weights}

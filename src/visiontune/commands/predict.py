"""``visiontune predict``: the top-K labels of image files with a trained run's model."""

from __future__ import annotations

import argparse
import json
import sys

from visiontune import distributed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with a trained run",
        description="Print the top-K labels and probabilities for each image. Folders are searched "
        "recursively for image files; unreadable images are reported on stderr and skipped.",
    )
    parser.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                        help="run folder written by 'visiontune train' (--run-dir: the same, for torchrun)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=3, metavar="K", help="labels to show per image (default: 3)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which weights (default: best)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per forward pass (default: 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: auto)")
    parser.add_argument("--json", action="store_true",
                        help='print a JSON list of {"path", "label", "score", "top_k": [{"label", "score"}]}')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.errors import ConfigError, DataError
    from visiontune.run.inference import collect_images, open_run, predict_images

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    images = collect_images(args.paths)  # before loading the model: a typo fails fast
    # Under torchrun each process classifies its share of the batches; rank 0 prints them all.
    with distributed.session():
        loaded = open_run(args.run, checkpoint=args.checkpoint, device=args.device)
        predictions, skipped = predict_images(loaded, images, top_k=args.top_k, batch_size=args.batch_size,
                                              across_processes=True)
    if not distributed.is_main_process():
        return 0
    for path, reason in skipped:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if not predictions:
        raise DataError(f"none of the {len(images)} image(s) could be read")
    if args.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
        return 0
    width = max(len(p.path) for p in predictions)
    for prediction in predictions:
        others = ", ".join(f"{label} {score:.1%}" for label, score in prediction.top_k[1:])
        print(f"{prediction.path:<{width}}  {prediction.label}  {prediction.score:.1%}" + (f"   ({others})" if others else ""))
    return 0

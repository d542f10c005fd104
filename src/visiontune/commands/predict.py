"""``visiontune predict``: the top-K labels of image files with a trained run's model."""

from __future__ import annotations

import argparse
import json
import sys

from visiontune.commands.common import add_backend_arguments, add_run_arguments, onnx_model_file, positive_int
from visiontune import distributed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with a trained run",
        description="Print the top-K labels and probabilities for each image. Folders are searched "
        "recursively for image files; unreadable images are reported on stderr and skipped.",
    )
    add_run_arguments(parser, batch_size=32, run_required=False)
    add_backend_arguments(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--top-k", type=positive_int, default=3, metavar="K",
                        help="labels to show per image (default: 3)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average each image's probabilities with its horizontal "
                        "flip's (two forward passes)")
    parser.add_argument("--json", action="store_true",
                        help='print a JSON list of {"path", "label", "score", "top_k": [{"label", "score"}]}; '
                        'multi-label runs add "labels": every label at or above its tuned threshold')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.errors import DataError
    from visiontune.run.loaded import load_run
    from visiontune.run.inference import collect_images, predict_images

    model_file = onnx_model_file(args)
    images = collect_images(args.paths)  # before loading the model: a typo fails fast
    if model_file is not None:  # ONNX Runtime on the exported file: no run folder, no torch model
        from visiontune.run.onnx_backend import OnnxClassifier

        predictions, skipped = OnnxClassifier(model_file).predict(images, top_k=args.top_k,
                                                                  batch_size=args.batch_size, tta=args.tta)
    else:
        # Under torchrun each process classifies its share of the batches; rank 0 prints them all.
        with distributed.session():
            loaded = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
            predictions, skipped = predict_images(loaded, images, top_k=args.top_k, batch_size=args.batch_size,
                                                  across_processes=True, tta=args.tta)
        if not distributed.is_main_process():
            return 0
    if not predictions:  # one line, naming the first file, rather than a list and then the error
        first = f"; the first, {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"none of the {len(images)} image(s) could be read{first}")
    for path, reason in skipped:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
        return 0
    width = max(len(p.path) for p in predictions)
    for prediction in predictions:
        if prediction.labels is not None:  # multi-label: the labels above threshold, then the top-k scores
            scores = ", ".join(f"{label} {score:.1%}" for label, score in prediction.top_k)
            print(f"{prediction.path:<{width}}  {'|'.join(prediction.labels) or '(none)'}   ({scores})")
            continue
        others = ", ".join(f"{label} {score:.1%}" for label, score in prediction.top_k[1:])
        print(f"{prediction.path:<{width}}  {prediction.label}  {prediction.score:.1%}" + (f"   ({others})" if others else ""))
    return 0

"""``visiontune explain``: class-activation overlays (Grad-CAM, EigenCAM, Score-CAM) of image files
with a trained run's model, for the predicted and, when known, the true class."""

from __future__ import annotations

import argparse
import sys

from visiontune.commands.common import add_run_arguments

METHOD_CHOICES = ("gradcam", "eigencam", "scorecam")  # visiontune.run.explain.METHODS, without importing torch


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show where the model looks: class-activation overlays of images",
        description="Write, for each image, the crop the model saw and heat-map overlays of the evidence for "
        "the predicted class and, when known, the true class (the image's folder if it is one of the run's "
        "classes, or --label). Needs the [explain] extra (grad-cam). Folders are searched recursively.",
    )
    add_run_arguments(parser, batch_size=16)
    parser.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays and explanations.json")
    parser.add_argument("--method", nargs="+", choices=METHOD_CHOICES, default=["gradcam", "eigencam"],
                        metavar="METHOD", help="gradcam (gradients), eigencam (gradient-free, one map per image), "
                        "scorecam (gradient-free, slow: one pass per feature channel); default: gradcam eigencam")
    parser.add_argument("--label", metavar="CLASS", help="the true class of every image given")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.run.explain import explain

    entries, skipped = explain(args.run, args.paths, args.out, methods=args.method, label=args.label,
                               checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size)
    for item in skipped:
        print(f"skipped unreadable image {item['path']}: {item['reason']}", file=sys.stderr)
    for entry in entries:
        truth = f"  (true: {entry['label']})" if entry["label"] is not None else ""
        print(f"{entry['path']}  {entry['predicted']}  {entry['confidence']:.1%}{truth}")
    print(f"wrote {sum(len(entry['files']) for entry in entries)} images and explanations.json to {args.out}")
    return 0

"""``visiontune evaluate``: a finished run's metrics on any labelled image folder.

Under ``torchrun ... -m visiontune evaluate --run-dir RUN --data DIR`` the processes share the
work and rank 0 prints the metrics of the whole folder (the same numbers as one process)."""

from __future__ import annotations

import argparse
import json
import sys

from visiontune.commands.common import add_backend_arguments, add_run_arguments, onnx_model_file
from visiontune import distributed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a trained run on a labelled image folder",
        description="Accuracy, top-5, macro-F1, loss and per-class precision/recall of a run's model on "
        "DIR/<class>/<image> (or DIR/val/<class>/... when DIR is a dataset root, or a CSV manifest).",
    )
    add_run_arguments(parser, batch_size=64, run_required=False)
    add_backend_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR", help="labelled folder of class sub-folders, or a CSV")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average each image's probabilities with its horizontal "
                        "flip's (two forward passes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.run.loaded import load_run
    from visiontune.run.inference import evaluate_run

    model_file = onnx_model_file(args)
    if model_file is not None:  # ONNX Runtime on the exported file: no run folder, no torch model
        from visiontune.run.onnx_backend import OnnxClassifier
        from visiontune.run.onnx_evaluate import evaluate_onnx

        evaluation = evaluate_onnx(OnnxClassifier(model_file), args.data, batch_size=args.batch_size, tta=args.tta)
        source, weights = model_file, "onnx"
    else:
        # Under torchrun each process evaluates its share of the batches; all get the summed metrics.
        with distributed.session():
            loaded = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
            evaluation = evaluate_run(loaded, args.data, batch_size=args.batch_size, across_processes=True,
                                      tta=args.tta)
        if not distributed.is_main_process():
            return 0
        source, weights = args.run, args.checkpoint
    if args.json:
        where = {"model_file": str(model_file), "backend": "onnx"} if model_file is not None else \
            {"run": str(args.run), "checkpoint": args.checkpoint}
        result = {**where, "tta": args.tta, **evaluation.to_dict()}
        print(json.dumps(result, indent=2))
    else:
        print(format_evaluation(evaluation, source, weights, tta=args.tta))
    for path, reason in evaluation.skipped:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    return 0


def format_evaluation(evaluation, run_dir, checkpoint: str, tta: bool = False) -> str:
    """The summary lines and the per-class table, for people."""
    metrics = evaluation.metrics
    how = ("ONNX Runtime" if checkpoint == "onnx" else f"{checkpoint} checkpoint") + (", flip TTA" if tta else "")
    if metrics.get("task") == "multilabel":
        return _format_multilabel(evaluation, f"run {run_dir} ({how}) on {evaluation.data}")
    lines = [
        f"{'model' if checkpoint == 'onnx' else 'run'} {run_dir} ({how}) on {evaluation.data}: {metrics['num_images']} images",
        f"  accuracy  {metrics['accuracy']:.2%}",
    ]
    if metrics["top5"] is not None:
        lines.append(f"  top-5     {metrics['top5']:.2%}")
    lines += [f"  macro-F1  {metrics['macro_f1']:.4f}", f"  loss      {metrics['loss']:.4f}", ""]
    width = max(5, *(len(name) for name in metrics["per_class"]))
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    for name, row in metrics["per_class"].items():
        lines.append(
            f"  {name:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}  {row['support']:>7d}"
        )
    if evaluation.skipped:
        lines.append(f"\n{len(evaluation.skipped)} unreadable image(s) skipped (listed on stderr)")
    return "\n".join(lines)


def _format_multilabel(evaluation, title: str) -> str:
    metrics = evaluation.metrics
    lines = [f"{title}: {metrics['num_images']} images",
             f"  mAP          {metrics['mAP']:.4f}",
             f"  micro-F1     {metrics['micro_f1']:.4f}",
             f"  macro-F1     {metrics['macro_f1']:.4f}",
             f"  exact match  {metrics['accuracy']:.2%}",
             f"  loss         {metrics['loss']:.4f}", ""]
    width = max(5, *(len(name) for name in metrics["per_class"]))
    lines.append(f"  {'class':<{width}}     AP  threshold  precision  recall     f1  support")
    for name, row in metrics["per_class"].items():
        ap = "   n/a" if row["ap"] is None else f"{row['ap']:>6.3f}"
        lines.append(f"  {name:<{width}}  {ap}  {row['threshold']:>9.3f}  {row['precision']:>9.3f}  "
                     f"{row['recall']:>6.3f}  {row['f1']:>5.3f}  {row['support']:>7d}")
    if evaluation.skipped:
        lines.append(f"\n{len(evaluation.skipped)} unreadable image(s) skipped (listed on stderr)")
    return "\n".join(lines)

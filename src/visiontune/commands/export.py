"""``visiontune export``: a run's model as ONNX or TorchScript, verified against PyTorch; with
``--quantize int8|fp16``, a smaller ONNX file judged by its accuracy on the run's validation images."""

from __future__ import annotations

import argparse

from visiontune.commands.common import add_run_arguments, positive_int

QUANTIZE_MODES = ("int8", "fp16")  # visiontune.run.quantize.QUANTIZE_MODES (not imported: --help stays fast)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained run to ONNX or TorchScript (verified against PyTorch)",
        description="Write the run's whole classifier (head included; input: the normalised image batch, "
        "dynamic batch size) to FILE and its preprocessing and class names to FILE.json, then run FILE with "
        "its own runtime (onnxruntime / torch.jit.load) at batch sizes 1 and 3 and compare with PyTorch. "
        "With --quantize, the ONNX file is converted to int8 (static, calibrated on the run's training images) "
        "or fp16 and its top-1 accuracy on the run's validation images is compared with PyTorch's.",
    )
    add_run_arguments(parser)
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    parser.add_argument("--out", metavar="FILE",
                        help="where to write (default: RUN/model.onnx, RUN/model.pt, or RUN/model.int8.onnx)")
    parser.add_argument("--tolerance", type=float, default=1e-3, metavar="T",
                        help="largest accepted |exported - PyTorch| of any logit (default: 1e-3)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="ONNX only: int8 (static, per-channel weights, QDQ) or fp16 weights and activations")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                        help="with --quantize: fail (the file kept as FILE.rejected) when top-1 accuracy on the "
                        "run's validation images drops by more percentage points than this (default: 1)")
    parser.add_argument("--calibration-images", type=positive_int, default=128, metavar="N",
                        help="with --quantize int8: training images (a seeded sample) that set the ranges (default: 128)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.errors import ConfigError
    from visiontune.run.export import export_run

    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be positive, got {args.tolerance}")
    if args.quantize:
        return _run_quantized(args)
    result = export_run(args.run, args.format, out=args.out, checkpoint=args.checkpoint, tolerance=args.tolerance)
    check = result.verification
    sizes = ", ".join(f"batch {size}: {diff:.2e}" for size, diff in check.per_batch_size.items())
    print(f"exported {result.format} model to {result.path}")
    print(f"preprocessing and classes in {result.metadata_path}")
    allowed = f"{check.tolerance:g}" + (f" x largest logit {check.logit_scale:.3g}" if check.logit_scale > 1 else "")
    print(f"verified on {check.inputs}: max |difference| from PyTorch {check.max_abs_diff:.2e} "
          f"(tolerance {allowed}; {sizes})")
    return 0


def _run_quantized(args: argparse.Namespace) -> int:
    from visiontune.errors import ConfigError
    from visiontune.run.quantize import quantize_run

    if args.format != "onnx":
        raise ConfigError(f"--quantize {args.quantize} makes an ONNX file; drop --format {args.format}")
    if not args.max_accuracy_drop >= 0:
        raise ConfigError(f"--max-accuracy-drop must be percentage points >= 0, got {args.max_accuracy_drop}")
    result = quantize_run(args.run, args.quantize, out=args.out, checkpoint=args.checkpoint,
                          max_accuracy_drop=args.max_accuracy_drop, calibration_images=args.calibration_images,
                          tolerance=args.tolerance)
    check = result.check
    fp32, converted = check.file_bytes["fp32"], check.file_bytes[args.quantize]
    print(f"exported {args.quantize} ONNX model to {result.path}")
    print(f"preprocessing and classes in {result.metadata_path}")
    print(f"size: {converted / 1e6:.2f} MB ({args.quantize}) vs {fp32 / 1e6:.2f} MB (fp32), {fp32 / converted:.2f}x smaller")
    print(f"top-1 on {check.num_images} validation images: {check.exported_accuracy:.2%} ({args.quantize}) vs "
          f"{check.pytorch_accuracy:.2%} (PyTorch), drop {check.accuracy_drop:.2f} points (allowed "
          f"{check.max_accuracy_drop:g}); predictions agree on {check.agreement:.2%}")
    return 0

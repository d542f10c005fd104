"""``visiontune export``: a run's model as ONNX or TorchScript, verified against PyTorch."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained run to ONNX or TorchScript (verified against PyTorch)",
        description="Write the run's whole classifier (head included; input: the normalised image batch, "
        "dynamic batch size) to FILE and its preprocessing and class names to FILE.json, then run FILE with "
        "its own runtime (onnxruntime / torch.jit.load) at batch sizes 1 and 3 and compare with PyTorch.",
    )
    parser.add_argument("--run", "--run-dir", required=True, metavar="RUN",
                        help="run folder written by 'visiontune train' (--run-dir: the same, for torchrun)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    parser.add_argument("--out", metavar="FILE", help="where to write (default: RUN/model.onnx or RUN/model.pt)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which weights (default: best)")
    parser.add_argument("--tolerance", type=float, default=1e-3, metavar="T",
                        help="largest accepted |exported - PyTorch| of any logit (default: 1e-3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.errors import ConfigError
    from visiontune.run.export import export_run

    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be positive, got {args.tolerance}")
    result = export_run(args.run, args.format, out=args.out, checkpoint=args.checkpoint, tolerance=args.tolerance)
    check = result.verification
    sizes = ", ".join(f"batch {size}: {diff:.2e}" for size, diff in check.per_batch_size.items())
    print(f"exported {result.format} model to {result.path}")
    print(f"preprocessing and classes in {result.metadata_path}")
    allowed = f"{check.tolerance:g}" + (f" x largest logit {check.logit_scale:.3g}" if check.logit_scale > 1 else "")
    print(f"verified on {check.inputs}: max |difference| from PyTorch {check.max_abs_diff:.2e} "
          f"(tolerance {allowed}; {sizes})")
    return 0

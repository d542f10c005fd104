"""``visiontune demo``: the README's first command. Fine-tunes ImageNet EfficientNet-Lite0 on
handwritten digits, offline, in a few minutes on a laptop CPU, and shows every step."""

from __future__ import annotations

import argparse
import shlex
import time

from visiontune.demo import DemoOptions


def register(subparsers) -> None:
    defaults = DemoOptions()
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune a real ImageNet model on handwritten digits, offline (a few minutes on a CPU)",
        description="Writes scikit-learn's handwritten digits as an image folder, loads ImageNet EfficientNet-Lite0 "
        "weights shipped in a Python package, fine-tunes with the gradual strategy and leaves a run folder "
        "to try 'visiontune predict' and 'visiontune evaluate' on. Nothing is downloaded.",
    )
    parser.add_argument("--out", type=str, default=str(defaults.out), metavar="DIR",
                        help=f"folder for the images and the run (default: {defaults.out})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                        help=f"epochs in total, the first trains only the head (default: {defaults.epochs})")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="images per digit (default: all, about 180); fewer for a quicker, rougher run")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, metavar="PX",
                        help=f"crop size fed to the network (default: {defaults.image_size})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device,
                        help=f"where to train (default: {defaults.device})")
    parser.add_argument("--quiet", action="store_true", help="print only the final accuracy and the run folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visiontune.commands.train import ConsoleReporter, final_table
    from visiontune.demo import run_demo
    from visiontune.errors import ConfigError

    if args.per_class is not None and args.per_class < 2:
        raise ConfigError(f"--per-class must be at least 2 (one for val, one for train), got {args.per_class}")
    options = DemoOptions(out=args.out, epochs=args.epochs, per_class=args.per_class, image_size=args.image_size,
                          device=args.device)
    started = time.perf_counter()
    reporter = ConsoleReporter(quiet=args.quiet)
    try:
        result = run_demo(options, reporter=reporter, announce=(lambda _: None) if args.quiet else _step)
    finally:
        reporter.close()
    seconds = time.perf_counter() - started
    if not args.quiet:
        print()
        print(final_table(result.train_result))
    run_dir = result.run_dir
    print(f"\nvalidation accuracy {result.accuracy:.2%} on {result.data.val_images} digits "
          f"({seconds:.0f} s); run folder: {run_dir}")
    if not args.quiet:
        print(f"  curves:    {run_dir / 'curves.png'}\n  confusion: {run_dir / 'confusion.png'}\n"
              f"  metrics:   {run_dir / 'metrics.csv'}, {run_dir / 'report.json'}")
    print("\nTry it on an image:")
    print(f"  visiontune predict --run {shlex.quote(str(run_dir))} {shlex.quote(str(result.data.example))}")
    print(f"  visiontune evaluate --run {shlex.quote(str(run_dir))} --data {shlex.quote(str(result.data.root))}")
    return 0


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)

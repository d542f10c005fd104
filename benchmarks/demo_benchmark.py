"""Does `visiontune demo` meet its promise? At least 95% validation accuracy within 3 minutes of
wall time on a 2-core CPU (issue 4). Runs the demo exactly as `visiontune demo` does, in this
process, and prints wall time and accuracy against the targets; writes the numbers as JSON.

    python benchmarks/demo_benchmark.py [--out DIR] [--json FILE] [--threads 2] [--epochs N]

Exit status 0 when both targets are met, 1 otherwise. Not a test: wall time depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

TARGET_ACCURACY = 0.95  # validation accuracy, 0..1
TARGET_SECONDS = 180.0  # wall time of the whole demo, from the command to the printed result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="demo folder (default: a temporary folder)")
    parser.add_argument("--json", default=str(Path(__file__).with_name("demo_benchmark.json")), help="where to write the results")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads torch may use (the target is for 2)")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from visiontune.cli import main as cli

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="visiontune-demo-bench-")) / "demo"
    argv = ["demo", "--out", str(out), "--device", "cpu"] + (["--epochs", str(args.epochs)] if args.epochs else [])
    status = cli(argv)
    seconds = time.perf_counter() - started
    if status != 0:
        print(f"demo failed with exit status {status}", file=sys.stderr)
        return 1
    report = json.loads((out / "run" / "report.json").read_text())
    accuracy = float(report["best_val_accuracy"])
    results = {
        "wall_seconds": round(seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "val_accuracy": accuracy,
        "target_accuracy": TARGET_ACCURACY,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "epochs": report.get("epochs_completed"),
        "run_dir": str(out / "run"),
        "met": seconds <= TARGET_SECONDS and accuracy >= TARGET_ACCURACY,
    }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"demo benchmark ({args.threads} threads, {os.cpu_count()} CPUs visible)")
    print(f"  wall time     {seconds:7.1f} s   target <= {TARGET_SECONDS:.0f} s   "
          f"{'ok' if seconds <= TARGET_SECONDS else 'MISSED'} ({seconds / TARGET_SECONDS:.2f} of the budget)")
    print(f"  val accuracy  {accuracy:7.2%}     target >= {TARGET_ACCURACY:.0%}     "
          f"{'ok' if accuracy >= TARGET_ACCURACY else 'MISSED'}")
    print(f"  results written to {args.json}")
    return 0 if results["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

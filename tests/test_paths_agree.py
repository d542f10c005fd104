"""One model, one set of numbers: the run's own validation, ``evaluate``, ``predict``,
``load_run().predict`` and the exported ONNX / TorchScript file with its JSON preprocessing.

The files are what real folders hold and what made the paths disagree: RGBA with varying alpha,
palette images with a transparent colour, grey ('L', 'LA', 16-bit 'I;16') and RGB, at sizes whose
resize and centre crop are not trivial. The run trains a linear probe (sane logits, loss near
ln 3) at the default precision, which is bf16 autocast on CPUs with AVX-512 BF16 or AMX: the
report must still describe the float32 model that the other paths run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune import load_run
from visiontune.cli import main
from visiontune.data import (
    ImageDataset,
    InMemoryDataset,
    build_eval_transform,
    decode_to_uint8,
    discover,
    load_image,
)
from visiontune.model.preprocessing import Preprocessing
from visiontune.run.export import load_exported

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401

    HAVE_ONNX = True
except ImportError:
    HAVE_ONNX = False

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
MODES = ("RGBA", "P", "L", "LA", "I;16", "RGB")
SIZES = ((70, 50), (50, 90), (64, 64), (101, 77), (40, 120), (83, 83), (97, 61))
RECIPE = ["--model", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "8", "--workers", "0",
          "--seed", "0", "--device", "cpu", "--strategy", "linear-probe", "--epochs", "2",
          "--lr", "0.001", "--quiet"]  # the head learns at 10x --lr

# Probabilities: val_predictions.csv stores 6 decimals (rounding: 5e-7). Beyond that the paths may
# differ only by float32 kernel rounding (channels_last at batch 8 in training, contiguous at
# batch 64/32 after it, onnxruntime's own kernels): ~1e-6 of the largest logit (4e-7 measured),
# and a softmax probability moves by at most half the largest logit change. So 2e-6 x the largest
# logit, never below the bar of 1e-5 (these logits are below ~5).
CSV_ROUNDING = 5e-7


def save_mixed_mode_png(path: Path, color: tuple[int, int, int], index: int, rng: np.random.Generator) -> None:
    width, height = SIZES[index % len(SIZES)]
    pixels = np.clip(np.array(color, np.int16) + rng.integers(-60, 61, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    alpha = Image.fromarray(rng.integers(0, 256, (height, width)).astype(np.uint8), "L")
    mode = MODES[index % len(MODES)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(alpha)
    elif mode == "P":  # palette with one transparent entry: those pixels become the background
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, transparency=3)
        return
    elif mode == "LA":
        image = image.convert("LA")
        image.putalpha(alpha)
    elif mode == "L":
        image = image.convert("L")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L")).astype("<u2") * 257)
        assert image.mode == "I;16"
    image.save(path)


def make_mixed_mode_folder(root: Path, train: int = 8, val: int = 6) -> Path:
    rng, index = np.random.default_rng(0), 0
    for split, count in (("train", train), ("val", val)):
        for name, color in COLORS.items():
            for number in range(count):
                save_mixed_mode_png(root / split / name / f"{name}_{number}.png", color, index, rng)
                index += 1
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    data = make_mixed_mode_folder(root / "data")
    run_dir = root / "run"
    assert main(["train", "--data", str(data), *RECIPE, "--out", str(run_dir)]) == 0
    return data, run_dir


def cli_json(argv: list[str]):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def val_rows(run_dir: Path) -> dict[str, dict]:
    with open(run_dir / "val_predictions.csv", newline="") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def logits_of(run, paths: list[Path]) -> torch.Tensor:
    transform = build_eval_transform(run.preprocessing)
    with torch.no_grad():
        return run.model(torch.stack([transform(load_image(path)) for path in paths]))


def probability_tolerance(largest_logit: float) -> float:
    return max(1e-5, 2e-6 * largest_logit)


def test_the_folder_holds_every_mode(tmp_path):
    data = make_mixed_mode_folder(tmp_path / "data", train=2, val=2)
    modes = set()
    for path in data.rglob("*.png"):
        with Image.open(path) as image:
            modes.add(image.mode + ("+transparency" if "transparency" in image.info else ""))
    assert {"RGBA", "P+transparency", "L", "LA", "I;16", "RGB"} <= modes


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_decode_once_files_and_inference_feed_the_model_the_same_tensors(tmp_path, interpolation):
    data = make_mixed_mode_folder(tmp_path / "data", train=2, val=4)
    samples = discover(data).val
    preprocessing = Preprocessing(interpolation=interpolation).with_image_size(64)  # resize 73, crop 64
    transform = build_eval_transform(preprocessing)
    decoded = decode_to_uint8(samples, preprocessing.resize_size, crop_size=preprocessing.crop_size,
                              interpolation=interpolation)
    in_memory, from_files = InMemoryDataset.from_decoded(decoded, transform), ImageDataset(samples, transform)
    for index, sample in enumerate(samples):
        expected = transform(load_image(sample.path))  # what evaluate, predict and export compute
        assert expected.shape == (3, 64, 64) and expected.dtype == torch.float32
        assert torch.equal(in_memory[index][0], expected), sample.path  # one implementation: bit for bit
        assert torch.equal(from_files[index][0], expected), sample.path


@pytest.mark.slow
def test_evaluate_gives_the_runs_own_validation_metrics(trained):
    data, run_dir = trained
    report = json.loads((run_dir / "report.json").read_text())
    final = report["final"]
    result = cli_json(["evaluate", "--run", str(run_dir), "--data", str(data), "--json"])
    assert result["num_images"] == final["num_images"] == 18
    assert result["accuracy"] == final["accuracy"] and result["confusion"] == final["confusion"]
    run = load_run(run_dir)
    largest = float(logits_of(run, sorted((data / "val").rglob("*.png"))).abs().max())
    assert largest < 50, "a linear probe of a random backbone should have moderate logits"
    # Cross-entropy moves by at most 2 x the largest logit change, ~1e-6 of the largest logit (see
    # probability_tolerance); 1e-5 of it leaves 10x for other kernels and thread counts.
    assert abs(result["loss"] - final["loss"]) <= 2 * 1e-5 * max(1.0, largest)
    assert math.isfinite(final["loss"]) and 0.5 < final["loss"] < 3.0


@pytest.mark.slow
def test_val_predictions_equal_predict_and_load_run_predict(trained):
    data, run_dir = trained
    rows = val_rows(run_dir)
    paths = sorted((data / "val").rglob("*.png"))
    assert sorted(rows) == sorted(path.name for path in paths)
    run = load_run(run_dir)
    tolerance = probability_tolerance(float(logits_of(run, paths).abs().max()))
    cli = {Path(item["path"]).name: item for item in
           cli_json(["predict", "--run", str(run_dir), "--json", "--top-k", "3", str(data / "val")])}
    api, skipped = run.predict(paths, top_k=3)
    assert skipped == [] and len(api) == len(paths) == len(cli)
    for prediction in api:
        name = Path(prediction.path).name
        row, from_cli = rows[name], cli[name]
        assert prediction.label == from_cli["label"] == row["predicted"], name
        assert abs(prediction.score - float(row["confidence"])) <= tolerance + CSV_ROUNDING, name
        for (label, score), other in zip(prediction.top_k, from_cli["top_k"]):
            assert label == other["label"] and abs(score - other["score"]) <= tolerance, name


@pytest.mark.slow
@pytest.mark.parametrize("format", [
    pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason="pip install visiontune[export]")),
    "torchscript",
])
def test_the_exported_file_with_its_json_preprocessing_gives_the_same_probabilities(trained, tmp_path, format):
    data, run_dir = trained
    out = tmp_path / f"model.{format}"
    assert main(["export", "--run", str(run_dir), "--format", format, "--out", str(out)]) == 0
    metadata = json.loads(Path(f"{out}.json").read_text())
    assert metadata["preprocessing"]["background"] == [255, 255, 255] and "alpha" in metadata["preprocessing"]["decode"]
    # A deployer's pipeline: the JSON's preprocessing, decoded as its "decode" entry says.
    transform = build_eval_transform(Preprocessing.from_dict(metadata["preprocessing"]))
    paths = sorted((data / "val").rglob("*.png"))
    batch = torch.stack([transform(load_image(path, tuple(metadata["preprocessing"]["background"]))) for path in paths])
    probabilities = load_exported(out, format)(batch).float().softmax(dim=1)
    run = load_run(run_dir)
    tolerance = probability_tolerance(float(logits_of(run, paths).abs().max()))
    rows = val_rows(run_dir)
    api = {Path(p.path).name: p for p in run.predict(paths, top_k=len(metadata["classes"]))[0]}
    for path, row_probabilities in zip(paths, probabilities):
        expected = dict(api[path.name].top_k)
        exported = dict(zip(metadata["classes"], row_probabilities.tolist()))
        assert max(abs(exported[label] - expected[label]) for label in expected) <= tolerance, path.name
        assert abs(max(exported.values()) - float(rows[path.name]["confidence"])) <= tolerance + CSV_ROUNDING

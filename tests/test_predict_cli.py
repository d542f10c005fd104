"""`visiontune evaluate` and `visiontune predict` on a tiny trained run (resnet18, weights=None, 32 px).

The run is trained once for the module; its own final validation (report.json and
val_predictions.csv, written by the training engine) is the reference the commands must agree with.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import make_image, make_image_folder
from visiontune import load_run
from visiontune.cli import main
from visiontune.data import build_eval_transform, load_image

TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--seed", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_image_folder(root / "data", per_class=6, val_per_class=3)
    run_dir = root / "run"
    assert main(["train", "--data", str(data), *TINY, "--strategy", "full", "--epochs", "1", "--lr", "0.003",
                 "--out", str(run_dir)]) == 0
    return data, run_dir


def run_json(capsys, argv):
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out), captured.err


def largest_logit(run_dir: Path, folder: Path) -> float:
    """max |logit| of the run's model over the images in ``folder``, at least 1."""
    run = load_run(run_dir)
    transform = build_eval_transform(run.preprocessing)
    images = torch.stack([transform(load_image(path)) for path in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        return max(1.0, float(run.model(images).abs().max()))


def val_predictions(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "val_predictions.csv", newline="") as handle:
        return {Path(row["path"]).name: row["predicted"] for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_evaluate_json_agrees_with_the_runs_own_validation(trained, capsys):
    data, run_dir = trained
    report = json.loads((run_dir / "report.json").read_text())["final"]
    # A dataset root is evaluated on its val/ folder.
    result, _ = run_json(capsys, ["evaluate", "--run", str(run_dir), "--data", str(data), "--json"])
    assert Path(result["data"]) == (data / "val").absolute()
    assert result["num_images"] == 9
    assert result["accuracy"] == pytest.approx(report["accuracy"])
    # Both are float32 on the same pixels (report.json's final pass no longer runs under the training's
    # bf16 autocast); training's model is channels_last at batch 8, evaluate's contiguous at batch
    # 64, so oneDNN's kernels round differently. Cross-entropy moves by at most 2 x the largest
    # logit change, and float32 kernels agree to ~1e-6 of the largest logit (4e-7 measured); this
    # 1-epoch random model has logits near 100, so the loss's own size would be the wrong scale.
    assert abs(result["loss"] - report["loss"]) <= 2 * 1e-5 * largest_logit(run_dir, data / "val")
    assert result["confusion"] == report["confusion"]
    assert {name: row["support"] for name, row in result["per_class"].items()} == {"blue": 3, "green": 3, "red": 3}
    assert 0.0 <= result["accuracy"] <= 1.0 and result["skipped"] == []


def test_evaluate_a_class_folder_subset_and_print_a_table(trained, capsys):
    data, run_dir = trained
    subset = data.parent / "only_red"
    for index in range(2):
        make_image(subset / "red" / f"r{index}.png", (220, 30, 30), noise_seed=100 + index)
    result, _ = run_json(capsys, ["evaluate", "--run", str(run_dir), "--data", str(subset), "--json",
                                  "--batch-size", "1"])
    assert result["num_images"] == 2 and result["per_class"]["red"]["support"] == 2
    assert result["per_class"]["blue"]["support"] == 0

    assert main(["evaluate", "--run", str(run_dir), "--data", str(data / "val")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out and "9 images" in out
    assert all(name in out for name in ("blue", "green", "red"))


def test_predict_json_matches_the_runs_validation_predictions(trained, capsys, tmp_path):
    data, run_dir = trained
    folder = tmp_path / "images"
    for image in (data / "val").rglob("*.png"):
        target = folder / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("not an image, ignored")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    results, err = run_json(capsys, ["predict", "--run", str(run_dir), "--json", "--top-k", "2", str(folder)])
    assert "broken.png" in err and "skipped" in err  # reported, not fatal
    assert len(results) == 9
    expected = val_predictions(run_dir)
    for item in results:
        assert set(item) == {"path", "label", "score", "top_k"}
        assert item["label"] == expected[Path(item["path"]).name]
        scores = [entry["score"] for entry in item["top_k"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and 0.0 < sum(scores) <= 1.0 + 1e-6
        assert item["top_k"][0] == {"label": item["label"], "score": item["score"]}


def test_predict_single_file_plain_output_and_top_k_capped(trained, capsys):
    data, run_dir = trained
    image = sorted((data / "val" / "red").glob("*.png"))[0]
    results, _ = run_json(capsys, ["predict", "--run", str(run_dir), "--json", "--top-k", "10", "--checkpoint",
                                   "last", str(image)])
    assert len(results) == 1 and len(results[0]["top_k"]) == 3  # only 3 classes exist
    assert sum(entry["score"] for entry in results[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)

    assert main(["predict", "--run", str(run_dir), str(image)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(image)) and results[0]["label"] in line and "%" in line


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda data, run, tmp: ["predict", "--run", str(tmp / "nope"), str(data)], "does not exist"),
        (lambda data, run, tmp: ["predict", "--run", str(data), str(data)], "not a visiontune run folder"),
        (lambda data, run, tmp: ["predict", "--run", str(run), str(tmp / "missing.png")], "does not exist"),
        (lambda data, run, tmp: ["predict", "--run", str(run), str(tmp)], "no images found"),
        (lambda data, run, tmp: ["evaluate", "--run", str(tmp), "--data", str(data)], "not a visiontune run folder"),
        (lambda data, run, tmp: ["evaluate", "--run", str(run), "--data", str(tmp / "nope")], "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(trained, capsys, tmp_path, make_argv, message):
    data, run_dir = trained
    capsys.readouterr()
    assert main(make_argv(data, run_dir, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_evaluate_rejects_a_class_the_model_does_not_know(trained, capsys, tmp_path):
    data, run_dir = trained
    make_image(tmp_path / "purple" / "p.png", (150, 20, 150))
    assert main(["evaluate", "--run", str(run_dir), "--data", str(tmp_path)]) == 2
    assert "purple" in capsys.readouterr().err

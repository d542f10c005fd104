"""A small trained run with its float32 ONNX export, shared by tests/test_quantize.py and
tests/test_onnx_backend.py (built once per session, in one folder both find)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_image_folder

from visiontune.cli import main

# resnet18 from random weights at 32 px, two epochs: ~2/3 of the validation images right (a model that
# answers every image alike gets 1/3), enough for the rejection test to see a broken int8 model lose points.
TRAIN = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
         "--seed", "0", "--device", "cpu", "--quiet", "--strategy", "full", "--epochs", "2", "--lr", "0.003"]


def deploy_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(data, run_dir, run_dir/model.onnx)``."""
    root = tmp_path_factory.getbasetemp() / "deploy_trained_run"
    data, run_dir = root / "data", root / "run"
    if not (run_dir / "report.json").is_file():
        make_image_folder(data, per_class=6, val_per_class=3)
        assert main(["train", "--data", str(data), *TRAIN, "--out", str(run_dir)]) == 0
    model_file = run_dir / "model.onnx"
    if not Path(f"{model_file}.json").is_file():
        assert main(["export", "--run", str(run_dir), "--format", "onnx"]) == 0
    return data, run_dir, model_file

"""export --quantize int8|fp16: the converted file, its accuracy against PyTorch, and the rejection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deploy_run import deploy_run

from visiontune.cli import main
from visiontune.run import quantize
from visiontune.run.quantize import AccuracyCheck, quantize_onnx

onnx = pytest.importorskip("onnx", reason="pip install visiontune[export] (make test installs it)")
pytest.importorskip("onnxruntime", reason="pip install visiontune[export] (make test installs it)")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return deploy_run(tmp_path_factory)


def sidecar(path: Path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


@pytest.mark.slow
def test_int8_export_reports_accuracy_agreement_and_sizes(trained, tmp_path, capsys):
    _, run_dir, model_file = trained
    out = tmp_path / "model.int8.onnx"

    assert main(["export", "--run", str(run_dir), "--quantize", "int8", "--out", str(out),
                 "--calibration-images", "12"]) == 0

    printed = capsys.readouterr().out
    assert "top-1 on 9 validation images" in printed and "smaller" in printed and "agree on" in printed
    meta = sidecar(out)
    check = meta["verification"]
    assert meta["quantization"]["mode"] == "int8" and meta["quantization"]["format"] == "QDQ"
    assert meta["quantization"]["calibration"] == {"images": 12, "seed": 0}
    assert check["passed"] and check["num_images"] == 9 and 0 <= check["agreement"] <= 1
    assert check["accuracy_drop_points"] == pytest.approx((check["pytorch_accuracy"] - check["exported_accuracy"]) * 100)
    # int8 weights: resnet18's 11M parameters take a quarter of their float32 bytes, plus scales.
    assert check["file_bytes"]["int8"] < 0.35 * check["file_bytes"]["fp32"]
    assert meta["classes"] == ["blue", "green", "red"] and meta["preprocessing"]["crop_size"] == 32
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Per-channel weights: some DequantizeLinear has a scale with one entry per output channel.
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    scales = [initializers[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[1] in initializers]
    assert any(len(scale.dims) == 1 and scale.dims[0] > 1 for scale in scales)
    # The int8 file runs through the ONNX backend like any export.
    assert main(["evaluate", "--backend", "onnx", "--model-file", str(out), "--data", str(run_dir.parent / "data")]) == 0


def test_fp16_conversion_halves_the_file_and_keeps_accuracy(trained, tmp_path):
    data, run_dir, model_file = trained
    out = quantize_onnx(model_file, tmp_path / "model.fp16.onnx", "fp16")
    run = quantize.load_run(run_dir)
    _, images, labels = quantize.run_images(run, 1, 0)

    check = quantize.compare_accuracy(run.model, out, images, labels, file_bytes={
        "fp32": model_file.stat().st_size, "fp16": out.stat().st_size})

    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers still feed float32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert check.file_bytes["fp16"] < 0.6 * check.file_bytes["fp32"]
    # fp16 keeps ~3 significant digits; on these well-separated colours no prediction changes.
    assert check.passed and check.agreement == 1.0 and check.num_images == 9


@pytest.mark.slow
def test_a_broken_calibration_is_rejected_and_kept_aside(trained, tmp_path, monkeypatch, capsys):
    _, run_dir, _ = trained
    real_images = quantize.run_images

    def zero_calibration(run, count, seed):
        calibration, images, labels = real_images(run, count, seed)
        # Ranges calibrated on noise 10^4 times larger than normalised pixels: every real input (|x| < 3)
        # then quantizes to the zero point, so the int8 model answers every image alike.
        noise = torch.randn(calibration.shape, generator=torch.Generator().manual_seed(0)) * 1e4
        return noise, images, labels

    monkeypatch.setattr(quantize, "run_images", zero_calibration)
    out = tmp_path / "broken.onnx"

    assert main(["export", "--run", str(run_dir), "--quantize", "int8", "--out", str(out),
                 "--calibration-images", "4"]) == 2

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-accuracy-drop 1" in err and "broken.onnx.rejected" in err
    rejected = tmp_path / "broken.onnx.rejected"
    assert rejected.is_file() and not out.exists()
    check = sidecar(rejected)["verification"]
    assert check["exported_accuracy"] == pytest.approx(1 / 3)  # one answer for all: 3 of the 9 images
    assert check["pytorch_accuracy"] > 0.5, "the shared run must learn its colours for this test to mean anything"
    assert not check["passed"] and check["accuracy_drop_points"] > 1


def test_accuracy_check_arithmetic():
    check = AccuracyCheck(num_images=200, pytorch_accuracy=0.9, exported_accuracy=0.885, agreement=0.97,
                          max_accuracy_drop=1.0, file_bytes={})
    assert check.accuracy_drop == pytest.approx(1.5) and not check.passed
    assert AccuracyCheck(200, 0.9, 0.905, 0.97, 0.0, {}).passed  # better than PyTorch passes even at 0 allowed


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int8", "--format", "torchscript"], "drop --format torchscript"),
    (["--quantize", "fp16", "--max-accuracy-drop", "-1"], "--max-accuracy-drop must be"),
    (["--quantize", "int4"], "invalid choice"),
])
def test_quantize_flags_are_checked_before_any_work(tmp_path, capsys, argv, message):
    try:
        status = main(["export", "--run", str(tmp_path), *argv])
    except SystemExit as usage_error:  # argparse's own one-line usage errors
        status = usage_error.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_quantize_needs_the_runs_images(trained, tmp_path, monkeypatch, capsys):
    _, run_dir, _ = trained
    real_load_run = quantize.load_run

    def moved_data(*args, **kwargs):
        run = real_load_run(*args, **kwargs)
        run.config.data = str(tmp_path / "moved")
        return run

    monkeypatch.setattr(quantize, "load_run", moved_data)
    assert main(["export", "--run", str(run_dir), "--quantize", "int8", "--out", str(tmp_path / "q.onnx")]) == 2
    assert "restore it at that path" in capsys.readouterr().err

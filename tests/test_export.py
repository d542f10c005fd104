"""Export to ONNX and TorchScript: round trips at batch sizes 1 and 3, metadata, verification."""

from __future__ import annotations

import json
import sys
from collections import namedtuple

import pytest
import torch
from conftest import make_image_folder
from torch import nn

from visiontune.cli import main
from visiontune.errors import VisiontuneError
from visiontune.run.export import (
    describe_export,
    export_model,
    load_exported,
    require_onnx_runtime,
    verify_export,
)

try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401

    HAVE_ONNX = True
except ImportError:
    HAVE_ONNX = False
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="pip install visiontune[export] (make test installs it)")
FORMATS = (pytest.param("onnx", marks=needs_onnx), "torchscript")
Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4))
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        model(torch.randn(16, 3, 12, 12) * 3 + 1)
    return model.eval()


class _AuxModel(nn.Module):
    """Returns (logits, aux_logits) like googlenet/inception in some modes."""

    def __init__(self):
        super().__init__()
        self.body = _tiny_model(1)

    def forward(self, images):
        logits = self.body(images)
        return Outputs(logits, logits * 2)


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_with_dynamic_batch(tmp_path, format):
    model = _tiny_model()
    path = export_model(model, tmp_path / f"model.{format}", format, torch.randn(1, 3, 12, 12))
    inputs = torch.randn(5, 3, 12, 12)

    check = verify_export(model, path, format, inputs)

    assert check.passed and set(check.per_batch_size) == {1, 3} and check.max_abs_diff < 1e-4
    run = load_exported(path, format)
    with torch.no_grad():
        for size in (1, 2, 5):  # sizes it was neither exported nor verified with
            assert torch.allclose(run(inputs[:size]), model(inputs[:size]), atol=1e-4)
    assert model(inputs).shape == (5, 4) and not model.training
    if format == "onnx":
        _assert_symbolic_batch_input(path)


def _assert_symbolic_batch_input(path):
    import onnx

    graph = onnx.load(str(path)).graph
    (graph_input,), (graph_output,) = graph.input, graph.output
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input" and graph_output.name == "logits"
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic, not a fixed batch size
    assert [d.dim_value for d in dims[1:]] == [3, 12, 12]


@pytest.mark.parametrize("format", ["torchscript"])  # the wrapper is the same for ONNX; spare a slow export
def test_a_model_with_auxiliary_outputs_exports_its_main_logits(tmp_path, format):
    model = _AuxModel().eval()
    path = export_model(model, tmp_path / "aux", format, torch.randn(2, 3, 12, 12))
    images = torch.randn(3, 3, 12, 12)
    assert torch.allclose(load_exported(path, format)(images), model(images).logits, atol=1e-4)
    assert verify_export(model, path, format, images).passed


@pytest.mark.parametrize("format", ["torchscript"])
def test_a_file_that_does_not_match_fails_verification(tmp_path, format):
    path = export_model(_tiny_model(0), tmp_path / "m", format, torch.randn(2, 3, 12, 12))
    check = verify_export(_tiny_model(5), path, format, torch.randn(3, 3, 12, 12))
    assert not check.passed and check.max_abs_diff > 1e-3


def test_tolerance_is_relative_for_logits_larger_than_one(monkeypatch):
    from visiontune.run import export as export

    for factor, relative_error, passes in ((1e6, 1e-5, True), (1e6, 1e-2, False), (1e-3, 0.5, True)):
        model = nn.Sequential(_tiny_model(), _Scale(factor)).eval()  # logits of about `factor` in size
        # an "exported file" whose logits are off by relative_error
        def off_by(path, format, model=model, relative_error=relative_error):
            return lambda batch: model(batch).detach() * (1 + relative_error)

        monkeypatch.setattr(export, "load_exported", off_by)
        check = verify_export(model, "unused", "torchscript", torch.randn(3, 3, 12, 12))
        assert check.passed is passes, (factor, relative_error)
        assert check.logit_scale == pytest.approx(max(1.0, model(torch.randn(3, 3, 12, 12)).abs().max().item()),
                                                  rel=1.0)


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_missing_onnxruntime_is_a_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(VisiontuneError, match=r"onnxruntime.*pip install 'visiontune\[export\]'"):
        require_onnx_runtime()
    with pytest.raises(VisiontuneError, match="onnxruntime"):
        export_model(_tiny_model(), tmp_path / "m.onnx", "onnx", torch.randn(2, 3, 12, 12))


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(VisiontuneError, match="onnx, torchscript"):
        export_model(_tiny_model(), tmp_path / "m", "tflite", torch.randn(2, 3, 12, 12))


def test_metadata_describes_input_output_classes_and_preprocessing(tmp_path):
    from visiontune.model.preprocessing import Preprocessing

    metadata = describe_export("onnx", tmp_path / "m.onnx", (3, 224, 224), ["a", "b"], Preprocessing().to_dict(),
                               "resnet18")
    assert metadata["input"]["shape"] == ["batch", 3, 224, 224] and metadata["input"]["name"] == "input"
    assert metadata["output"]["shape"] == ["batch", 2] and metadata["classes"] == ["a", "b"]
    assert metadata["preprocessing"]["mean"] == [0.485, 0.456, 0.406] or \
        tuple(metadata["preprocessing"]["mean"]) == (0.485, 0.456, 0.406)
    assert metadata["preprocessing"]["resize_size"] == 256 and metadata["preprocessing"]["crop_size"] == 224
    assert "256 px" in metadata["preprocessing"]["steps"][0]
    json.dumps(metadata)


# -- a real run folder, through the CLI ----------------------------------------------------------

TINY = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--seed", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 1-epoch resnet18 run through the CLI; shared with tests/test_report_html.py (same folder)."""
    root = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    data, run_dir = root / "data", root / "run"
    if not (run_dir / "report.json").is_file():
        make_image_folder(data, per_class=4, val_per_class=2)
        assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--lr", "0.001", "--out", str(run_dir)]) == 0
    return data, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("format", FORMATS)
def test_cli_export_of_a_trained_run(tiny_run, tmp_path, format, capsys):
    from visiontune.run.loaded import load_run

    _, run_dir = tiny_run
    out = tmp_path / "deploy" / f"classifier.{format}"
    assert main(["export", "--run", str(run_dir), "--format", format, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified on validation images" in printed and "max |difference|" in printed
    metadata = json.loads(out.with_name(out.name + ".json").read_text())
    assert metadata["classes"] == ["blue", "green", "red"] and metadata["input"]["shape"] == ["batch", 3, 32, 32]
    assert metadata["verification"]["passed"] and metadata["verification"]["inputs"] == "validation images"
    assert set(metadata["verification"]["per_batch_size"]) == {"1", "3"}
    model = load_run(run_dir).model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_exported(out, format)(images), model(images), atol=1e-3)


@pytest.mark.slow
def test_cli_export_without_the_data_uses_random_inputs_and_says_so(tiny_run, tmp_path, capsys):
    data, run_dir = tiny_run
    moved = data.with_name("data_moved")
    data.rename(moved)
    try:
        assert main(["export", "--run", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    finally:
        moved.rename(data)
    assert "verified on random inputs" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_export_fails_above_the_tolerance_and_removes_the_file(tiny_run, tmp_path, capsys, monkeypatch):
    from visiontune.run import export as export

    _, run_dir = tiny_run
    original = export.load_exported

    def off_by_a_little(path, format):  # an exported file whose logits are 0.01 off
        run = original(path, format)
        return lambda batch: run(batch) + 0.01

    monkeypatch.setattr(export, "load_exported", off_by_a_little)
    out = tmp_path / "m.pt"
    assert main(["export", "--run", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "differs from PyTorch by up to 0.01" in error and "tolerance 0.001" in error
    assert not out.exists() and not out.with_name("m.pt.json").exists()
    assert main(["export", "--run", str(run_dir), "--format", "torchscript", "--out", str(out),
                 "--tolerance", "0.02"]) == 0
    assert out.exists()


@pytest.mark.slow
def test_notebook_surface_predicts_in_three_lines_like_the_run_did(tiny_run):
    """``visiontune.load_run`` + the run's own preprocessing reproduce val_predictions.csv."""
    import csv

    import visiontune
    from visiontune.data import load_image
    from visiontune.data.transforms import build_eval_transform

    _, run_dir = tiny_run
    with open(run_dir / "val_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))

    run = visiontune.load_run(run_dir)
    batch = torch.stack([build_eval_transform(run.preprocessing)(load_image(row["path"])) for row in rows])
    probabilities = run.model(batch).softmax(dim=1)

    assert [run.classes[i] for i in probabilities.argmax(dim=1)] == [row["predicted"] for row in rows]
    assert probabilities.max(dim=1).values.tolist() == pytest.approx([float(r["confidence"]) for r in rows], abs=0.02)
    predictions, skipped = run.predict([row["path"] for row in rows], top_k=1)
    assert skipped == [] and [p.label for p in predictions] == [row["predicted"] for row in rows]
    assert [p.score for p in predictions] == pytest.approx([float(r["confidence"]) for r in rows], abs=0.02)

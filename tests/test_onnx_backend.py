"""predict/evaluate --backend onnx: ONNX Runtime with the sidecar's preprocessing, no torch needed,
the same answers as the PyTorch path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from deploy_run import deploy_run
from PIL import Image

from visiontune.cli import main
from visiontune.data import build_eval_transform, list_images, load_image
from visiontune.errors import VisiontuneError
from visiontune.model.preprocessing import Preprocessing
from visiontune.run.loaded import load_run
from visiontune.run.onnx_backend import OnnxClassifier, collect_images, preprocess
from visiontune.run.quantize import run_images

pytest.importorskip("onnxruntime", reason="pip install visiontune[export] (make test installs it)")

# Probabilities are in [0, 1]; the fp32 ONNX graph computes the same float32 convolutions as PyTorch
# in another order, ~1e-6 apart in the logits of this small model: 1e-5 is the bound.
PROBABILITY_TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return deploy_run(tmp_path_factory)


def largest_logit(run_dir: Path) -> float:
    """max |logit| of the run's model over its validation images, at least 1."""
    run = load_run(run_dir)
    _, images, _ = run_images(run, 1, 0)
    with torch.no_grad():
        return max(1.0, float(run.model(images).abs().max()))


def run_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size, mode", [((40, 24), "RGB"), ((17, 53), "RGBA"), ((32, 32), "L"), ((9, 7), "RGB")])
@pytest.mark.parametrize("values", [
    Preprocessing(crop_size=16, resize_size=20),
    Preprocessing(crop_size=24, resize_size=18, interpolation="bicubic"),  # the crop pads
    Preprocessing(crop_size=15, resize_size=15, mean=(0.5,), std=(0.25,), interpolation="nearest"),
])
def test_numpy_preprocessing_is_the_eval_transform(tmp_path, size, mode, values):
    path = make_image(tmp_path / "x.png", (200, 90, 30), size=32, mode=mode)
    Image.open(path).resize(size).save(path)
    picture = load_image(path)

    expected = build_eval_transform(values)(picture).numpy()
    actual = preprocess(picture, values.to_dict())

    # The same Pillow resize and crop, then x * (1/255), - mean, / std in float32 on both sides:
    # equal up to one rounding of values below ~5 in size (float32 spacing there ~5e-7).
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_onnx_predict_agrees_with_pytorch(trained, capsys):
    data, run_dir, model_file = trained
    folder = str(data / "val")
    for extra in ([], ["--tta"]):
        torch_side = run_json(capsys, ["predict", "--run", str(run_dir), "--json", "--top-k", "3", folder, *extra])
        onnx_side = run_json(capsys, ["predict", "--backend", "onnx", "--model-file", str(model_file), "--json",
                                      "--top-k", "3", folder, *extra])
        assert [p["path"] for p in onnx_side] == [p["path"] for p in torch_side] and len(onnx_side) == 9
        for ours, theirs in zip(onnx_side, torch_side):
            assert ours["label"] == theirs["label"]
            assert [t["label"] for t in ours["top_k"]] == [t["label"] for t in theirs["top_k"]]
            for a, b in zip(ours["top_k"], theirs["top_k"]):
                assert abs(a["score"] - b["score"]) <= PROBABILITY_TOLERANCE


def test_onnx_evaluate_agrees_with_pytorch(trained, capsys):
    data, run_dir, model_file = trained
    torch_side = run_json(capsys, ["evaluate", "--run", str(run_dir), "--data", str(data), "--json"])
    onnx_side = run_json(capsys, ["evaluate", "--backend", "onnx", "--model-file", str(model_file),
                                  "--data", str(data), "--json"])
    assert onnx_side["backend"] == "onnx" and onnx_side["num_images"] == torch_side["num_images"] == 9
    assert onnx_side["accuracy"] == torch_side["accuracy"] and onnx_side["per_class"] == torch_side["per_class"]
    # The loss is the mean -log p(label), a difference of log-softmaxes: it moves by at most twice the
    # largest logit difference, which float32 keeps within ~1e-6 of the largest logit (5x margin).
    assert abs(onnx_side["loss"] - torch_side["loss"]) <= 2 * PROBABILITY_TOLERANCE * largest_logit(run_dir)
    assert main(["evaluate", "--backend", "onnx", "--run", str(run_dir), "--data", str(data)]) == 0  # RUN/model.onnx
    assert "ONNX Runtime" in capsys.readouterr().out


def test_the_onnx_path_never_imports_torch(trained, tmp_path):
    data, _, model_file = trained
    script = (
        "import json, sys\n"
        "from visiontune.run.onnx_backend import main\n"
        f"status = main([{str(model_file)!r}, {str(data / 'val')!r}, '--json'])\n"
        "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules, "
        "'torchvision': 'torchvision' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    predictions, _, verdict = done.stdout.rpartition("]")
    assert json.loads(verdict) == {"status": 0, "torch": False, "torchvision": False}
    assert len(json.loads(predictions + "]")) == 9


def test_folder_walk_matches_the_training_side(tmp_path):
    for name in ("a/x.png", "a/b/y.jpg", ".hidden/z.png", "__MACOSX/w.png", "a/.v.png", "a/notes.txt", "c.png"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert collect_images([tmp_path, tmp_path / "c.png"]) == list_images(tmp_path)


def test_a_missing_or_damaged_sidecar_is_one_line(trained, tmp_path, capsys):
    data, _, model_file = trained
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(model_file.read_bytes())
    assert main(["predict", "--backend", "onnx", "--model-file", str(lonely), str(data / "val")]) == 2
    assert "lonely.onnx.json is missing" in capsys.readouterr().err
    Path(f"{lonely}.json").write_text(json.dumps({"classes": ["a"], "preprocessing": {"crop_size": 0}}))
    assert main(["predict", "--backend", "onnx", "--model-file", str(lonely), str(data / "val")]) == 2
    assert "unusable preprocessing" in capsys.readouterr().err


def test_backend_flags_are_checked(trained, capsys):
    data, run_dir, model_file = trained
    assert main(["predict", str(data / "val")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["predict", "--run", str(run_dir), "--model-file", str(model_file), str(data / "val")]) == 2
    assert "--backend onnx" in capsys.readouterr().err


def test_missing_onnxruntime_names_the_extra(trained, monkeypatch, capsys):
    data, _, model_file = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(VisiontuneError, match=r"pip install 'visiontune\[export\]'"):
        OnnxClassifier(model_file)
    assert main(["predict", "--backend", "onnx", "--model-file", str(model_file), str(data / "val")]) == 2
    err = capsys.readouterr().err
    assert "needs onnxruntime" in err and len(err.strip().splitlines()) == 1

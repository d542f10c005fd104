"""``--tta``: flip test-time augmentation in evaluate and predict (one function, class_log_probabilities)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_image_folder
from visiontune import load_run
from visiontune.cli import main
from visiontune.data import build_eval_transform, load_image
from visiontune.run.inference import class_log_probabilities, evaluate_run

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet"]


class FlipInvariant(nn.Module):
    """Exactly flip-invariant: x + flip(x) is the same sum either way (IEEE addition commutes)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, images):
        return self.fc((images + images.flip(-1)).flatten(1))


def _images():
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_flip_invariant_model_gets_the_same_answer_with_and_without_tta():
    torch.manual_seed(0)
    model, images = FlipInvariant().eval(), _images()
    plain = class_log_probabilities(model, images)
    # log((p + p) / 2) in float64 rounds to within a few ulps of log p
    torch.testing.assert_close(class_log_probabilities(model, images, tta=True), plain, rtol=1e-12, atol=1e-12)


def test_a_flip_sensitive_model_gets_the_mean_of_both_probabilities():
    torch.manual_seed(0)
    model, images = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval(), _images()
    with torch.no_grad():
        expected = (model(images).double().softmax(1) + model(images.flip(-1)).double().softmax(1)) / 2
    got = class_log_probabilities(model, images, tta=True).exp()
    # Same float32 logits, float64 from there on: only float64 rounding separates the two ways
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, class_log_probabilities(model, images).exp(), atol=1e-3)  # it really is sensitive


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    data = make_image_folder(root / "data", per_class=4, val_per_class=2)
    run_dir = root / "run"
    assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--lr", "0.003", "--out", str(run_dir)]) == 0
    return data, run_dir


def _by_hand(run_dir: Path, paths: list[Path]) -> torch.Tensor:
    """The mean of the softmax of each image and its flip, computed outside visiontune's inference."""
    run = load_run(run_dir)
    transform = build_eval_transform(run.preprocessing)
    images = torch.stack([transform(load_image(path)) for path in paths])
    with torch.no_grad():
        logits, flipped = run.model(images).double(), run.model(images.flip(-1)).double()
    return (logits.softmax(1) + flipped.softmax(1)) / 2


def test_predict_and_loaded_run_predict_average_the_flip(trained, capsys):
    data, run_dir = trained
    paths = sorted((data / "val").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--tta", "--json", "--top-k", "3", *map(str, paths)]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = _by_hand(run_dir, paths)
    classes = load_run(run_dir).classes
    for item, row in zip(results, expected):
        for entry in item["top_k"]:
            # float32 convolutions of a batch of 6 here vs. visiontune's batch: ~1e-6 apart in
            # probabilities, which lie in 0..1
            assert entry["score"] == pytest.approx(float(row[classes.index(entry["label"])]), abs=1e-5)
    predictions, skipped = load_run(run_dir).predict(paths, top_k=3, tta=True)
    assert skipped == [] and [p.to_dict() for p in predictions] == results


def test_evaluate_with_tta_reports_the_averaged_probabilities_loss(trained, capsys):
    data, run_dir = trained
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run_dir), "--data", str(data), "--tta", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] is True and result["num_images"] == 6
    run = load_run(run_dir)
    samples = sorted((data / "val").rglob("*.png"))
    expected = _by_hand(run_dir, samples)
    labels = torch.tensor([run.classes.index(path.parent.name) for path in samples])
    loss = float(-expected[torch.arange(len(samples)), labels].log().mean())
    accuracy = float((expected.argmax(1) == labels).double().mean())
    # Probabilities agree to ~1e-6 (see above); the loss is their log, so relative 1e-4 is ample.
    assert result["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert evaluate_run(run, data, tta=True).metrics["accuracy"] == pytest.approx(result["accuracy"])
    assert main(["evaluate", "--run", str(run_dir), "--data", str(data), "--tta"]) == 0
    assert "flip TTA" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_help_describes_tta(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--tta" in help_text and "horizontal flip" in help_text

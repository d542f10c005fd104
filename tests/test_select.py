"""``visiontune select`` and ``select_backbone``: a linear probe per backbone, a timed training step,
a ranked table and select.json. Tiny random-init models on generated images; no test reads the time
(the timed steps run against a fake clock where a figure is checked)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import visiontune
from visiontune import memory
from visiontune.cli import main
from visiontune.config import TrainConfig
from visiontune.device import Precision
from visiontune.errors import ModelError
from visiontune.features.probe import ProbeResult, accuracy, fit_linear_probe
from visiontune.model.create import create_model
from visiontune.training import select as select_module
from visiontune.training.select import Candidate, rank, select_backbone
from visiontune.training.throughput import measure_training_throughput

from conftest import make_image_folder

TINY = ["timm:test_resnet", "mobilenet_v3_small"]  # two small architectures from the two zoos
FAST = ["--weights", "none", "--image-size", "32", "--batch-size", "4"]


def fake_clock(step: float = 1.0):
    """A clock that advances ``step`` seconds at every reading."""
    ticks = itertools.count()
    return lambda: next(ticks) * step


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=6, val_per_class=2)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "cache"))


# -- ranking ---------------------------------------------------------------------------------------


def scored(name: str, acc: float, speed: float, epochs: float | None = None) -> Candidate:
    return Candidate(name, parameters=1, image_size=32, val_accuracy=acc, images_per_second=speed,
                     epochs_in_budget=epochs)


def test_rank_puts_the_most_accurate_first_and_failures_last():
    candidates = [scored("a", 0.60, 900.0), Candidate("broken", error="no linear probe"), scored("b", 0.80, 10.0),
                  scored("c", 0.70, 50.0)]
    assert [c.model for c in rank(candidates)] == ["b", "c", "a", "broken"]


def test_rank_breaks_near_ties_by_throughput():
    # 0.801 and 0.798 are 0.3 points apart (< 0.5): the 10x faster model wins; 0.79 is a whole point
    # below the best, so speed does not lift it above either.
    candidates = [scored("accurate", 0.801, 10.0), scored("fast", 0.798, 100.0), scored("fastest", 0.79, 1000.0)]
    assert [c.model for c in rank(candidates)] == ["fast", "accurate", "fastest"]


def test_rank_puts_models_that_fit_no_epoch_in_the_budget_after_the_others():
    candidates = [scored("slow", 0.9, 1.0, epochs=0.5), scored("ok", 0.7, 10.0, epochs=5.0)]
    assert [c.model for c in rank(candidates)] == ["ok", "slow"]


# -- the probe -------------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features_at_any_scale():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 4
    labels = torch.arange(60) % 3
    features = centres[labels] + torch.randn(60, 16, generator=generator) * 0.5
    features[:, 0] *= 1e4  # one feature on a far larger scale: standardisation keeps LBFGS well conditioned
    features[:, 1] = 7.0  # a constant feature must not divide by zero
    probe = fit_linear_probe(features, labels, 3)
    assert torch.isfinite(probe.weight).all() and torch.isfinite(probe.bias).all()
    assert accuracy(probe, features, labels) == 1.0


# -- throughput ------------------------------------------------------------------------------------


def test_throughput_is_images_over_the_timed_steps_seconds():
    model = create_model("timm:test_resnet", num_classes=3, weights=None)
    config = TrainConfig(model="timm:test_resnet", batch_size=4)
    # Each clock reading advances 2 s and the timed steps lie between two readings: 3 steps x 4 images / 2 s.
    speed = measure_training_throughput(model, config, 3, 32, torch.device("cpu"), Precision(None), timed_steps=3,
                                        clock=fake_clock(2.0))
    assert speed.images_per_second == pytest.approx(6.0)
    assert (speed.batch_size, speed.image_size, speed.steps) == (4, 32, 3)


# -- end to end ------------------------------------------------------------------------------------


def test_select_prints_a_ranked_table_and_writes_select_json(data_dir, tmp_path, capsys):
    out = tmp_path / "select"
    assert main(["select", "--data", str(data_dir), "--models", ",".join(TINY), "--budget", "3m", "--out", str(out),
                 *FAST]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "select.json").read_text())
    ranked = [c["model"] for c in written["candidates"]]
    assert sorted(ranked) == sorted(TINY) and written["recommended"] == ranked[0]
    for candidate in written["candidates"]:
        assert candidate["error"] is None and 0.0 <= candidate["val_accuracy"] <= 1.0
        assert candidate["images_per_second"] > 0 and candidate["image_size"] == 32
        assert candidate["epochs_in_budget"] == pytest.approx(180 * candidate["images_per_second"] / 18)
        built = create_model(candidate["model"], num_classes=3, weights=None)
        assert candidate["parameters"] == sum(p.numel() for p in built.parameters())
    assert (written["train_images"], written["val_images"]) == (18, 6)
    assert written["classes"] == ["blue", "green", "red"]
    lines = printed.splitlines()
    header = next(index for index, line in enumerate(lines) if line.lstrip().startswith("rank"))
    table = lines[header + 1:header + 1 + len(TINY)]
    assert [line.split()[1] for line in table] == ranked  # the table is in the file's order
    assert f"recommended: {ranked[0]}" in printed and "epochs in budget" in printed


def test_ranking_follows_the_probe_accuracy(data_dir, tmp_path, monkeypatch):
    # The probe's accuracies are set per model, the clock is fake (every model trains at the same
    # speed): the order in select.json must be the accuracy order, not the order given.
    accuracies = {"timm:test_resnet": 0.5, "mobilenet_v3_small": 0.9}
    real_probe = select_module.run_linear_probe
    names = iter(TINY)

    def probe(train, val, num_classes, **options):
        real_probe(train, val, num_classes, **options)
        return ProbeResult(accuracies[next(names)], 1.0, 0.1, 8)

    monkeypatch.setattr(select_module, "run_linear_probe", probe)
    result = select_backbone(data_dir, TINY, weights="none", image_size=32, batch_size=4, out=tmp_path / "s",
                             clock=fake_clock())
    assert [c.model for c in result.candidates] == ["mobilenet_v3_small", "timm:test_resnet"]
    assert result.recommended == "mobilenet_v3_small"
    assert json.loads(result.path.read_text())["recommended"] == "mobilenet_v3_small"


def test_a_model_without_a_probe_is_listed_last_with_the_reason(data_dir, tmp_path, capsys):
    # squeezenet pools after its convolutional classifier: its head cannot stand in for the model.
    assert main(["select", "--data", str(data_dir), "--models", "squeezenet1_1,timm:test_resnet",
                 "--out", str(tmp_path / "s"), *FAST]) == 0
    written = json.loads((tmp_path / "s" / "select.json").read_text())
    assert [c["model"] for c in written["candidates"]] == ["timm:test_resnet", "squeezenet1_1"]
    assert "no linear probe" in written["candidates"][1]["error"]
    assert "no linear probe" in capsys.readouterr().out


def test_without_memory_to_spare_images_come_from_files_and_features_from_the_disk_cache(
        data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 0)  # nothing fits: every cache goes to disk
    first = select_backbone(data_dir, "timm:test_resnet", weights="none", image_size=32, batch_size=4,
                            out=tmp_path / "first", clock=fake_clock())
    entries = list((tmp_path / "cache" / "features").iterdir())
    assert len(entries) == 2  # the training and the validation features
    again = select_backbone(data_dir, "timm:test_resnet", weights="none", image_size=32, batch_size=4,
                            out=tmp_path / "again", clock=fake_clock())
    assert list((tmp_path / "cache" / "features").iterdir()) == entries  # read back, not written again
    # The same features and the same deterministic probe (zero start, full batch): the same accuracy.
    assert again.candidates[0].val_accuracy == first.candidates[0].val_accuracy
    assert first.train_images == 18 and first.val_images == 6


def test_select_backbone_is_public_api():
    assert visiontune.select_backbone is select_backbone


# -- bad inputs: one line, exit 2, before any model is built ----------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--models", "resnet19,timm:test_resnet"], "did you mean: resnet18"),
    (["--models", " , "], "no model to compare"),
    (["--models", "timm:test_resnet", "--budget", "3 minutes"], "--budget must be a duration"),
    (["--models", "timm:test_resnet", "--budget", "0"], "--budget must be a positive duration"),
    (["--models", "timm:test_resnet", "--image-size", "4"], "image_size"),
])
def test_bad_inputs_are_one_line_errors(data_dir, tmp_path, capsys, flags, words):
    assert main(["select", "--data", str(data_dir), "--out", str(tmp_path / "s"), "--weights", "none", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and words in error
    assert not (tmp_path / "s").exists()


def test_a_weights_file_with_several_models_is_refused(data_dir, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read: refused before")
    assert main(["select", "--data", str(data_dir), "--models", ",".join(TINY), "--weights", str(weights)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "one --models NAME with a file" in error


def test_a_missing_data_folder_and_a_bad_image_size_flag_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ModelError):
        select_backbone(tmp_path, "resnet19", weights="none")
    assert main(["select", "--data", str(tmp_path / "nowhere"), "--models", "timm:test_resnet", *FAST]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--data", str(tmp_path), "--models", "timm:test_resnet", "--image-size", "0"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

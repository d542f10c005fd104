"""source_model=: both models traced with torch.fx, tensors aligned in data-flow order. RegNet,
which registration order leaves ambiguous, loads exactly both ways; without a source model it is
still refused, never guessed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")
from torch import nn

from test_checkpoint_transplant import randomize_statistics
from visiontune.checkpoint import load_weights
from visiontune.checkpoint.trace import dataflow_order
from visiontune.errors import CheckpointError


class Block(nn.Module):
    """A residual block whose shortcut is registered first (torchvision's RegNet style)."""

    def __init__(self, shortcut_first: bool):
        super().__init__()
        if shortcut_first:
            self.proj = nn.Conv2d(4, 8, 1)
            self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        else:
            self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
            self.proj = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.proj(x)


class Renamed(nn.Module):
    """The same block, other names, the shortcut registered last (timm's style)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        shortcut = self.shortcut(x)
        return self.conv2(torch.relu(self.conv1(x))) + shortcut


def test_dataflow_order_puts_the_main_path_before_the_shortcut_whatever_the_registration():
    assert dataflow_order(Block(shortcut_first=True)) == ["a", "proj", "b"]
    assert dataflow_order(Renamed()) == ["conv1", "shortcut", "conv2"]


def test_the_ambiguous_miniature_loads_exactly_with_a_source_model_and_is_refused_without():
    torch.manual_seed(0)
    source, target = Block(shortcut_first=True), Renamed()
    refused = load_weights(Renamed(), source.state_dict())
    assert set(refused.missing) >= {"conv1.weight", "shortcut.weight"}
    report = load_weights(target, source.state_dict(), source_model=source)
    assert report.complete, str(report)
    assert report.loaded["shortcut.weight"] == "proj.weight" and report.loaded["conv1.weight"] == "a.weight"
    assert "data-flow order" in " ".join(report.notes)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)  # the same operations on the same numbers


@pytest.mark.slow
@pytest.mark.parametrize(("torchvision_name", "timm_name"), [("regnet_y_400mf", "regnety_004"), ("regnet_x_400mf", "regnetx_004_tv")])
@pytest.mark.parametrize("direction", ["torchvision_to_timm", "timm_to_torchvision"])
def test_regnet_loads_exactly_both_ways_with_a_source_model(torchvision_name, timm_name, direction):
    torch.manual_seed(0)
    torchvision_model, timm_model = tvm.get_model(torchvision_name).eval(), timm.create_model(timm_name).eval()
    if direction == "torchvision_to_timm":
        source, target, name = torchvision_model, timm_model, torchvision_name
    else:
        source, target, name = timm_model, torchvision_model, f"timm:{timm_name}"
    randomize_statistics(source)
    report = load_weights(target, source.state_dict(), source_model=name)
    assert report.complete, str(report)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = source(images), target(images)
    assert expected.abs().max() > 1e-3
    # the same modules with the same numbers; only kernel choices could differ (~1e-7 relative),
    # a swapped shortcut changes the logits by ~1e-1 or more
    assert (expected - actual).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_an_untraceable_model_falls_back_to_registration_order_and_says_so():
    class DataDependent(Block):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
                return super().forward(x)
            return x

    report = load_weights(Renamed(), Block(shortcut_first=True).state_dict(), source_model=DataDependent(shortcut_first=True))
    assert "could not be traced" in " ".join(report.notes)
    assert "shortcut.weight" in report.missing  # still refused, not guessed


def test_a_source_model_that_does_not_fit_the_checkpoint_is_noted_and_an_unknown_name_is_an_error():
    report = load_weights(Renamed(), Block(shortcut_first=True).state_dict(), source_model=nn.Sequential(nn.Linear(2, 2)))
    assert "mostly not those of source model" in " ".join(report.notes)
    with pytest.raises(CheckpointError, match="could not be built"):
        load_weights(Renamed(), Block(shortcut_first=True).state_dict(), source_model="no_such_net_42")


@pytest.mark.slow
def test_convert_takes_a_source_model(tmp_path, capsys):
    from safetensors.torch import save_file

    from visiontune.cli import main

    checkpoint = tmp_path / "regnet.safetensors"
    save_file(tvm.regnet_y_400mf().state_dict(), str(checkpoint))
    code = main(["convert", str(checkpoint), "--model", "timm:regnety_004", "--source-model", "regnet_y_400mf", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "would load 384 of 384 model tensors" in printed, printed
    assert "data-flow order" in printed
    assert main(["convert", str(checkpoint), "--model", "timm:regnety_004", "--source-model", "no_such_net_42", "--dry-run"]) == 2


@pytest.mark.slow
def test_training_set_up_passes_the_source_model_to_load_weights(tmp_path):
    from safetensors.torch import save_file

    from visiontune.config import TrainConfig
    from visiontune.training.setup import build_model

    checkpoint = tmp_path / "regnet.safetensors"
    save_file(tvm.regnet_y_400mf().state_dict(), str(checkpoint))
    config = TrainConfig(model="timm:regnety_004", weights=str(checkpoint), source_model="regnet_y_400mf")
    _, report = build_model(config, num_classes=5)
    assert all(key.startswith("head.fc.") for key in report["missing"] + list(report["mismatched"])), report["missing"]
    assert any("data-flow order" in note for note in report["notes"])

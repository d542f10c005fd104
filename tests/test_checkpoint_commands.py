"""``visiontune inspect`` and ``visiontune convert`` end to end, through the CLI entry point."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
tvm = pytest.importorskip("torchvision.models")

from visiontune.checkpoint import read_checkpoint
from visiontune.cli import main


@pytest.fixture(scope="module")
def ddp_checkpoint(tmp_path_factory):
    """A resnet18 saved from a DDP-wrapped model inside a training checkpoint, 1000-class head."""
    torch.manual_seed(0)
    trained = tvm.resnet18()
    trained.bn1.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "epoch_7.ckpt"
    state = {f"module.{key}": value for key, value in trained.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    return path, trained.state_dict()


def test_inspect_shows_format_wrapper_counts_head_and_keys(ddp_checkpoint, capsys):
    path, state = ddp_checkpoint
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format      torch" in out
    assert "dict with keys state_dict, epoch, optimizer; weights under 'state_dict'" in out
    assert f"tensors     {len(state)} (11,689,512 parameters" in out
    assert "float32 x" in out and "int64 x20" in out
    assert "module.fc.weight (1000, 512) -> 1000 classes" in out
    assert "module.layer{1..4}.0.bn1.*" not in out  # shapes differ between stages: not merged
    assert "module.layer1.{0,1}.bn{1,2}.*" in out  # same shapes: merged


def test_inspect_json(ddp_checkpoint, capsys):
    path, state = ddp_checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["head"]["num_classes"] == 1000 and data["num_tensors"] == len(state)
    assert data["tensors"]["module.conv1.weight"] == [64, 3, 7, 7]


def test_inspect_refuses_a_pickle_with_code_in_one_line(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.nn.Linear(2, 2)}, path)  # a pickled module: refused by weights_only
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ".safetensors" in err and len(err.strip().splitlines()) == 1


def test_convert_writes_a_clean_safetensors_for_the_new_head(ddp_checkpoint, tmp_path, capsys):
    path, state = ddp_checkpoint
    out = tmp_path / "resnet18_5.safetensors"
    assert main(["convert", str(path), "--model", "resnet18", "--num-classes", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded 120 of 122" in printed and "fc.weight (5, 512) <- module.fc.weight (1000, 512)" in printed
    written = read_checkpoint(out)
    assert written["fc.weight"].shape == (5, 512)
    assert torch.equal(written["bn1.running_var"], state["bn1.running_var"])
    assert torch.equal(written["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_convert_keeps_the_checkpoint_head_size_by_default(ddp_checkpoint, tmp_path, capsys):
    path, state = ddp_checkpoint
    out = tmp_path / "resnet18.pth"
    assert main(["convert", str(path), "--model", "resnet18", "--out", str(out), "--strict"]) == 0
    written = read_checkpoint(out)
    assert list(written) == list(state)
    assert all(torch.equal(written[key], value) for key, value in state.items())


def test_convert_dry_run_and_strict_write_nothing(ddp_checkpoint, tmp_path, capsys):
    path, _ = ddp_checkpoint
    out = tmp_path / "never.safetensors"
    assert main(["convert", str(path), "--model", "resnet18", "--num-classes", "5", "--dry-run", "--out", str(out)]) == 0
    assert "would load 120 of 122" in capsys.readouterr().out
    assert main(["convert", str(path), "--model", "resnet18", "--num-classes", "5", "--strict", "--out", str(out)]) == 1
    assert "--strict" in capsys.readouterr().err
    assert not out.exists()


def test_convert_exits_2_when_nothing_fits(tmp_path, capsys):
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3, 3)}, path)
    assert main(["convert", str(path), "--model", "resnet18", "--num-classes", "5", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "No tensor of checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_with_a_mapping_file_and_json_report(ddp_checkpoint, tmp_path, capsys):
    path, _ = ddp_checkpoint
    mapping = tmp_path / "map.yaml"
    mapping.write_text("fc.weight: null\nfc.bias: null\n")
    assert main(["convert", str(path), "--model", "resnet18", "--match", str(mapping), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == ["fc.weight", "fc.bias"] and len(report["loaded"]) == 120
    assert str(mapping) in report["match"]

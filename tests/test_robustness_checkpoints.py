"""Untrusted checkpoints: code in a pickle never runs, on any path that reads one; damaged or lying
files (wrong dtypes, a safetensors header that lies about sizes) are refused with a message.

load_weights' own refusal of pickles with code and its bad-file messages are tested in
test_checkpoint_io.py, and ``save_weights`` defaulting to .safetensors there too; this file
covers every command that reads a checkpoint, and the lies a file can tell.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_image_folder
from visiontune.checkpoint import load_weights, save_weights
from visiontune.cli import main
from visiontune.errors import CheckpointError

MODEL = "timm:test_resnet"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder as training leaves it (header files, best.safetensors), written without training."""
    from visiontune.config import TrainConfig
    from visiontune.model.create import create_model
    from visiontune.run.folder import BEST_WEIGHTS, write_run_header
    from visiontune.training.setup import resolve_run_preprocessing

    root = tmp_path_factory.mktemp("ckpt")
    data = make_image_folder(root / "data", classes=("red", "blue"), per_class=2, val_per_class=2)
    config = TrainConfig(data=str(data), model=MODEL, weights="none", image_size=32, device="cpu", workers=0)
    run_dir = root / "run"
    run_dir.mkdir()
    write_run_header(run_dir, config, ["blue", "red"], resolve_run_preprocessing(config))
    torch.manual_seed(0)
    save_weights(create_model(MODEL, num_classes=2, weights=None), run_dir / BEST_WEIGHTS)
    return run_dir, data


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"conv1.0.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path


PATHS = ["load_weights", "train --weights", "train --resume", "inspect", "convert", "evaluate best", "evaluate last",
         "predict best", "predict last", "load_run"]


@pytest.mark.parametrize("path", PATHS)
def test_a_pickle_with_code_is_refused_and_never_runs(path, run_folder, tmp_path, capsys):
    from visiontune.model.create import create_model
    from visiontune.run.loaded import load_run

    template, data = run_folder
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    evil = _evil_file(tmp_path / "evil.pth", marker)
    if path.endswith("best") or path == "load_run":
        shutil.copy(evil, run_dir / "best.safetensors")  # the suffix promises safetensors; the bytes are a pickle
    if path.endswith("last") or path == "train --resume":
        shutil.copy(evil, run_dir / "last.ckpt")
    if path == "load_weights":
        with pytest.raises(CheckpointError, match="run code"):
            load_weights(create_model(MODEL, num_classes=2, weights=None), evil)
    elif path == "load_run":
        with pytest.raises(CheckpointError, match="run code"):
            load_run(run_dir)
    else:
        commands = {
            "train --weights": ["train", "--data", str(data), "--model", MODEL, "--weights", str(evil), "--device", "cpu",
                                "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "new")],
            "train --resume": ["train", "--resume", str(run_dir)],
            "inspect": ["inspect", str(evil)],
            "convert": ["convert", str(evil), "--model", MODEL, "--out", str(tmp_path / "out.safetensors")],
            "evaluate": ["evaluate", "--run", str(run_dir), "--data", str(data), "--device", "cpu"],
            "predict": ["predict", "--run", str(run_dir), str(data / "val"), "--device", "cpu"],
        }
        command, _, which = path.partition(" ")
        argv = commands.get(path) or [*commands[command], "--checkpoint", which]
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "run code" in err and ".safetensors" in err
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "new").exists()


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The control: without weights_only the same file does create the marker."""
    marker = tmp_path / "pwned"
    torch.load(_evil_file(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_a_torch_file_named_safetensors_is_read_by_its_content(tmp_path):
    from visiontune.model.create import create_model

    torch.manual_seed(1)
    source = create_model(MODEL, num_classes=2, weights=None)
    path = tmp_path / "weights.safetensors"
    torch.save(source.state_dict(), path)
    target = create_model(MODEL, num_classes=2, weights=None)
    assert load_weights(target, path).complete
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


# --- files that lie --------------------------------------------------------------------------------


def _state(num_classes: int = 2) -> dict:
    from visiontune.model.create import create_model

    torch.manual_seed(0)
    return create_model(MODEL, num_classes=num_classes, weights=None).state_dict()


def _rewrite_header(path: Path, change) -> None:
    """Edit a safetensors file's JSON header in place, keeping the data bytes as they are."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _biggest(header: dict) -> str:
    return max((key for key in header if key != "__metadata__"),
               key=lambda key: header[key]["data_offsets"][1] - header[key]["data_offsets"][0])


def _offsets_past_the_end(header):
    header[_biggest(header)]["data_offsets"][1] += 10_000_000


def _shape_larger_than_its_bytes(header):
    header[_biggest(header)]["shape"][0] *= 4


def _dtype_wider_than_its_bytes(header):
    header[_biggest(header)]["dtype"] = "F64"


LIES = {
    "offsets past the end": _offsets_past_the_end,
    "shape larger than its bytes": _shape_larger_than_its_bytes,
    "dtype wider than its bytes": _dtype_wider_than_its_bytes,
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_safetensors_header_that_lies_about_sizes_is_refused(lie, tmp_path):
    from visiontune.model.create import create_model

    path = tmp_path / "weights.safetensors"
    save_file(_state(), str(path))
    _rewrite_header(path, LIES[lie])
    model = create_model(MODEL, num_classes=2, weights=None)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_header_length_that_lies_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_state(), str(path))
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(struct.pack("<Q", length + 64) + raw[8:])
    with pytest.raises(CheckpointError, match="damaged"):
        load_weights(_model(), path)


def _model():
    from visiontune.model.create import create_model

    return create_model(MODEL, num_classes=2, weights=None)


def test_integer_tensors_for_float_weights_are_refused_and_the_model_left_alone(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({key: value.to(torch.int32) if value.is_floating_point() else value for key, value in _state().items()},
              str(path))
    model = _model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"wrong data type.*conv1\.0\.weight \(int32 for float32\)"):
        load_weights(model, path)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_half_precision_weights_still_load(tmp_path):
    """The control: fp16 files are how many checkpoints ship, and they are cast, not refused."""
    path = tmp_path / "weights.safetensors"
    state = _state()
    save_file({key: value.half() if value.is_floating_point() else value for key, value in state.items()}, str(path))
    model = _model()
    assert load_weights(model, path).complete
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"].half().float())


@pytest.mark.parametrize("damage", ["integer tensors", "header lies"])
def test_a_damaged_best_safetensors_is_a_one_line_error_in_evaluate(damage, run_folder, tmp_path, capsys):
    template, data = run_folder
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    best = run_dir / "best.safetensors"
    if damage == "integer tensors":
        save_file({key: value.to(torch.int64) for key, value in _state().items()}, str(best))
    else:
        _rewrite_header(best, _offsets_past_the_end)
    status = main(["evaluate", "--run", str(run_dir), "--data", str(data), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(best) in err


def test_a_best_safetensors_for_another_model_is_a_one_line_error(run_folder, tmp_path, capsys):
    template, data = run_folder
    run_dir = tmp_path / "run"
    shutil.copytree(template, run_dir)
    save_file(_state(num_classes=5), str(run_dir / "best.safetensors"))  # a head of 5 classes for a 2-class run
    status = main(["predict", "--run", str(run_dir), str(data / "val"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "does not fit" in err, err

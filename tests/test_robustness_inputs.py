"""Hostile inputs (issue 11, items 2, 4, 6 and 7): each kind is refused by one mechanism, with
exit status 2 and one line naming the culprit, never a traceback.

- YAML: every reader goes through ``safe_yaml.load_yaml_file`` (aliases bounded, UTF-8 only);
- messages quote user values through ``errors.shown`` (bounded whatever the value);
- OSError on user paths is mapped at the CLI boundary; failed writes are named by ``named_write_errors``;
- run-folder files are read by functions that raise VisiontuneError subclasses naming the file;
- data is validated after unreadable files are dropped; manifests reject conflicting duplicates;
- weights with NaN/inf are refused on load, resume and save (``checkpoint/finite.py``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_image, make_image_folder
from visiontune.checkpoint import load_weights, save_weights
from visiontune.checkpoint.save import named_write_errors
from visiontune.cli import main
from visiontune.config import load_config_file
from visiontune.safe_yaml import MAX_ALIAS_REPEATS, load_yaml_file
from visiontune.data.datasets import discover
from visiontune.errors import CheckpointError, ConfigError, shown
from visiontune.model.create import create_model

SRC = Path(__file__).resolve().parents[1] / "src" / "visiontune"
TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet"]


def _bomb(levels: int, fan_out: int = 9) -> str:
    """The issue's "billion laughs": each anchor is a list of ``fan_out`` aliases of the one before."""
    lines = ["data:", f"  a0: &a0 [{', '.join(['x'] * fan_out)}]"]
    for level in range(1, levels):
        lines.append(f"  a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"


def _run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


def _one_line_error(capsys, status: int) -> str:
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# -- item 2: YAML aliases and unbounded values ---------------------------------------------------


@pytest.mark.parametrize("levels", [4, 9, 30])
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels))
    if 9 ** levels - 9 * levels < MAX_ALIAS_REPEATS:  # 4 levels: 6,561 values, a legitimate size
        assert load_config_file(path)["data"]["a0"] == ["x"] * 9
        return
    with pytest.raises(ConfigError, match="aliases") as error:
        load_config_file(path)
    assert len(str(error.value)) < 400


def test_a_self_referencing_anchor_and_absurd_nesting_are_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("data: &a [x, *a]\n")
    with pytest.raises(ConfigError, match="itself|contains it"):
        load_config_file(path)
    path.write_text("[" * 20000 + "]" * 20000)
    with pytest.raises(ConfigError):
        load_yaml_file(path)


def test_a_few_ordinary_aliases_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &lr 0.001\nlr: *lr\nhead_lr: *lr\n")
    assert load_config_file(path) == {"base": 0.001, "lr": 0.001, "head_lr": 0.001}


def test_the_match_rules_file_uses_the_same_bounded_loader(tmp_path):
    model = create_model("timm:test_resnet", num_classes=3, weights=None)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n" + _bomb(9).replace("data:\n", "  - [x, y]\nunused:\n"))
    with pytest.raises(ConfigError, match="aliases") as error:
        load_weights(model, model.state_dict(), match=str(rules))
    assert len(str(error.value)) < 400


def test_no_module_reads_yaml_except_through_the_bounded_loader():
    """A new yaml.safe_load/yaml.load elsewhere would bring the alias bomb back."""
    offenders = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if path.name != "safe_yaml.py" and re.search(r"yaml\.(safe_)?(load|load_all|full_load)\(", path.read_text())]
    assert offenders == []


def test_shown_is_bounded_for_any_value():
    nested: list = ["x"] * 9
    for _ in range(40):  # 9**40 values if expanded: repr() would never finish
        nested = [nested] * 9
    for value in (nested, "y" * 10**6, 10**5000, {"k" * 1000: 1}):
        assert len(shown(value)) <= 90
    assert shown("abc") == "'abc'"


def test_a_huge_value_in_a_config_gives_a_short_message(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: [" + ", ".join(["1"] * 200000) + "]\n")
    status = _run_main(["train", "--data", str(tmp_path), *TINY, "--config", str(config), "--out", str(tmp_path / "run")])
    line = _one_line_error(capsys, status)
    assert "epochs" in line and len(line) < 400


# -- item 4: bad data ----------------------------------------------------------------------------


def _train(data: Path, out: Path, *extra: str) -> int:
    return _run_main(["train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(out), *extra])


def test_a_class_whose_files_are_all_unreadable_is_an_error_naming_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    for path in (data / "train" / "green").iterdir():
        path.write_bytes(b"not an image")
    line = _one_line_error(capsys, _train(data, tmp_path / "run"))
    assert "'green'" in line and str(data / "train" / "green") in line and "4 unreadable" in line
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_a_validation_set_left_empty_by_unreadable_files_is_an_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"")
    line = _one_line_error(capsys, _train(data, tmp_path / "run"))
    assert "validation" in line and str(data / "val") in line


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    for name, color in (("r", (220, 30, 30)), ("g", (30, 200, 40))):
        for index in range(4):
            make_image(tmp_path / f"{name}{index}.png", color, noise_seed=index)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    return manifest


def test_an_image_listed_with_two_labels_is_an_error_naming_the_lines(tmp_path, capsys):
    rows = [f"r{i}.png,red" for i in range(4)] + [f"g{i}.png,green" for i in range(4)] + ["r1.png,green"]
    manifest = _manifest(tmp_path, rows)
    line = _one_line_error(capsys, _train(manifest, tmp_path / "run"))
    assert "r1.png" in line and "lines 3, 10" in line and "'red'" in line and "'green'" in line
    assert "decod" not in line


def test_a_repeated_row_is_used_once_and_the_split_still_works(tmp_path, caplog):
    rows = [f"r{i}.png,red" for i in range(4)] + [f"g{i}.png,green" for i in range(4)] + ["r1.png,red"] * 3
    split = discover(_manifest(tmp_path, rows), val_split=0.25, seed=0)
    paths = [sample.path for sample in split.train + split.val]
    assert len(paths) == len(set(paths)) == 8
    assert {s.label for s in split.train} == {s.label for s in split.val} == {0, 1}
    assert "more than once" in caplog.text


# -- item 6: tracebacks where one line is promised -------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-epoch run of a tiny random-init model, copied by each case that damages it."""
    root = tmp_path_factory.mktemp("inputs")
    data = make_image_folder(root / "data", per_class=4, val_per_class=2)
    assert _run_main(["train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(root / "run")]) == 0
    return data, root / "run"


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    import shutil

    data, run = finished_run
    return data, Path(shutil.copytree(run, tmp_path / "run"))


def _case(name: str, finished_run, tmp_path) -> tuple[list[str], list[str]]:
    """The command line of case ``name`` (after damaging a copy of the run) and words its line must hold."""
    data = finished_run[0]
    if name == "output folder under /proc":
        return ["train", "--data", str(data), *TINY, "--out", "/proc/visiontune-test/run"], ["/proc/visiontune-test"]
    if name == "output folder read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o555)
        return ["train", "--data", str(data), *TINY, "--out", str(parent / "run")], [str(parent), "ermission"]
    if name == "batch size 1 with BatchNorm":
        return ["train", "--data", str(data), *TINY, "--batch-size", "1", "--out", str(tmp_path / "out")], \
            ["--batch-size 1", "BatchNorm"]
    if name == "seed out of range":
        return ["train", "--data", str(data), *TINY, "--seed", "99999999999999999999999", "--out", str(tmp_path / "o")], \
            ["seed", "99999999999999999999999"]
    if name == "config not UTF-8":
        config = tmp_path / "latin1.yaml"
        config.write_bytes("epochs: 2 # r\xe9sum\xe9\n".encode("latin-1"))
        return ["train", "--data", str(data), *TINY, "--config", str(config), "--out", str(tmp_path / "o")], \
            [str(config), "UTF-8"]
    if name == "bad group in a --match rule":
        source = tmp_path / "source.safetensors"
        save_file(create_model("timm:test_resnet", num_classes=3, weights=None).state_dict(), str(source))
        rules = tmp_path / "rules.yaml"
        rules.write_text('rules:\n  - ["^(conv1)\\\\.", "\\\\2."]\n')
        return ["convert", str(source), "--model", "timm:test_resnet", "--num-classes", "3", "--match", str(rules),
                "--out", str(tmp_path / "out.safetensors")], [str(rules), "group"]
    _, run = _copy_run(finished_run, tmp_path)
    if name == "classes.json corrupted":
        (run / "classes.json").write_text('["blue", "gre')
        return ["evaluate", "--run", str(run), "--data", str(data / "val"), "--device", "cpu"], ["classes.json"]
    if name == "preprocessing.json not a dict":
        (run / "preprocessing.json").write_text("[1, 2]")
        return ["predict", "--run", str(run), str(data / "val"), "--device", "cpu"], ["preprocessing.json"]
    if name == "best.safetensors damaged at the end of a resume":
        (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:3000])
        return ["train", "--resume", str(run), "--quiet"], ["best.safetensors"]
    if name == "last.ckpt without rng":
        state = torch.load(run / "last.ckpt", weights_only=True)
        del state["rng"]
        torch.save(state, run / "last.ckpt")
        return ["train", "--resume", str(run), "--quiet", "--epochs", "2"], ["last.ckpt", "rng"]
    if name == "last.ckpt with a damaged rng":
        state = torch.load(run / "last.ckpt", weights_only=True)
        state["rng"] = {"torch": "nonsense"}
        torch.save(state, run / "last.ckpt")
        return ["train", "--resume", str(run), "--quiet", "--epochs", "2"], ["last.ckpt", "random"]
    raise AssertionError(name)


CASES = ["output folder under /proc", "output folder read-only", "batch size 1 with BatchNorm", "seed out of range",
         "config not UTF-8", "bad group in a --match rule", "classes.json corrupted", "preprocessing.json not a dict",
         "best.safetensors damaged at the end of a resume", "last.ckpt without rng", "last.ckpt with a damaged rng"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_each_reproduction_exits_2_with_one_line(name, finished_run, tmp_path, capsys):
    argv, words = _case(name, finished_run, tmp_path)
    capsys.readouterr()
    line = _one_line_error(capsys, _run_main(argv))
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                         (errno.EACCES, "permissions")])
def test_the_file_system_refusing_a_user_path_is_one_line(code, words, finished_run, tmp_path, monkeypatch, capsys):
    """Works as root too (root ignores permission bits): the file system's answer is simulated."""
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "out" / "run"
    line = _one_line_error(capsys, _run_main(["train", "--data", str(finished_run[0]), *TINY, "--out", str(out)]))
    assert words in line and str(out) in line


def test_a_batch_of_one_is_fine_where_batchnorm_sees_more_than_one_value(finished_run, tmp_path):
    """Only 1x1 feature maps are refused: at 64 px the last BatchNorm of test_resnet sees 2x2 values."""
    data = finished_run[0]
    args = ["train", "--data", str(data), *TINY, "--image-size", "64", "--batch-size", "1", "--epochs", "1",
            "--out", str(tmp_path / "run")]
    assert _run_main(args) == 0


def test_a_failed_torch_save_names_the_file_instead_of_unexpected_pos(tmp_path):
    target = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        with named_write_errors(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(ValueError):  # anything that is not a failed write stays what it was
        with named_write_errors(target):
            raise ValueError("a bug")


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # bytes: less than the 1.5 MB weights


@pytest.mark.slow
def test_a_write_cut_short_by_the_disk_is_one_line_and_keeps_nothing_half_written(tmp_path):
    """A real short write (ulimit -f stands in for a full disk: the same failed write() underneath)."""
    source = tmp_path / "source.safetensors"
    save_file(create_model("timm:test_resnet", num_classes=3, weights=None).state_dict(), str(source))
    out = tmp_path / "out" / "converted.safetensors"
    env = {**os.environ, "PYTHONPATH": str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "visiontune", "convert", str(source), "--model", "timm:test_resnet",
                             "--num-classes", "3", "--out", str(out)], capture_output=True, text=True, env=env,
                            preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(out) in result.stderr and "too large" in result.stderr.lower()
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary file left behind


# -- item 7: NaN weights ---------------------------------------------------------------------------


def _poisoned(state: dict, key: str) -> dict:
    state = {name: tensor.clone() for name, tensor in state.items()}
    state[key].view(-1)[0] = float("nan")
    return state


def test_loading_weights_with_nan_is_refused_naming_the_tensor_and_leaves_the_model_alone():
    model = create_model("timm:test_resnet", num_classes=3, weights=None)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    poisoned = _poisoned(model.state_dict(), "conv1.0.weight")
    poisoned["fc.bias"][1] = float("inf")
    with pytest.raises(CheckpointError, match=r"conv1\.0\.weight \(1 NaN.*fc\.bias \(0 NaN, 1 inf"):
        load_weights(model, poisoned)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_saving_weights_with_nan_is_refused_and_writes_nothing(tmp_path):
    model = create_model("timm:test_resnet", num_classes=3, weights=None)
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        save_weights(_poisoned(model.state_dict(), "fc.weight"), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "predict", "resume", "train --weights"])
def test_nan_weights_in_a_run_stop_every_command_with_one_line(command, finished_run, tmp_path, capsys):
    data, run = _copy_run(finished_run, tmp_path)
    if command == "resume":
        state = torch.load(run / "last.ckpt", weights_only=True)
        state["model"] = _poisoned(state["model"], "fc.weight")
        torch.save(state, run / "last.ckpt")
        argv = ["train", "--resume", str(run), "--quiet", "--epochs", "2"]
    else:
        save_file(_poisoned(load_file(str(run / "best.safetensors")), "fc.weight"), str(run / "best.safetensors"))
        argv = {"evaluate": ["evaluate", "--run", str(run), "--data", str(data / "val"), "--device", "cpu"],
                "predict": ["predict", "--run", str(run), str(data / "val"), "--device", "cpu"],
                "train --weights": ["train", "--data", str(data), *TINY, "--weights", str(run / "best.safetensors"),
                                    "--epochs", "1", "--out", str(tmp_path / "new")]}[command]
    capsys.readouterr()
    line = _one_line_error(capsys, _run_main(argv))
    assert "fc.weight" in line and "NaN" in line
    assert json.loads((run / "classes.json").read_text())  # nothing of the run was damaged further


@pytest.mark.parametrize("size", [0, -1, 100_000_000])
def test_a_damaged_preprocessing_size_is_refused(size):
    # a preprocessing.json naming 10^8 pixels per side would ask for petabytes before any message
    from visiontune.model.preprocessing import Preprocessing

    values = {"crop_size": size, "resize_size": 256, "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(ConfigError, match="not valid"):
        Preprocessing.from_dict(values)

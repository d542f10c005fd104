"""A run folder from someone else cannot make visiontune write or reveal a file elsewhere, and no
command loses a user's file.

Every file a run writes or reads is replaced, one at a time, by a symbolic link to a "victim" file
outside the run; then the commands that touch run folders run on it. The victim must never change,
and its content must never reach the output: a command either succeeds (the link was replaced by a
new file) or refuses in one line naming the link. A new writer that opens a path directly, or a
new reader that follows links, fails here without this test knowing its name.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.run.files import run_file, run_subfolder
from visiontune.run.folder import (CONFIG_FILE, EXPORT_FILES, LAST_CHECKPOINT, RUN_FILES, TENSORBOARD_DIR,
                                   check_run_dir, check_run_folder, finished_run_files, prepare_run_dir)

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--seed", "0", "--device", "cpu", "--quiet"]
VICTIM = b"victim secret: this file is outside the run and must not be read or written\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 1-epoch linear probe through the CLI, copied by each check that changes it."""
    root = tmp_path_factory.mktemp("linked")
    data = make_image_folder(root / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    run_dir = root / "run"
    assert main(["train", "--data", str(data), *TINY, "--strategy", "linear-probe", "--epochs", "1",
                 "--out", str(run_dir)]) == 0
    return data, run_dir


def _commands(run_dir: Path, data: Path) -> dict[str, list[str]]:
    return {
        "resume": ["train", "--resume", str(run_dir), "--quiet"],
        "report": ["report", "--run", str(run_dir)],
        "evaluate": ["evaluate", "--run", str(run_dir), "--data", str(data / "val"), "--device", "cpu"],
        "export": ["export", "--run", str(run_dir), "--format", "torchscript"],
    }


def _leaks(folder: Path, text: str) -> list[str]:
    """Files under ``folder`` (and the text) holding the victim's bytes, raw or base64 (report.html)."""
    needles = (VICTIM, base64.b64encode(VICTIM)[:40])
    found = [str(path) for path in folder.rglob("*") if path.is_file() and not path.is_symlink()
             and any(needle in path.read_bytes() for needle in needles)]
    return found + (["output"] if any(needle.decode() in text for needle in needles) else [])


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RUN_FILES, *EXPORT_FILES[3:5]])
def test_a_symlink_in_a_run_folder_is_never_written_through_or_read(finished_run, tmp_path, capsys, name):
    data, original = finished_run
    victim = tmp_path / "victim"
    outcomes = {}
    for command, run_dir in ((command, tmp_path / command) for command in _commands(original, data)):
        shutil.copytree(original, run_dir)
        victim.write_bytes(VICTIM)
        stamp = victim.stat().st_mtime_ns
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(victim)
        capsys.readouterr()
        status = main(_commands(run_dir, data)[command])
        out, err = capsys.readouterr()
        assert victim.read_bytes() == VICTIM and victim.stat().st_mtime_ns == stamp, f"{command} wrote through {name}"
        assert status in (0, 2), (command, name, status, err)
        if status == 2:
            # refused by the one rule for reading (run_file), not by some parser choking on the victim
            assert len(err.strip().splitlines()) == 1 and "symbolic link" in err, (command, name, err)
        assert _leaks(run_dir, out + err) == [], f"{command} read {name} through the link"
        outcomes[command] = status
    # every command reading a run checks all of the run's files first (check_run_folder); the
    # exported model is not one of them, and is simply replaced
    expected = 2 if name in RUN_FILES else 0
    assert outcomes == dict.fromkeys(outcomes, expected), outcomes


@pytest.mark.slow
@pytest.mark.parametrize("name", finished_run_files("single"))
def test_without_the_upfront_check_no_writer_follows_a_link_either(finished_run, tmp_path, monkeypatch, capsys, name):
    """The second line of defence, and the test that catches a new writer that opens its path
    directly: with check_run_folder bypassed, a resume writes every file of the run again."""
    import visiontune.run.folder as folder
    import visiontune.run.report_html as report_html

    for module in (folder, report_html):
        monkeypatch.setattr(module, "check_run_folder", lambda run_dir: Path(run_dir))
    data, original = finished_run
    run_dir = shutil.copytree(original, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(victim)
    capsys.readouterr()
    status = main(_commands(run_dir, data)["resume"])
    out, err = capsys.readouterr()
    assert victim.read_bytes() == VICTIM, f"resume wrote through {name}"
    assert status == 0 or (status == 2 and len(err.strip().splitlines()) == 1 and "symbolic link" in err), err
    assert _leaks(run_dir, out + err) == []


def test_a_symlinked_tensorboard_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / TENSORBOARD_DIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError, match="symbolic link"):
        run_subfolder(run_dir, TENSORBOARD_DIR)
    with pytest.raises(ConfigError, match="symbolic link"):
        check_run_folder(run_dir)
    assert run_subfolder(tmp_path / "new", TENSORBOARD_DIR) == tmp_path / "new" / TENSORBOARD_DIR


def test_run_file_accepts_only_regular_files_inside_the_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "sub").mkdir(parents=True)
    (run_dir / "classes.json").write_text("[]")
    (run_dir / "metrics.csv").symlink_to(run_dir / "classes.json")  # even a link inside the run is not the run's file
    assert run_file(run_dir, "classes.json").is_file()
    assert not run_file(run_dir, "report.json").exists()  # absent is for the caller to handle
    for name in ("metrics.csv", "sub", "../run/sub"):
        with pytest.raises(ConfigError):
            run_file(run_dir, name)


# -- --overwrite ------------------------------------------------------------------------------------


def test_overwrite_is_refused_for_a_folder_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "tensorboard").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "tensorboard" / "events.out.tfevents.1.mine").write_text("my own logs")
    before = sorted(str(path) for path in mine.rglob("*"))
    status = main(["train", "--data", str(tmp_path / "data"), *TINY, "--out", str(mine), "--overwrite"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "not a visiontune run folder" in err, err
    assert sorted(str(path) for path in mine.rglob("*")) == before
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_removes_only_visiontunes_own_files(tmp_path):
    run_dir = tmp_path / "run"
    board = run_dir / TENSORBOARD_DIR
    board.mkdir(parents=True)
    for name in (*RUN_FILES, *EXPORT_FILES, ".last.ckpt.x1y2.tmp"):
        (run_dir / name).write_text("visiontune's")
    (board / "events.out.tfevents.123.host").write_text("visiontune's")
    (board / "my_notes.txt").write_text("mine")
    (run_dir / "notes.txt").write_text("mine")
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    (run_dir / "best.safetensors").unlink()
    (run_dir / "best.safetensors").symlink_to(victim)
    check_run_dir(run_dir, overwrite=True)
    prepare_run_dir(run_dir, overwrite=True)
    left = sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*"))
    assert left == ["notes.txt", "tensorboard", "tensorboard/my_notes.txt"]
    assert victim.read_bytes() == VICTIM  # the link went, not what it pointed to


# -- convert never replaces its input ----------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from visiontune.checkpoint import save_weights
    from visiontune.model.create import create_model

    return save_weights(create_model("timm:test_resnet", num_classes=3, weights=None), tmp_path / "a.safetensors")


@pytest.mark.parametrize("how", ["same path", "relative path", "no suffix", "symlink", "hard link"])
def test_convert_refuses_to_write_over_its_own_input(checkpoint, tmp_path, monkeypatch, capsys, how):
    before = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = {"same path": str(checkpoint), "relative path": "./sub/../a.safetensors", "no suffix": str(tmp_path / "a")}.get(how)
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        out = str(tmp_path / "link.safetensors")
        os.symlink(checkpoint, out)
    elif how == "hard link":
        out = str(tmp_path / "hard.safetensors")
        os.link(checkpoint, out)
    status = main(["convert", str(checkpoint), "--model", "timm:test_resnet", "--num-classes", "5", "--out", out])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "input checkpoint" in err, err
    assert checkpoint.read_bytes() == before


def test_convert_to_another_file_still_works(checkpoint, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    assert main(["convert", str(checkpoint), "--model", "timm:test_resnet", "--out", str(out)]) == 0
    assert out.is_file()


# -- Ctrl-C before the first epoch -------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_says_one_thing_and_a_rerun_works(tmp_path, monkeypatch, capsys):
    import visiontune.training.engine as engine

    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    run_dir = tmp_path / "run"
    command = ["train", "--data", str(data), *TINY, "--strategy", "linear-probe", "--epochs", "1", "--out", str(run_dir)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", interrupted)
        status = main(command)
    err = capsys.readouterr().err
    assert status == 130
    assert len(err.strip().splitlines()) == 1 and "before the first epoch" in err, err
    assert not run_dir.exists()  # nothing half-made is left to block the same command
    assert main(command) == 0
    assert (run_dir / LAST_CHECKPOINT).is_file()


# -- predict names each unreadable file once ---------------------------------------------------------


@pytest.mark.slow
def test_predict_names_each_unreadable_file_once(finished_run, tmp_path, capsys, caplog):
    data, run_dir = finished_run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    shutil.copy(next((data / "val" / "red").iterdir()), tmp_path / "good.png")
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), str(tmp_path), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    logged = [record for record in caplog.records if record.levelno >= 30 and "broken.png" in record.getMessage()]
    assert err.count("broken.png") + len(logged) == 1, (err, logged)


@pytest.mark.slow
@pytest.mark.parametrize("command", [["report", "--out"], ["export", "--format", "torchscript", "--out"]])
def test_report_and_export_never_write_over_the_runs_own_files(finished_run, tmp_path, capsys, command):
    data, original = finished_run
    run_dir = shutil.copytree(original, tmp_path / "run")
    for name in (CONFIG_FILE, "best.safetensors"):
        before = (run_dir / name).read_bytes()
        capsys.readouterr()
        status = main([command[0], "--run", str(run_dir), *command[1:], str(run_dir / name)])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and name in err, err
        assert (run_dir / name).read_bytes() == before

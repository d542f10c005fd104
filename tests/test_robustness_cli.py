"""Bad command lines: exit status 2 and ONE line on stderr naming the culprit, never a traceback;
``--debug`` shows the traceback. (Config validation itself is tested in test_config.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from visiontune.cli import main
from visiontune.errors import ConfigError

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--device", "cpu", "--quiet"]


def _args(tmp_path, case: str) -> tuple[list[str], list[str]]:
    """The command line of ``case`` and words its message must contain."""
    data = str(tmp_path / "data")  # never read: every case fails before the data is looked at
    out = ["--out", str(tmp_path / "run")]
    if case == "unknown flag":
        return ["train", "--data", data, *TINY, "--lerning-rate", "0.1"], ["unrecognized", "--lerning-rate"]
    if case == "negative epochs":
        return ["train", "--data", data, *TINY, "--epochs", "-3", *out], ["epochs", "-3"]
    if case == "batch size 0":
        return ["train", "--data", data, *TINY, "--batch-size", "0", *out], ["batch_size", "0"]
    if case == "lr not a number":
        return ["train", "--data", data, *TINY, "--lr", "abc", *out], ["lr", "'abc'"]
    if case == "unknown choice":
        return ["train", "--data", data, *TINY, "--strategy", "everything", *out], ["everything", "linear-probe"]
    if case == "unknown config key":
        config = tmp_path / "train.yaml"
        config.write_text("epochs: 2\nlearning_rate: 0.1\n")
        return ["train", "--data", data, *TINY, "--config", str(config), *out], ["learning_rate", "valid keys"]
    if case == "output folder is a file":
        (tmp_path / "data").mkdir()
        taken = tmp_path / "results.txt"
        taken.write_text("mine")
        return ["train", "--data", data, *TINY, "--out", str(taken)], [str(taken), "is a file"]
    if case == "unknown command":
        return ["trian", "--data", data], ["trian"]
    raise AssertionError(case)


CASES = ["unknown flag", "negative epochs", "batch size 0", "lr not a number", "unknown choice", "unknown config key",
         "output folder is a file", "unknown command"]


def _run_main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors exit from inside parse_args
        return exit.code


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    argv, words = _args(tmp_path, case)
    status = _run_main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()
    if case == "output folder is a file":
        assert (tmp_path / "results.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    argv, _ = _args(tmp_path, "lr not a number")
    with pytest.raises(ConfigError, match="abc"):
        main(["--debug", *argv])


@pytest.mark.slow
def test_the_real_process_prints_one_line_and_exits_2(tmp_path):
    """The same through ``python -m visiontune``, the entry point users run."""
    argv, _ = _args(tmp_path, "negative epochs")
    plain = subprocess.run([sys.executable, "-m", "visiontune", *argv], capture_output=True, text=True, timeout=300,
                           check=False)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    assert "Traceback" not in plain.stderr and "epochs" in plain.stderr


def test_a_huge_value_in_a_usage_error_is_cut(capsys):
    # argparse quotes the bad value whole; a pasted 5,000-character value must not become the message
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--nproc", "a" * 5000])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and len(error.strip().splitlines()) == 1
    assert "--nproc" in error and len(error) < 400


def test_an_allocation_the_machine_cannot_make_is_one_line(monkeypatch, capsys):
    # torch's CPU allocator reports a request larger than the machine as a RuntimeError
    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 384000000000 bytes. Error code 12 (Cannot allocate memory)")

    def huge_request(args):
        raise refusal

    monkeypatch.setattr("visiontune.commands.models.run", huge_request)
    assert main(["models"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "357.6 GiB" in error and "--num-classes" in error
    monkeypatch.setattr("visiontune.commands.models.run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other RuntimeErrors stay visible as the bugs they are
        main(["models"])


def test_predict_on_nothing_readable_is_one_line_naming_the_first_file(tmp_path, capsys, monkeypatch):
    # not a list of skipped files followed by the error: the error alone, with the first culprit
    garbage = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in garbage:
        path.write_bytes(b"not an image")
    monkeypatch.setattr("visiontune.run.loaded.load_run", lambda *args, **kwargs: object())
    monkeypatch.setattr("visiontune.run.inference.predict_images",
                        lambda run, images, **kwargs: ([], [(str(path), "not an image file") for path in images]))
    assert main(["predict", "--run", str(tmp_path), *map(str, garbage)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "none of the 2 image(s)" in error and "a.png" in error

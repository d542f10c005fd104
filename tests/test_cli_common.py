"""The run arguments evaluate, predict and export share: one definition, one-line usage errors."""

from __future__ import annotations

import pytest

from visiontune.cli import COMMAND_MODULES, build_parser, main


def _exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors exit from inside parse_args
        return exit.code


@pytest.mark.parametrize("argv, words", [
    (["predict", "--run", "RUN", "--batch-size", "0", "x.png"], ["--batch-size", "at least 1, got 0"]),
    (["predict", "--run", "RUN", "--top-k", "-2", "x.png"], ["--top-k", "at least 1, got -2"]),
    (["predict", "--run", "RUN", "--batch-size", "abc", "x.png"], ["--batch-size", "whole number", "'abc'"]),
    (["evaluate", "--run", "RUN", "--data", "D", "--batch-size", "0"], ["--batch-size", "at least 1, got 0"]),
    (["evaluate", "--run", "RUN", "--data", "D", "--device", "tpu"], ["--device", "'tpu'", "cuda"]),
    (["export", "--run", "RUN", "--checkpoint", "newest"], ["--checkpoint", "'newest'", "best", "last"]),
    (["evaluate", "--data", "D"], ["--run"]),
], ids=["batch-size-0", "top-k-negative", "batch-size-text", "evaluate-batch-size-0", "device", "checkpoint", "no-run"])
def test_bad_run_arguments_are_one_line_usage_errors_before_anything_is_read(argv, words, capsys):
    assert _exit_status(argv) == 2  # RUN does not exist: the value was refused before it was looked for
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize("command, batch_size", [("evaluate", 64), ("predict", 32)])
def test_evaluate_and_predict_share_the_run_arguments_with_their_own_batch_default(command, batch_size):
    extra = ["--data", "D"] if command == "evaluate" else ["x.png"]
    args = build_parser().parse_args([command, "--run", "RUN", *extra])
    assert (args.run, args.checkpoint, args.batch_size, args.device) == ("RUN", "best", batch_size, "auto")
    args = build_parser().parse_args([command, "--run", "RUN", "--checkpoint", "last", "--batch-size", "5",
                                      "--device", "cpu", *extra])
    assert (args.checkpoint, args.batch_size, args.device) == ("last", 5, "cpu")


def test_every_command_is_offered():
    help_text = build_parser().format_help()
    for name in COMMAND_MODULES:
        assert name.replace("_", "-") in help_text

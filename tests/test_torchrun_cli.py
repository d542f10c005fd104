"""Issue 11 item 8: every visiontune command line reaches visiontune unchanged through torchrun,
and abbreviated flags are refused by visiontune's own parsers.

torchrun parses its own flags with argparse's default ``allow_abbrev=True``, before the module
name, over the WHOLE command line: a visiontune flag that is a prefix of two of torchrun's flags
(``--run`` of ``--run-path`` and ``--run_path``) stops torchrun with "ambiguous option". These
tests ask torchrun's real parser about every flag of every sub-command, and about every torchrun
command the README documents, so a new flag or a new README example that collides fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

import visiontune
from conftest import make_image_folder
from visiontune import distributed
from visiontune.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
TORCHRUN_PREFIX = ["--standalone", "--nproc_per_node", "2", "-m", "visiontune"]
# Flags that have no meaning inside torchrun: `train --nproc N` STARTS torchrun (and is stripped
# from the command it relaunches), so it never appears after `torchrun ... -m visiontune`.
LAUNCHER_ONLY_FLAGS = {"--nproc"}


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def _torchrun_passes_on(arguments: list[str]) -> list[str] | None:
    """What torchrun hands to ``python -m visiontune``, or None when torchrun's parser refuses."""
    try:
        parsed = get_args_parser().parse_args([*TORCHRUN_PREFIX, *arguments])
    except SystemExit:
        return None
    return parsed.training_script_args


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_visiontune_parsers_refuse_abbreviations():
    assert build_parser().allow_abbrev is False
    for name, parser in _subcommand_parsers().items():
        assert parser.allow_abbrev is False, name
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["evaluate", "--ru", "RUN", "--data", "DIR"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", sorted(_subcommand_parsers()))
def test_every_flag_has_a_spelling_that_torchrun_passes_on_unchanged(command, capsys):
    """Each flag of each sub-command, as ``--flag value`` and ``--flag=value``, in at least one of
    its spellings (``--run`` collides; its alias ``--run-dir`` does not)."""
    for action in _flag_actions(_subcommand_parsers()[command]):
        if set(action.option_strings) & LAUNCHER_ONLY_FLAGS:
            continue
        working = [
            flag for flag in action.option_strings
            if _torchrun_passes_on([command, flag, "x"]) == [command, flag, "x"]
            and _torchrun_passes_on([command, f"{flag}=x"]) == [command, f"{flag}=x"]
        ]
        capsys.readouterr()  # torchrun's usage errors for the colliding spellings
        assert working, f"visiontune {command} {'/'.join(action.option_strings)}: torchrun refuses every spelling"


def _readme_torchrun_commands() -> list[list[str]]:
    """Every `torchrun ... -m visiontune ...` command in the README's code blocks, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)  # shell line continuations
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("torchrun ") and "-m visiontune" in line:
                commands.append(line.split()[1:])
    return commands


def test_every_torchrun_command_in_the_readme_reaches_visiontune_intact():
    commands = _readme_torchrun_commands()
    assert any("evaluate" in command for command in commands), "the README documents distributed evaluate"
    for command in commands:
        parsed = get_args_parser().parse_args(command)  # SystemExit here: torchrun refuses it
        assert parsed.module and parsed.training_script == "visiontune"
        visiontune_argv = parsed.training_script_args
        assert command[-len(visiontune_argv):] == visiontune_argv
        build_parser().parse_args(visiontune_argv)  # and visiontune accepts what it receives


def test_the_nproc_launcher_passes_colliding_flags_through():
    """`visiontune train --nproc N` calls torchrun's parser without abbreviations."""
    argv = ["evaluate", "--run", "RUN", "--data=DIR"]
    parsed = distributed.parse_torchrun_arguments(distributed.torchrun_arguments(2, argv))
    assert parsed.training_script_args == argv
    assert parsed.nproc_per_node == "2" and parsed.standalone


# -- evaluate and predict under torchrun: two gloo processes give one process's answer ----------

TINY_RUN = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--seed", "0", "--device", "cpu", "--quiet", "--strategy", "linear-probe", "--epochs", "1"]
# 16 files (15 images and one unreadable) in batches of 4: rank 0 takes batches 0 and 2, rank 1
# batches 1 and 3, and the unreadable file lands on one rank only.
EVAL_BATCH = "4"


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun_eval")
    data = make_image_folder(root / "data", per_class=4, val_per_class=5)
    (data / "val" / "green" / "green_broken.png").write_bytes(b"not a png")
    assert main(["train", "--data", str(data), *TINY_RUN, "--out", str(root / "run")]) == 0
    return root, root / "run", data / "val"


def _environment() -> dict[str, str]:
    source = str(Path(visiontune.__file__).parents[1])  # the package under test, installed or not
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


def _one_process(capsys, argv: list[str]):
    """``visiontune ARGV`` in this process with one intra-op thread, as each torchrun process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)


def _two_processes(root: Path, argv: list[str]):
    """The documented form: ``torchrun --standalone --nproc_per_node 2 -m visiontune ARGV``."""
    command = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN_PREFIX, *argv]
    done = subprocess.run(command, cwd=root, env=_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # rank 0 alone prints: stdout is one JSON document


@pytest.mark.slow
def test_torchrun_evaluate_gives_the_one_process_metrics(run_and_images, capsys):
    root, run_dir, val = run_and_images
    argv = ["evaluate", "--run-dir", str(run_dir), "--data", str(val), "--batch-size", EVAL_BATCH, "--json"]
    one, two = _one_process(capsys, argv), _two_processes(root, argv)
    assert two["num_images"] == one["num_images"] == 15
    assert [item["path"] for item in two["skipped"]] == [str(val / "green" / "green_broken.png")]
    # Each batch's logits are bit-identical (same images, same batch, one thread), so every count
    # and ratio is equal. The loss is a float64 sum of the same 4 per-batch sums added in another
    # order ((b0+b2)+(b1+b3) against ((b0+b1)+b2)+b3): each addition rounds by at most 2**-53
    # of the running total, so they may differ by 4 such roundings, no more.
    loss_one, loss_two = one.pop("loss"), two.pop("loss")
    assert loss_two == pytest.approx(loss_one, rel=4 * 2**-53, abs=0)
    assert two == one


@pytest.mark.slow
def test_torchrun_predict_gives_the_one_process_predictions_in_order(run_and_images, capsys):
    root, run_dir, val = run_and_images
    argv = ["predict", "--run-dir", str(run_dir), str(val), "--batch-size", EVAL_BATCH, "--top-k", "3", "--json"]
    one, two = _one_process(capsys, argv), _two_processes(root, argv)
    assert len(one) == 15
    assert two == one  # same batches, so the same probabilities bit for bit, and the input order


@pytest.mark.parametrize("world, items, batch", [(2, 16, 4), (2, 15, 4), (3, 10, 4), (4, 3, 2), (2, 0, 4)])
def test_batch_shards_take_whole_batches_and_cover_every_item_once(monkeypatch, world, items, batch):
    shares = []
    for rank in range(world):
        monkeypatch.setattr("visiontune.distributed.sharding.world_size", lambda: world)
        monkeypatch.setattr("visiontune.distributed.sharding.rank", lambda rank=rank: rank)
        shares.append(distributed.shard_batches(items, batch))
    assert sorted(index for share in shares for index in share) == list(range(items))
    one_process_batches = [list(range(start, min(start + batch, items))) for start in range(0, items, batch)]
    for rank, share in enumerate(shares):
        # Batching the share with the same size gives exactly one process's batches r, r+W, ...
        assert [share[start:start + batch] for start in range(0, len(share), batch)] == one_process_batches[rank::world]

"""Crash anywhere, lose nothing: a training process killed (SIGKILL) at seeded random moments, once
in the middle of writing last.ckpt, always leaves a loadable last.ckpt and best.safetensors, and
the resumed run ends bit-identical to one that was never interrupted; SIGINT stops cleanly.
Numerical trouble (NaN/inf loss, CUDA out of memory) stops with a clear message.

The in-process interrupt-and-resume of a two-phase run is tested in test_resume.py.
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.run.folder import load_training_state
from visiontune.run.loaded import load_run

SRC = Path(__file__).resolve().parents[1] / "src"
RECIPE = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0",
          "--seed", "5", "--device", "cpu", "--precision", "fp32", "--quiet", "--epochs", "8", "--lr", "0.002",
          "--warmup-epochs", "0.5"]
TIMING_COLUMNS = ("seconds", "images_per_s")
WAIT_LIMIT = 300  # seconds for any one thing to happen in a child process (a loaded CI machine is slow)

# A child that writes half of its next torch.save, then hangs: the test kills it mid-checkpoint-write.
HALF_WRITE_THEN_HANG = r"""
import io, sys, time
import torch

real_save = torch.save

def save_half_then_hang(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    with open(f, "wb") as handle:
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
    time.sleep(600)

torch.save = save_half_then_hang
from visiontune.cli import main
sys.exit(main(sys.argv[1:]))
"""


# A child whose every training step takes at least STEP_SECONDS longer (the arithmetic is untouched), so
# that a kill drawn within one epoch's duration always lands while it is still training, however
# fast or loaded the machine is.
STEP_SECONDS = 0.2
STEPS_PER_EPOCH = 2  # 8 training images (2 classes x 4) in batches of 4
SLOW_STEPS = rf"""
import sys, time
import visiontune.training.loops

real_loss = visiontune.training.loops.compute_loss

def slow_loss(*args, **kwargs):
    time.sleep({STEP_SECONDS})
    return real_loss(*args, **kwargs)

visiontune.training.loops.compute_loss = slow_loss
from visiontune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(argv: list[str], *, half_write: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as the in-process reference
    entry = ["-c", HALF_WRITE_THEN_HANG if half_write else SLOW_STEPS]
    # A child inherits an ignored SIGINT (from a background CI shell), and Python then installs no
    # KeyboardInterrupt handler: give it the default back so the Ctrl-C step means something.
    return subprocess.Popen([sys.executable, *entry, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509


def _epochs_logged(run_dir: Path) -> int:
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the child exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _stop(process: subprocess.Popen, sig: int) -> tuple[int, str]:
    assert process.poll() is None, "the child finished before it could be interrupted"
    process.send_signal(sig)
    _, err = process.communicate(timeout=WAIT_LIMIT)
    return process.returncode, err


def _assert_nothing_lost(run_dir: Path, saved_epochs: int) -> int:
    """last.ckpt and best.safetensors load, and hold at least every epoch saved before the kill."""
    state = load_training_state(run_dir)
    assert state["epoch"] >= saved_epochs >= 1
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
    best = load_run(run_dir)  # best.safetensors through the same path evaluate and predict use
    assert best.classes == ["green", "red"]
    load_run(run_dir, checkpoint="last")
    return state["epoch"]


def _metrics(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]


@pytest.mark.slow
def test_killed_at_random_moments_nothing_is_lost_and_resume_is_bit_identical(tmp_path):
    rng = random.Random(20240607)
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    assert main(["train", "--data", str(data), *RECIPE, "--out", str(straight)]) == 0
    # Random moments are drawn within the shortest time a child's epoch can take, so each kill lands
    # while the child is still training, in the epoch after the one just logged or so.
    epoch_seconds = STEP_SECONDS * STEPS_PER_EPOCH

    def random_moment() -> None:
        time.sleep(rng.uniform(0.0, 0.9) * epoch_seconds)

    # 1. SIGKILL at a random moment of the second epoch (the first one is saved).
    child = _launch(["train", "--data", str(data), *RECIPE, "--out", str(run_dir)])
    _wait_for(lambda: _epochs_logged(run_dir) >= 1, child, "epoch 1")
    random_moment()
    logged = _epochs_logged(run_dir)
    status, _ = _stop(child, signal.SIGKILL)
    assert status == -signal.SIGKILL
    saved = _assert_nothing_lost(run_dir, logged)

    # 2. SIGKILL while last.ckpt is being written (half of it is on disk in the temporary file).
    child = _launch(["train", "--resume", str(run_dir)], half_write=True)
    _wait_for(lambda: any(path.stat().st_size > 0 for path in run_dir.glob(".last.ckpt.*.tmp")), child,
              "the checkpoint write")
    _stop(child, signal.SIGKILL)
    assert _assert_nothing_lost(run_dir, saved) == saved  # the half-written epoch never replaced the good one

    # 3. SIGKILL at another random moment of the resumed run.
    child = _launch(["train", "--resume", str(run_dir)])
    target = saved + 1
    _wait_for(lambda: _epochs_logged(run_dir) >= target, child, f"epoch {target}")
    random_moment()
    logged = _epochs_logged(run_dir)
    _stop(child, signal.SIGKILL)
    saved = _assert_nothing_lost(run_dir, logged)

    # 4. Ctrl-C: a clean stop, exit status 130, and the way to continue on stderr.
    child = _launch(["train", "--resume", str(run_dir)])
    _wait_for(lambda: _epochs_logged(run_dir) >= saved + 1, child, f"epoch {saved + 1}")
    random_moment()
    logged = _epochs_logged(run_dir)
    status, err = _stop(child, signal.SIGINT)
    assert status == 130 and "Traceback" not in err and f"--resume {run_dir}" in err, err
    _assert_nothing_lost(run_dir, logged)

    # 5. Resume to the end: the same weights, bit for bit, as the run that was never interrupted.
    assert main(["train", "--resume", str(run_dir)]) == 0
    expected = torch.load(straight / "last.ckpt", weights_only=True)
    resumed = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 8 and resumed["step"] == expected["step"]
    assert expected["model"].keys() == resumed["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert (straight / "best.safetensors").read_bytes() == (run_dir / "best.safetensors").read_bytes()
    assert _metrics(straight) == _metrics(run_dir)


# --- numerical trouble ------------------------------------------------------------------------------

SMALL = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0",
         "--seed", "0", "--device", "cpu", "--quiet"]


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import visiontune.training.loops

    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    real_loss, calls = visiontune.training.loops.compute_loss, []

    def poisoned_after_epoch_1(outputs, targets, loss_fn):
        calls.append(1)
        loss = real_loss(outputs, targets, loss_fn)
        return loss * float("nan") if len(calls) > 2 else loss  # 8 images in batches of 4: 2 steps an epoch

    monkeypatch.setattr(visiontune.training.loops, "compute_loss", poisoned_after_epoch_1)
    run_dir = tmp_path / "run"
    status = main(["train", "--data", str(data), *SMALL, "--epochs", "3", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "epoch 2" in err and "nan" in err and "--lr" in err and "last.ckpt" in err and "epoch 1" in err
    state = load_training_state(run_dir)
    assert state["epoch"] == 1 and len(_metrics(run_dir)) == 1
    best = load_run(run_dir).model.state_dict()
    for key, value in state["model"].items():
        assert torch.isfinite(value.float()).all() and torch.equal(best[key], value), key


def test_a_learning_rate_that_explodes_stops_with_a_message(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    status = main(["train", "--data", str(data), *SMALL, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e10",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "not a finite number" in err and "learning rate" in err and "nothing was saved" in err
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_cuda_out_of_memory_becomes_advice_to_use_a_smaller_batch():
    from visiontune.device import out_of_memory_error
    from visiontune.errors import ConfigError

    fake = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 GiB total)\n"
                                       "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")
    error = out_of_memory_error(fake, 64)
    message = str(error)
    assert isinstance(error, ConfigError) and "\n" not in message
    assert "--batch-size 64" in message and "--batch-size 32" in message and "Tried to allocate 2.00 GiB" in message
    assert "--batch-size 0" not in str(out_of_memory_error(fake, 1))


def test_out_of_memory_during_training_reaches_the_user_as_one_line(tmp_path, capsys, monkeypatch):
    import visiontune.training.engine

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(visiontune.training.engine, "train_one_epoch", out_of_memory)
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=2, val_per_class=1)
    status = main(["train", "--data", str(data), *SMALL, "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "smaller batch" in err and "--batch-size 2" in err

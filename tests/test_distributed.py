"""Multi-process training (issue #6) on the CPU with gloo.

The library-level tests share ONE two-process launch (torch.multiprocessing.spawn, a module
fixture): each rank runs every scenario and saves what it saw; the tests compare that with the
same code run in this one process. Process start-up dominates the cost, so it is paid once.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from conftest import make_image_folder
from visiontune import distributed
from visiontune.cli import main
from visiontune.errors import ConfigError
from visiontune.metrics import ClassificationMetrics

WORLD = 2
GLOBAL_BATCH = 8
NUM_CLASSES = 3
VAL_SIZE = 11  # odd: the two shards differ in length


# -- the scenarios, run identically by each rank and by the single-process reference ----------


class SeededOrder(Sampler):
    """A stand-in for the engine's EpochSampler: a permutation fixed by seed + epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


def tiny_model() -> nn.Module:
    """Conv (frozen) -> BatchNorm (frozen, eval mode) -> linear head: what fine-tuning a head looks like."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, NUM_CLASSES))
    with torch.no_grad():  # non-trivial running statistics, so a BN that moved would show
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    for param in [*model[0].parameters(), *model[1].parameters()]:
        param.requires_grad_(False)
    return model


def tiny_data(size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(size, 3, 8, 8, generator=generator),
                         torch.randint(0, NUM_CLASSES, (size,), generator=generator))


def train_tiny() -> dict:
    """Two epochs of SGD with momentum on 24 images, global batch 8; returns the final weights."""
    dataset = tiny_data(24, seed=1)
    model = tiny_model()
    sampler = distributed.shard_sampler(SeededOrder(len(dataset), seed=3))
    loader = DataLoader(dataset, batch_size=distributed.per_process_batch_size(GLOBAL_BATCH), sampler=sampler)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.2, momentum=0.9, weight_decay=1e-4)
    ddp_model = distributed.wrap_ddp(model, "cpu")
    for epoch in range(2):
        sampler.set_epoch(epoch)  # a ShardedSampler passes it on to the seeded order
        ddp_model.train()
        model[1].eval()  # frozen BN keeps its statistics
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp_model(images), labels).backward()
            optimizer.step()
    info = ddp_model._get_ddp_logging_data() if ddp_model is not model else {}
    return {"state": {k: v.clone() for k, v in distributed.unwrap(ddp_model).state_dict().items()},
            "ddp_parameter_tensors": info.get("num_parameter_tensors")}


def evaluate_tiny() -> dict:
    """Metrics and per-image predictions of a fixed model on an odd-sized validation set."""
    dataset = tiny_data(VAL_SIZE, seed=2)
    model = tiny_model().eval()
    loader = DataLoader(dataset, batch_size=2, sampler=distributed.make_eval_sampler(dataset))
    metrics = ClassificationMetrics(NUM_CLASSES)
    predicted = []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            metrics.update(logits, labels)
            predicted.append(logits.argmax(dim=1))
    distributed.all_reduce_metrics(metrics)
    local = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    return {"metrics": metrics.compute(), "images_seen_here": len(local),
            "predictions": distributed.all_gather_shards(local, len(dataset))}


def batchnorm_buffers_after_training() -> dict:
    """A trainable BN: DDP must broadcast its buffers, and sync_buffers_from_main equalises them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    ddp_model = distributed.wrap_ddp(model, "cpu")
    images = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(10 + distributed.rank()))
    ddp_model(images).sum().backward()  # each rank's statistics now saw only its own batch
    distributed.sync_buffers_from_main(model)
    return {"forward_sync_buffers": getattr(ddp_model, "forward_sync_buffers", None),
            "running_mean": model[1].running_mean.clone()}


def _refuse_on_main() -> None:
    raise ConfigError(f"refused by rank {distributed.rank()}")


def main_process_helpers() -> dict:
    """on_main_process hands out rank 0's answer (or its error); ddp_view rewraps after unfreezing."""
    result = {"answer": distributed.on_main_process(lambda: f"rank {distributed.rank()} looked")}
    try:
        distributed.on_main_process(_refuse_on_main)
    except ConfigError as error:
        result["error"] = str(error)
    result["sums"] = distributed.sum_over_processes(1.0, distributed.rank())
    model = tiny_model()
    first = distributed.ddp_view(model, "cpu")
    result["reused"] = distributed.ddp_view(model, "cpu") is first
    model[0].weight.requires_grad_(True)  # a new phase unfreezes a layer
    second = distributed.ddp_view(model, "cpu")
    result["rewrapped_parameter_tensors"] = (first._get_ddp_logging_data()["num_parameter_tensors"],
                                             second._get_ddp_logging_data()["num_parameter_tensors"])
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.session(backend="gloo", timeout_s=60) as created:
        result = {
            "created": created,
            "world_size": distributed.world_size(),
            "is_main": distributed.is_main_process(),
            "broadcast": distributed.broadcast_object(f"chosen by rank {distributed.rank()}"),
            "train": train_tiny(),
            "eval": evaluate_tiny(),
            "bn": batchnorm_buffers_after_training(),
            "helpers": main_process_helpers(),
        }
        try:
            distributed.per_process_batch_size(7)
        except ConfigError as error:
            result["odd_batch_error"] = str(error)
        distributed.barrier()
    result["initialized_after_session"] = torch.distributed.is_initialized()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# -- two processes against one -------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one_with_the_same_global_batch(two_ranks):
    reference = train_tiny()["state"]
    initial = tiny_model().state_dict()
    assert not torch.equal(reference["7.weight"], initial["7.weight"])  # it did train
    for result in two_ranks:
        state = result["train"]["state"]
        assert set(state) == set(reference)  # unwrapped: no "module." prefixes
        for name, value in reference.items():
            assert (state[name].double() - value.double()).abs().max() <= 1e-5, name
        for name in ("0.weight", "1.weight", "1.running_mean", "1.running_var"):
            assert torch.equal(state[name], initial[name]), f"frozen {name} changed"


@pytest.mark.slow
def test_frozen_parameters_are_not_handed_to_ddp(two_ranks):
    trainable = sum(param.requires_grad for param in tiny_model().parameters())
    assert trainable == 4
    for result in two_ranks:
        assert result["train"]["ddp_parameter_tensors"] == trainable


@pytest.mark.slow
def test_two_process_evaluation_of_an_odd_sized_set_equals_one_process(two_ranks):
    reference = evaluate_tiny()
    assert reference["metrics"]["num_images"] == VAL_SIZE
    assert sorted(result["eval"]["images_seen_here"] for result in two_ranks) == [5, 6]  # no padding
    for result in two_ranks:
        metrics = dict(result["eval"]["metrics"])
        expected = dict(reference["metrics"])
        # The loss sums float32 per-batch sums over differently grouped batches (so it agrees to
        # float32 precision); everything else is a count and must agree exactly.
        assert metrics.pop("loss") == pytest.approx(expected.pop("loss"), rel=1e-6)
        assert metrics == expected
        assert torch.equal(result["eval"]["predictions"], reference["predictions"])


@pytest.mark.slow
def test_process_group_basics(two_ranks):
    assert [result["is_main"] for result in two_ranks] == [True, False]
    for result in two_ranks:
        assert result["created"] and result["world_size"] == WORLD
        assert result["broadcast"] == "chosen by rank 0"
        assert "multiple of 2" in result["odd_batch_error"]
        assert result["initialized_after_session"] is False  # the session left the group


@pytest.mark.slow
def test_main_process_decides_and_its_errors_reach_every_rank(two_ranks):
    for result in two_ranks:
        helpers = result["helpers"]
        assert helpers["answer"] == "rank 0 looked"
        assert helpers["error"] == "refused by rank 0"
        assert helpers["sums"] == [2.0, 1.0]
        assert helpers["reused"] is True
        assert helpers["rewrapped_parameter_tensors"] == (4, 5)


@pytest.mark.slow
def test_trainable_batchnorm_buffers_are_kept_in_step(two_ranks):
    assert all(result["bn"]["forward_sync_buffers"] is True for result in two_ranks)
    assert torch.equal(two_ranks[0]["bn"]["running_mean"], two_ranks[1]["bn"]["running_mean"])
    assert not torch.equal(two_ranks[0]["bn"]["running_mean"], torch.zeros(2))


# -- one process: everything is the single-process answer ---------------------------------------


def test_not_launched_by_torchrun_everything_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() is False
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    distributed.barrier()
    tensor = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    assert distributed.broadcast_object("x") == "x"
    model = nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, "cpu") is model
    base = SeededOrder(5, seed=0)
    assert distributed.shard_sampler(base) is base
    assert distributed.per_process_batch_size(7) == 7


def test_one_process_torchrun_world_does_not_create_a_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launched_by_torchrun()
    assert distributed.init_from_env() is False
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 11, 12])
def test_eval_shards_cover_every_index_exactly_once(world, size):
    shards = [list(distributed.ShardedSampler(range(size), rank, world, pad=False)) for rank in range(world)]
    assert sorted(index for shard in shards for index in shard) == list(range(size))
    assert [len(shard) for shard in shards] == [len(distributed.ShardedSampler(range(size), r, world, pad=False))
                                                for r in range(world)]


def test_train_shards_are_padded_to_equal_length_and_follow_the_epoch():
    base = SeededOrder(11, seed=5)
    shards = [distributed.ShardedSampler(base, rank, 3) for rank in range(3)]
    for epoch in (0, 1):
        for shard in shards:
            shard.set_epoch(epoch)
        order = list(base)
        lists = [list(shard) for shard in shards]
        assert [len(items) for items in lists] == [4, 4, 4] == [len(shard) for shard in shards]
        padded = order + order[:1]
        assert [item for step in zip(*lists) for item in step] == padded  # global order = base order
    assert lists[0] != list(distributed.ShardedSampler(SeededOrder(11, 5), 0, 3))  # epoch 1 != epoch 0


def test_interleave_shards_restores_dataset_order():
    total, world = 7, 3
    rows = -(-total // world)
    stacked = torch.full((world, rows), -1)
    for rank in range(world):
        shard = torch.arange(rank, total, world)
        stacked[rank, : len(shard)] = shard
    assert distributed.interleave_shards(stacked, total).tolist() == list(range(total))


def test_sync_bn_needs_cuda():
    with pytest.raises(ConfigError, match="--sync-bn"):
        distributed.convert_sync_batchnorm(nn.BatchNorm2d(2), "cpu")


def test_torchrun_arguments_strip_nproc_so_workers_do_not_relaunch():
    arguments = distributed.torchrun_arguments(2, ["train", "data", "--nproc", "2", "--epochs", "1", "--nproc=2"])
    assert arguments == ["--standalone", "--nproc_per_node=2", "-m", "visiontune", "train", "data", "--epochs", "1"]
    with pytest.raises(ConfigError):
        distributed.torchrun_arguments(0, ["train"])


# -- through the real engine: torchrun -m visiontune train ----------------------------------------

# Head-only training with frozen BatchNorm and no augmentation: one process and two must agree.
# 24 training images = 3 global batches of 8; 9 validation images (odd) for the shards.
# float32 pinned: "auto" is bf16 on CPUs with AVX-512 BF16 or AMX, whose 8-bit mantissa rounds the
# half-batch gradient sums of two processes differently from the whole batch's (6.5e-5 apart in the
# weights), which is bf16 at work, not the process group.
ENGINE_RECIPE = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
                 "--workers", "0", "--seed", "0", "--device", "cpu", "--strategy", "linear-probe",
                 "--augment", "none", "--epochs", "2", "--lr", "0.01", "--warmup-epochs", "0", "--precision", "fp32"]
TIMING_COLUMNS = ("seconds", "images_per_s")

# Rank 1 is killed (SIGKILL: no Python clean-up at all) as it starts its second epoch, after the
# first epoch's checkpoint is complete.
KILL_RANK_1_IN_EPOCH_2 = """
    import os, signal, sys
    from visiontune.training import engine as engine
    from visiontune.cli import main

    original, calls = engine.train_one_epoch, []

    def train_one_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    engine.train_one_epoch = train_one_epoch
    sys.exit(main(sys.argv[1:]))
"""


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import visiontune

    source = str(Path(visiontune.__file__).parents[1])  # the package under test, installed or not
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *arguments]


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory) -> dict:
    """One single-process run, one straight two-process run, and one two-process run whose rank 1
    is killed in epoch 2 and which is then resumed with ``visiontune train --nproc 2 --resume``."""
    root = tmp_path_factory.mktemp("engine")
    data = make_image_folder(root / "data", per_class=8, val_per_class=3)
    recipe = ["train", "--data", str(data), *ENGINE_RECIPE, "--quiet"]
    assert main([*recipe, "--out", str(root / "one")]) == 0
    straight = _run(_torchrun("-m", "visiontune", *recipe[:-1], "--out", "two"), cwd=root)
    script = root / "kill_rank_1.py"
    script.write_text(textwrap.dedent(KILL_RANK_1_IN_EPOCH_2))
    killed = _run(_torchrun(str(script), *recipe, "--out", "killed"), cwd=root)
    killed_state = torch.load(root / "killed" / "last.ckpt", weights_only=True)
    resumed = _run([sys.executable, "-m", "visiontune", "train", "--nproc", str(WORLD), "--resume", "killed"], cwd=root)
    return {"root": root, "straight": straight, "killed": killed, "killed_epoch": killed_state["epoch"],
            "resumed": resumed}


def _final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", weights_only=True)["model"]


def _max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_torchrun_engine_run_trains_the_same_weights_and_metrics_as_one_process(engine_runs):
    root, straight = engine_runs["root"], engine_runs["straight"]
    assert straight.returncode == 0, straight.stderr[-3000:]
    # In float32 the processes differ only in the order gradients are summed (two half-batch sums
    # all-reduced vs one batch sum): a few eps32 (1.2e-7) relative per step, on weights below 0.1,
    # over 6 steps: ~1e-8 (7e-9 measured). 1e-6 leaves 100x for other kernels and thread counts.
    assert _max_difference(_final_weights(root / "one"), _final_weights(root / "two")) <= 1e-6
    one_rows, two_rows = _csv_rows(root / "one" / "metrics.csv"), _csv_rows(root / "two" / "metrics.csv")
    assert len(one_rows) == len(two_rows) == 2
    for one, two in zip(one_rows, two_rows):
        for column in one:
            if column in ("epoch", "phase", "val_acc", "train_acc", "val_macro_f1"):
                assert one[column] == two[column], column  # counts over all 24 / 9 images, reduced
            elif column not in TIMING_COLUMNS and one[column]:
                assert float(one[column]) == pytest.approx(float(two[column]), rel=1e-4), column
    # every validation image exactly once, in order, with the same prediction
    one_predictions = _csv_rows(root / "one" / "val_predictions.csv")
    two_predictions = _csv_rows(root / "two" / "val_predictions.csv")
    assert len(two_predictions) == 9
    assert [(row["path"], row["predicted"]) for row in one_predictions] == \
           [(row["path"], row["predicted"]) for row in two_predictions]
    one_final = json.loads((root / "one" / "report.json").read_text())["final"]
    two_final = json.loads((root / "two" / "report.json").read_text())["final"]
    assert two_final["num_images"] == 9
    assert (two_final["confusion"], two_final["accuracy"]) == (one_final["confusion"], one_final["accuracy"])
    # The head-only phase trains on cached features in both (built shard-wise and gathered in two).
    one_cache = torch.load(root / "one" / "last.ckpt", weights_only=True).get("feature_cache")
    two_cache = torch.load(root / "two" / "last.ckpt", weights_only=True).get("feature_cache")
    assert two_cache == one_cache


@pytest.mark.slow
def test_only_rank_0_prints_and_writes_one_run_folder(engine_runs):
    root, straight = engine_runs["root"], engine_runs["straight"]
    assert straight.stdout.count("run folder:") == 1
    assert straight.stdout.count("epoch   1/2") == 1
    assert sorted(path.name for path in root.iterdir()) == ["data", "kill_rank_1.py", "killed", "one", "two"]
    one_files = sorted(path.name for path in (root / "one").iterdir())
    assert sorted(path.name for path in (root / "two").iterdir()) == one_files  # no temporary leftovers


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_run_resumes_with_nproc(engine_runs):
    root, killed, resumed = engine_runs["root"], engine_runs["killed"], engine_runs["resumed"]
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr  # torchrun names the failed process and why
    assert engine_runs["killed_epoch"] == 1  # the complete checkpoint of the epoch before
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("run folder:") == 1
    assert torch.load(root / "killed" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert _max_difference(_final_weights(root / "killed"), _final_weights(root / "two")) <= 1e-6

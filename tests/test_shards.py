"""WebDataset shards (issue 17): visiontune shard, streaming epochs, disjoint readers, exact resume."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import make_image, make_image_folder
from visiontune import distributed
from visiontune.cli import main
from visiontune.commands.train import ConsoleReporter
from visiontune.data.shard_stream import ShardStream
from visiontune.data.shards import SHARD_INDEX, is_shard_source, iter_shard, open_shards

TINY = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--quiet", "--seed", "1"]


class KeyStream(ShardStream):
    """The stream's samples as ``url#key`` (module level: spawned processes unpickle it)."""

    def _prepared(self, sample, seed):
        return f"{sample['__url__']}#{sample['__key__']}"


def write_equal_shards(root: Path, shards: int = 4, per_shard: int = 6) -> str:
    """``shards`` shards of ``per_shard`` colour images each (label = index % 2), with classes.json."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for shard in range(shards):
        name = f"train-{shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for index in range(per_shard):
                label = (shard * per_shard + index) % 2
                path = make_image(root / "tmp.png", (200, 30, 30) if label else (30, 30, 200), size=8,
                                  noise_seed=shard * 100 + index)
                writer.write({"__key__": f"s{shard}i{index}", "png": path.read_bytes(), "cls": str(label).encode()})
        counts[name] = per_shard
    (root / "tmp.png").unlink()
    (root / SHARD_INDEX).write_text(json.dumps({"classes": ["blue", "red"], "shards": counts}))
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


def test_shard_patterns_are_recognised():
    assert is_shard_source("shards/train-{000000..000009}.tar")
    assert is_shard_source("pipe:aws s3 cp s3://bucket/train-000001.tar -")
    assert is_shard_source("https://host/train-000001.tar")
    assert not is_shard_source("data/") and not is_shard_source("labels.csv") and not is_shard_source("hf:x")


def test_an_epoch_is_a_sample_count_and_a_pure_function_of_seed_and_epoch(tmp_path):
    pattern = write_equal_shards(tmp_path / "shards")
    shards = open_shards(pattern)
    assert shards.total == 24 and shards.classes == ["blue", "red"]
    stream = KeyStream(shards, None, seed=5, epoch_samples=16, shuffle_buffer=4)
    epochs = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        epochs.append(list(stream))
    assert [len(keys) for keys in epochs] == [16, 16, 16]
    # 48 samples = two passes over 24: every sample exactly twice, each epoch's samples distinct
    everything = [key for keys in epochs for key in keys]
    assert all(everything.count(key) == 2 for key in set(everything)) and len(set(everything)) == 24
    assert all(len(set(keys)) == 16 for keys in epochs)
    fresh = KeyStream(shards, None, seed=5, epoch_samples=16, shuffle_buffer=4)
    fresh.set_epoch(2)  # a resume straight into epoch 2 skips epochs 0-1 by shard counts
    assert list(fresh) == epochs[2]
    reseeded = KeyStream(shards, None, seed=6, epoch_samples=16, shuffle_buffer=4)
    assert list(reseeded) != epochs[0]


def test_loader_workers_read_disjoint_shards(tmp_path):
    shards = open_shards(write_equal_shards(tmp_path / "shards"))
    stream = KeyStream(shards, None, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    keys = list(loader)
    assert sorted(keys) == sorted(f"{url}#s{s}i{i}" for s, url in enumerate(shards.urls) for i in range(6))
    by_worker = [set(keys[0::2]), set(keys[1::2])]  # the loader alternates between its two workers
    shards_of = [{key.split("#")[0] for key in worker} for worker in by_worker]
    assert not shards_of[0] & shards_of[1]


def _rank_worker(rank: int, port: int, pattern: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.session(backend="gloo", timeout_s=60):
        stream = KeyStream(open_shards(pattern), None, seed=0, rank=distributed.rank(),
                           world=distributed.world_size())
        seen = []
        for epoch in range(2):
            stream.set_epoch(epoch)
            seen.append(distributed.all_gather_objects(list(stream)))
    torch.save(seen, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_read_disjoint_shards_and_see_every_sample_once_per_epoch(tmp_path):
    pattern = write_equal_shards(tmp_path / "shards")
    torch.multiprocessing.spawn(_rank_worker, args=(_free_port(), pattern, str(tmp_path)), nprocs=2, join=True)
    seen = torch.load(tmp_path / "rank0.pt", weights_only=False)
    every = {f"{url}#s{s}i{i}" for s, url in enumerate(open_shards(pattern).urls) for i in range(6)}
    for per_rank in seen:  # one epoch, as gathered from both processes
        assert len(per_rank[0]) == len(per_rank[1]) == 12
        assert sorted(per_rank[0] + per_rank[1]) == sorted(every)
        assert not {key.split("#")[0] for key in per_rank[0]} & {key.split("#")[0] for key in per_rank[1]}


@pytest.mark.slow
def test_a_folder_and_its_shards_train_to_the_same_accuracy(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=8, val_per_class=3, size=16)
    assert main(["shard", "--data", str(data), "--out", str(tmp_path / "shards"), "--shard-size", "20KB"]) == 0
    printed = capsys.readouterr().out
    assert "24 training samples" in printed and "9 validation samples" in printed
    index = json.loads((tmp_path / "shards" / SHARD_INDEX).read_text())
    assert index["classes"] == ["blue", "green", "red"] and sum(index["shards"].values()) == 33
    for shard in index["shards"]:  # each shard's first sample names the classes itself
        first = next(iter_shard(str(tmp_path / "shards" / shard)))
        assert json.loads(first["json"])["classes"] == index["classes"]
    recipe = [*TINY, "--epochs", "4", "--lr", "0.003"]
    pattern = str(tmp_path / "shards" / index["splits"]["train"])
    assert main(["train", "--data", pattern, *recipe, "--out", str(tmp_path / "from_shards")]) == 0
    assert main(["train", "--data", str(data), *recipe, "--out", str(tmp_path / "from_folder")]) == 0
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("from_shards", "from_folder")]
    # Colour classes a tiny net separates perfectly: both paths reach the same (full) accuracy, though
    # their orders differ (a shuffle buffer over shards vs a permutation of files).
    assert reports[0]["best_val_accuracy"] == reports[1]["best_val_accuracy"] == 1.0
    assert reports[0]["data"]["train_path"] == "streamed from shards"
    assert reports[0]["data"]["val_kind"] == "shards" and reports[0]["final"]["num_images"] == 9


@pytest.mark.slow
def test_a_run_interrupted_mid_epoch_on_shards_resumes_exactly(tmp_path, monkeypatch, capsys):
    pattern = write_equal_shards(tmp_path / "shards")
    val = make_image_folder(tmp_path / "val", classes=("blue", "red"), per_class=2, val_per_class=None, size=16)
    # 16 of 24 samples per epoch: epoch 3 starts in the middle of the second pass over the shards.
    recipe = [*TINY, "--epochs", "3", "--epoch-samples", "16", "--augment", "trivial", "--val-data", str(val)]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "--data", pattern, *recipe, "--out", str(straight)]) == 0
    original_start = ConsoleReporter.start_epoch

    def remember_epoch(self, epoch, epochs, num_batches, phase):
        self.epoch_number = epoch
        original_start(self, epoch, epochs, num_batches, phase)

    def interrupt_in_epoch_3(self, images):
        if self.epoch_number == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ConsoleReporter, "start_epoch", remember_epoch)
        patch.setattr(ConsoleReporter, "advance", interrupt_in_epoch_3)
        assert main(["train", "--data", pattern, *recipe, "--out", str(interrupted)]) == 130
    assert main(["train", "--resume", str(interrupted)]) == 0
    expected = torch.load(straight / "last.ckpt", weights_only=True)
    resumed = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 3 and resumed["step"] == expected["step"]
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_shard_errors_are_one_line(tmp_path, capsys):
    pattern = write_equal_shards(tmp_path / "shards", shards=2)
    assert main(["train", "--data", pattern.replace("000001", "000007"), *TINY, "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", pattern, *TINY, "--out", str(tmp_path / "r")]) == 2  # no val shards beside them
    assert "--val-data" in capsys.readouterr().err
    (tmp_path / "shards" / "broken-000000.tar").write_bytes(b"not a tar file")
    for broken in ("pipe:false", str(tmp_path / "shards" / "broken-000000.tar")):
        assert main(["train", "--data", pattern, "--val-data", broken, *TINY, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert "cannot read shard" in err and err.count("\n") == 1
    (tmp_path / "shards" / SHARD_INDEX).unlink()
    assert main(["train", "--data", pattern, *TINY, "--out", str(tmp_path / "r")]) == 2
    assert SHARD_INDEX in capsys.readouterr().err
    assert main(["shard", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["shard", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "huge"]) == 2
    assert "--shard-size" in capsys.readouterr().err


@pytest.mark.slow
def test_val_data_of_another_kind_validates_every_kind_of_data(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=16)
    assert main(["shard", "--data", str(data), "--out", str(tmp_path / "shards")]) == 0
    val_shards = str(tmp_path / "shards" / "val-{000000..000000}.tar")
    one_epoch = [*TINY, "--epochs", "1"]
    # a folder trains whole (train/ and val/), the shards validate
    assert main(["train", "--data", str(data), "--val-data", val_shards, *one_epoch, "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["data"]["train_images"] == 18 and report["final"]["num_images"] == 6
    assert (report["data"]["val_kind"], report["data"]["val_path"]) == ("shards", "streamed from shards")
    # shards train, a folder validates
    pattern = str(tmp_path / "shards" / "train-{000000..000000}.tar")
    argv = ["train", "--data", pattern, "--val-data", str(data / "val"), *one_epoch, "--workers", "2"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0  # 2 workers for 1 shard: 1 worker reads it
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["data"]["val_path"] == "files (decoded every epoch)" and report["final"]["num_images"] == 6


def test_an_undecodable_image_is_skipped_or_stops_the_epoch(tmp_path):
    pattern = write_equal_shards(tmp_path / "shards", shards=1, per_shard=4)
    with wds.TarWriter(str(tmp_path / "shards" / "train-000000.tar")) as writer:
        for index in range(4):
            payload = b"not a png" if index == 2 else make_image(tmp_path / "x.png", (9, 9, 9), size=8).read_bytes()
            writer.write({"__key__": f"k{index}", "png": payload, "cls": b"1"})
    skipping = ShardStream(open_shards(pattern), None, seed=0)
    assert [label for _, label in skipping] == [1, 1, 1]
    with pytest.raises(Exception, match="k2.png"):
        list(ShardStream(open_shards(pattern), None, seed=0, on_bad_image="error"))


def test_the_class_list_may_come_from_the_samples_json(tmp_path):
    root = tmp_path / "foreign"
    root.mkdir()
    with wds.TarWriter(str(root / "part-0.tar")) as writer:
        for index, name in enumerate(["dog", "cat", "dog"]):
            payload = make_image(tmp_path / "x.png", (9, 9, 9), size=8).read_bytes()
            meta = {"label": name, "classes": ["cat", "dog"]}
            writer.write({"__key__": f"k{index}", "png": payload, "json": json.dumps(meta).encode()})
    shards = open_shards(str(root / "part-0.tar"))
    assert shards.classes == ["cat", "dog"] and shards.total is None
    stream = ShardStream(shards, None, seed=0, epoch_samples=3)  # no counts: the epoch is given
    assert sorted(label for _, label in stream) == [0, 1, 1]

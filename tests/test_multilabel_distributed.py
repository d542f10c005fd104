"""Multi-label validation under torchrun: two gloo processes give one process's metrics and predictions."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visiontune import distributed
from visiontune.data.multilabel import mask_of
from visiontune.training.loops import evaluate
from visiontune.training.task import MultiLabel

WORLD = 2
NUM_CLASSES = 3
VAL_SIZE = 11  # odd: the two shards differ in length


def _evaluate() -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(VAL_SIZE, 3, 4, 4, generator=generator)
    masks = torch.tensor([mask_of(c for c in range(NUM_CLASSES) if (i >> c) & 1) for i in range(VAL_SIZE)])
    dataset = TensorDataset(images, masks)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, NUM_CLASSES)).eval()
    loader = DataLoader(dataset, batch_size=2, sampler=distributed.make_eval_sampler(dataset))
    result = evaluate(model, loader, torch.device("cpu"), ["a", "b", "c"], keep_predictions=True,
                      task=MultiLabel(NUM_CLASSES))
    return {"metrics": result.metrics, "predictions": result.predictions}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.session(backend="gloo", timeout_s=60):
        torch.save(_evaluate(), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_multilabel_evaluation_equals_one_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    reference = _evaluate()
    assert reference["metrics"]["num_images"] == VAL_SIZE
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        # The gathered rows come back in dataset order, but each process ran other batches (the
        # shards group the images differently), so a logit may differ in its last float32 bit
        # (~6e-8 relative): thresholds, AP and losses agree to 1e-6 relative, the rest exactly.
        for name in ("metrics", "predictions"):
            got, expected = _flat(result[name]), _flat(reference[name])
            assert len(got) == len(expected)
            for value, wanted in zip(got, expected):
                if isinstance(wanted, float):
                    assert value == pytest.approx(wanted, rel=1e-6, abs=1e-12), name
                else:
                    assert value == wanted, name


def _flat(value) -> list:
    """Every key and value of a nested dict/list/tuple, in order, for one pytest.approx comparison."""
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in [key, *_flat(value[key])]]
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flat(element)]
    return [value]

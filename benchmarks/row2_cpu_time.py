"""Row 2 of bench_speed.py measured in CPU time, for a machine other processes load.

Wall-clock images/s on a shared machine move with the load (row 2 fell from ~330 to ~3 images/s at
load average 19 on 2 cores); CPU seconds on one intra-op thread move far less. In one process, on
the row-2 data (``--quick`` sizes: 320 digits at 64 px), alternate epochs of visiontune's own
training loader + ``train_one_epoch`` (``train --strategy full`` defaults: decoded once, augment
basic, fused AdamW, channels_last model) and of the best plain loop's body (as BEST_PLAIN_SCRIPT),
and print images per CPU-second of each epoch and the ratio of the best epochs after the first.
A before/after comparison runs it with PYTHONPATH pointing at each checkout's ``src``.

    PYTHONPATH=src .venv/bin/python benchmarks/row2_cpu_time.py        # about 2 minutes idle
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_speed import MODEL, QUICK, pretrained_weights, write_digits  # beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per side, alternating")
    args = parser.parse_args(argv)
    import timm
    from torch import nn
    from torchvision.transforms import v2

    from visiontune.config import TrainConfig
    from visiontune.training.loops import train_one_epoch
    from visiontune.training.schedule import build_schedule
    from visiontune.training.setup import build_training

    torch.set_num_threads(1)  # CPU time then counts work, not threads waiting for each other
    size = QUICK.image_size
    with tempfile.TemporaryDirectory(prefix="visiontune-row2-") as folder:
        data = write_digits(Path(folder) / "digits", QUICK.per_class, round(size / 0.875))
        config = TrainConfig(data=str(data), model=MODEL, weights=str(pretrained_weights()), strategy="full",
                             epochs=args.epochs, image_size=size, workers=0)  # CPU time of this process: all of it
        setup = build_training(config)
    loader = setup.train_loader
    schedule = build_schedule(len(loader), args.epochs, 0.0)
    decoded = loader.dataset.dataset  # InMemoryDataset under SeededSamples
    images, labels = decoded.images, torch.tensor(decoded.targets)
    augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    plain_model = timm.create_model("efficientnet_lite0", num_classes=len(setup.classes))
    plain_model = plain_model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=3e-4)
    loss_fn = nn.CrossEntropyLoss()
    batch_size = config.batch_size

    def plain_epoch() -> float:
        plain_model.train()
        order, loss_sum = torch.randperm(len(labels)), torch.zeros(())
        started = time.process_time()
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = torch.stack([augment(images[i]) for i in index.tolist()])
            batch = ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(plain_model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
        loss_sum.item()
        return len(order) / (time.process_time() - started)

    def our_epoch(epoch: int) -> float:
        loader.sampler.set_epoch(epoch)
        started = time.process_time()
        stats = train_one_epoch(setup.model, loader, setup.optimizer, setup.loss_fn, setup.device, schedule=schedule)
        return stats.images / (time.process_time() - started)

    ours, plain = [], []
    for epoch in range(args.epochs):
        ours.append(our_epoch(epoch))
        plain.append(plain_epoch())
    print(f"images per CPU-second, {size} px, batch {batch_size}, 1 thread: visiontune "
          f"{[round(rate) for rate in ours]}, plain {[round(rate) for rate in plain]}; "
          f"best after the first: {max(ours[1:]) / max(plain[1:]):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

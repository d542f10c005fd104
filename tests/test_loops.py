"""One pass over the data (training/loops.py): train_step, train_one_epoch and evaluate on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.training.loops import NonFiniteLossError, evaluate, train_one_epoch, train_step
from visiontune.training.schedule import Schedule, set_learning_rates

CLASSES = ["a", "b", "c"]


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, len(CLASSES)))


def _batches(count: int = 4, batch: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 3, (batch,), generator=generator))
            for _ in range(count)]


def _sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.0) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for group in optimizer.param_groups:
        group["peak_lr"] = lr  # what strategies.build_optimizer records and the schedule scales
    return optimizer


def _epoch(model, loader, optimizer, **options):
    return train_one_epoch(model, loader, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"),
                           schedule=Schedule(total_steps=len(loader)), **options)


def test_an_epoch_counts_images_and_steps_and_follows_the_schedule():
    model, batches = _tiny_model(), _batches()
    optimizer = _sgd(model)
    seen = []
    stats = _epoch(model, batches, optimizer, first_step=1, on_batch=seen.append)
    assert (stats.images, stats.steps) == (24, 4) and seen == [6, 6, 6, 6]
    assert 0.0 <= stats.accuracy <= 1.0 and math.isfinite(stats.loss)
    # The last of steps 1..4 of a 4-step cosine (the rate reaches 0 at the end of the phase).
    assert stats.last_lr == pytest.approx(0.1 * Schedule(total_steps=4).factor(4), abs=1e-12)


def test_training_reduces_the_loss_on_data_it_can_fit():
    model, batches = _tiny_model(), _batches(count=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for group in optimizer.param_groups:
        group["peak_lr"] = 0.05
    constant = Schedule(total_steps=10**6)  # practically flat over the steps taken here
    first = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), schedule=constant)
    for epoch in range(15):
        last = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"),
                               schedule=constant, first_step=2 * (epoch + 1))
    assert last.loss < 0.5 * first.loss  # 12 images, 3 classes: a conv net memorises them


def test_the_same_start_gives_bit_identical_weights():
    results = []
    for _ in range(2):
        model = _tiny_model()
        _epoch(model, _batches(), _sgd(model, momentum=0.9))
        results.append(model.state_dict())
    assert all(torch.equal(value, results[1][key]) for key, value in results[0].items())


def test_frozen_batchnorm_keeps_its_running_statistics_while_training():
    model = _tiny_model()
    for parameter in model[1].parameters():
        parameter.requires_grad_(False)
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    optimizer = _sgd(nn.Sequential(model[0], model[5]))  # only the trainable layers, as the phases do
    _epoch(model, _batches(), optimizer)
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])
    assert model.training and not model[1].training


def test_a_nan_loss_stops_the_epoch_with_advice():
    model = _tiny_model()

    def nan_loss(outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")

    with pytest.raises(NonFiniteLossError, match="--lr"):
        train_one_epoch(model, _batches(), _sgd(model), nan_loss, torch.device("cpu"), schedule=Schedule(4))


def test_train_step_clips_the_gradient_norm_before_the_step():
    model = _tiny_model()
    optimizer = _sgd(model, lr=1.0)
    images, labels = _batches(count=1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss, outputs = train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), grad_clip=1e-3)
    # Plain SGD at lr 1 moves the weights by exactly the clipped gradient, whose norm is at most the limit
    # (clip_grad_norm_ scales by limit / (norm + 1e-6)); float32 rounding of the few-element
    # differences stays far below the 1 % margin.
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert 0 < moved <= 1e-3 * 1.01
    assert not loss.requires_grad and outputs.shape == (6, 3)


def test_train_step_trains_on_the_mixed_batch_and_returns_its_loss():
    model = _tiny_model()
    images, labels = _batches(count=1)[0]
    calls = []

    def mixer(batch, targets):
        calls.append(targets)
        return batch.flip(0), F.one_hot(targets.flip(0), 3).float()  # soft targets, as mixup gives

    loss_fn = nn.CrossEntropyLoss()
    expected = loss_fn(model(images.flip(0)), F.one_hot(labels.flip(0), 3).float()).item()
    loss, _ = train_step(model, images, labels, _sgd(model), loss_fn, batch_mixer=mixer)
    assert len(calls) == 1 and torch.equal(calls[0], labels)
    # The same float32 forward pass on the same inputs before the step: equal up to rounding.
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_the_schedule_sets_every_group_from_its_peak_rate():
    model = _tiny_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "peak_lr": 0.01, "lr": 0.0},
                                 {"params": model[5].parameters(), "peak_lr": 0.1, "lr": 0.0}])
    factor = set_learning_rates(optimizer, Schedule(total_steps=10, warmup_steps=4), 1)
    assert factor == 0.5 and [g["lr"] for g in optimizer.param_groups] == [0.005, 0.05]


class FixedLogits(nn.Module):
    """Returns the logits given for each image index (the image's first pixel holds its index)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[images[:, 0, 0, 0].long()]


def test_evaluate_reports_the_metrics_and_predictions_of_known_logits():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])  # the last one is wrong
    images = torch.arange(4).float().reshape(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    loader = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    result = evaluate(FixedLogits(logits), loader, torch.device("cpu"), CLASSES, keep_predictions=True)
    assert result.metrics["accuracy"] == pytest.approx(0.75)
    losses = F.cross_entropy(logits, labels, reduction="none")
    # The mean of four float32 losses: agreement to float32 rounding of values near 1.
    assert result.metrics["loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
    assert [(label, predicted) for label, predicted, _, _ in result.predictions] == [(0, 0), (1, 1), (2, 2), (1, 0)]
    confidences = logits.softmax(dim=1).max(dim=1).values
    assert [c for _, _, c, _ in result.predictions] == pytest.approx(confidences.tolist(), rel=1e-6)
    assert result.metrics["confusion"][1] == [1, 1, 0]  # rows: true class, columns: predicted

"""The learning-rate range test: exact restoration, sensible suggestions, divergence, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visiontune.training.lr_finder import LRFindResult, lr_find, plot_lr_find, suggest_lr, valley


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(4, 3))


def _classification_batches(count: int = 3, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 3, (batch,), generator=generator))
            for _ in range(count)]


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from visiontune.training.lr_finder import _cpu_copy

    return _cpu_copy(model.state_dict()), _cpu_copy(optimizer.state_dict())


def _assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested optimizer/model states (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01),
], ids=["sgd-momentum", "adamw"])
def test_restores_weights_buffers_optimizer_state_and_modes_exactly(make_optimizer):
    model = _tiny_classifier()
    head = model[-1]
    optimizer = make_optimizer([{"params": [p for m in model[:-1] for p in m.parameters()], "lr": 1e-3},
                                {"params": head.parameters(), "lr": 1e-2}])
    batches = _classification_batches()
    for images, targets in batches:  # some optimizer state (momentum / Adam moments) to preserve
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
    model.eval()
    model[1].train()  # a mix of modes must come back as it was
    before_model, before_optimizer = _snapshot(model, optimizer)
    rng_before = torch.get_rng_state()

    result = lr_find(model, batches, optimizer, nn.functional.cross_entropy, "cpu", num_steps=30)

    assert len(result.lrs) > 5
    after_model, after_optimizer = _snapshot(model, optimizer)
    _assert_same(before_model, after_model, "model")  # weights and BN running statistics
    _assert_same(before_optimizer, after_optimizer, "optimizer")  # state and param_groups (lr included)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert not model.training and model[1].training and not model[-2].training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_parameter_groups_keep_their_ratio_and_the_rate_grows_exponentially():
    model = _tiny_classifier()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1e-4},
                                 {"params": model[-1].parameters(), "lr": 1e-3}], lr=1e-4)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
    result = lr_find(model, _classification_batches(), optimizer, nn.functional.cross_entropy, "cpu",
                     start_lr=1e-6, end_lr=1e-2, num_steps=20, reference_lr=1e-4, diverge_factor=1e9)
    assert len(seen) == 20 and not result.diverged
    assert all(math.isclose(head / body, 10.0) for body, head in seen)
    assert math.isclose(result.lrs[0], 1e-6) and math.isclose(result.lrs[-1], 1e-2)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert [body for body, _ in seen] == pytest.approx(result.lrs)  # reported rates are the reference group's


def _regression_problem(seed: int, n: int = 256, d: int = 8):
    """Least squares: full-batch gradient descent on mean((Xw + b - y)^2) is stable exactly for
    lr < 2 / lambda_max(H), H = (2/n) [X 1]^T [X 1]; far below that it barely moves."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator) * torch.linspace(0.3, 1.5, d)
    y = x @ torch.randn(d, 1, generator=generator) + 0.3 * torch.randn(n, 1, generator=generator)
    design = torch.cat([x, torch.ones(n, 1)], dim=1)
    largest_stable_lr = 2 / torch.linalg.eigvalsh(2 / n * design.T @ design).max().item()
    return x, y, largest_stable_lr


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch_size", [256, 32], ids=["full-batch", "minibatch"])
def test_suggestion_lies_in_the_known_good_range_of_a_least_squares_problem(seed, batch_size):
    x, y, largest_stable_lr = _regression_problem(seed)
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]

    result = lr_find(model, loader, optimizer, nn.functional.mse_loss, "cpu")

    assert result.diverged and result.lrs[-1] < 10.0  # it went past the stable range and stopped
    assert largest_stable_lr / 50 <= result.suggestion < largest_stable_lr
    # ... and training at the suggested rate actually works: 50 full-batch steps.
    optimizer = torch.optim.SGD(model.parameters(), lr=result.suggestion)
    start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert nn.functional.mse_loss(model(x), y).item() < 0.1 * start


def test_stops_at_a_non_finite_loss():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = iter([1.0, 0.9, float("nan")])

    def loss_fn(outputs, targets):
        return (outputs * 0).sum() + next(losses)

    result = lr_find(model, [(torch.ones(2, 1), torch.ones(2, 1))], optimizer, loss_fn, "cpu", num_steps=50)
    assert result.diverged and len(result.lrs) == 2


def test_takes_the_training_steps_own_clipping_and_batch_mixing():
    model = _tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    norms, mixed = [], []
    optimizer.register_step_pre_hook(lambda opt, *_: norms.append(
        torch.cat([p.grad.flatten() for group in opt.param_groups for p in group["params"]]).norm().item()))

    def mixer(images, targets):
        mixed.append(len(targets))
        return images, nn.functional.one_hot(targets, 3).float()

    lr_find(model, _classification_batches(), optimizer, nn.functional.cross_entropy, "cpu", num_steps=10,
            diverge_factor=1e9, grad_clip=1e-4, batch_mixer=mixer)
    assert mixed == [8] * 10 and len(norms) == 10
    # clip_grad_norm_ scales to limit / (norm + 1e-6): at most the limit, up to float32 rounding (1e-6 relative).
    assert max(norms) <= 1e-4 * (1 + 1e-5)


def test_runs_the_forward_pass_under_the_runs_precision(monkeypatch):
    import visiontune.training.loops as loops
    from visiontune.device import Precision

    dtypes = []
    real_autocast = loops.autocast

    def recording_autocast(device, precision):
        dtypes.append(precision.dtype)
        return real_autocast(device, precision)

    monkeypatch.setattr(loops, "autocast", recording_autocast)
    model = _tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    result = lr_find(model, _classification_batches(), optimizer, nn.functional.cross_entropy, "cpu", num_steps=5,
                     precision=Precision(torch.bfloat16), diverge_factor=1e9)
    assert dtypes == [torch.bfloat16] * 5 and len(result.lrs) == 5


def test_fp16_steps_through_a_gradient_scaler_of_its_own_and_restores_exactly():
    from visiontune.device import Precision

    model = _tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before_model, before_optimizer = _snapshot(model, optimizer)
    result = lr_find(model, _classification_batches(), optimizer, nn.functional.cross_entropy, "cpu", num_steps=8,
                     precision=Precision(torch.float16), diverge_factor=1e9)
    assert len(result.lrs) == 8 and all(math.isfinite(loss) for loss in result.losses)
    after_model, after_optimizer = _snapshot(model, optimizer)
    _assert_same(before_model, after_model, "model")
    _assert_same(before_optimizer, after_optimizer, "optimizer")


def test_valley_is_the_middle_of_the_longest_decreasing_stretch():
    lrs = [10.0**k for k in range(12)]
    losses = [5, 6, 5, 4, 3, 2, 1, 0.5, 3, 9, 20, 50]  # decreasing from index 1 to 7
    # longest run: indices 1..7 (length 7); fastai counts its start one earlier: 0 + int(7/3) + int(7/6) = 3
    assert valley(lrs, losses) == lrs[3]
    suggestion, _ = suggest_lr(lrs, losses)
    assert suggestion == lrs[7] / 10  # min/10
    assert suggest_lr([], []) == (None, None)


def test_plot_writes_a_png(tmp_path):
    result = LRFindResult([1e-5, 1e-4, 1e-3, 1e-2], [2.0, 1.5, 1.0, 3.0], 1e-4, valley=1e-4)
    path = plot_lr_find(result, tmp_path / "plots" / "lr_find.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_lr_find_prints_the_suggestion_and_writes_the_plot(tmp_path, capsys):
    import json

    from conftest import make_image_folder

    from visiontune.cli import main

    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2)
    out = tmp_path / "lr"
    assert main(["lr-find", "--data", str(data), "--model", "resnet18", "--weights", "none", "--image-size", "32",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--strategy", "linear-probe",
                 "--steps", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert f"suggested learning rate: {result['suggestion']:.2e}" in printed
    assert 1 < len(result["lrs"]) <= 12 and result["lrs"][0] == pytest.approx(1e-7)
    assert main(["lr-find", "--data", str(data), "--model", "resnet18", "--steps", "1"]) == 2

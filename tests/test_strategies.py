"""Each strategy's trainable parameters, phases and learning rates (mobilenet_v3_small, weights=None)."""

from __future__ import annotations

import pytest
import torch

from visiontune.config import config_from_dict
from visiontune.training.loops import set_train_mode
from visiontune.training.strategies import (GRADUAL_UNFREEZE_LR_RATIO, HEAD_LR_MULTIPLIER, apply_phase,
                                             build_optimizer, plan_phases)

MODEL = "mobilenet_v3_small"
LR = 0.01


def setup(strategy: str, **values):
    from visiontune.model.create import create_model

    config = config_from_dict({"data": "x", "model": MODEL, "strategy": strategy, "lr": LR, "epochs": 3, **values})
    torch.manual_seed(0)
    return config, create_model(MODEL, num_classes=3, weights=None), plan_phases(config)


def head_parameters(model) -> set[str]:
    from visiontune.model.heads import head_names

    prefixes = tuple(f"{name}." for name in head_names(model))
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def lr_by_parameter(model, optimizer) -> dict[str, float]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: group["peak_lr"] for group in optimizer.param_groups for p in group["params"]}


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_linear_probe_trains_the_head_alone_at_the_head_rate():
    # The new head learns at 10x --lr in every strategy, so linear-probe and gradual's head phase
    # are the same recipe (at --lr itself a fresh head underfitted: 0.595 vs 0.730 on the digits).
    config, model, phases = setup("linear-probe")
    assert [(p.name, p.start_epoch, p.end_epoch) for p in phases] == [("head", 0, 3)]
    names = apply_phase(model, phases[0])
    assert set(names) == trainable(model) == head_parameters(model)
    optimizer = build_optimizer(model, phases[0], config)
    assert set(lr_by_parameter(model, optimizer).values()) == {LR * HEAD_LR_MULTIPLIER}
    assert set(lr_by_parameter(model, optimizer)) == head_parameters(model)


def test_full_trains_everything_with_a_ten_times_faster_head_and_no_decay_on_norms():
    config, model, phases = setup("full")
    apply_phase(model, phases[0])
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    optimizer = build_optimizer(model, phases[0], config)
    rates = lr_by_parameter(model, optimizer)
    head = head_parameters(model)
    assert [rates[name] for name in head] == pytest.approx([10 * LR] * len(head))
    assert {rates[name] for name in rates if name not in head} == {LR}
    for group in optimizer.param_groups:
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_full_with_explicit_head_lr_and_layer_decay_spreads_the_backbone_rates():
    config, model, phases = setup("full", head_lr=0.05, layer_decay=0.5)
    apply_phase(model, phases[0])
    rates = lr_by_parameter(model, build_optimizer(model, phases[0], config))
    head = head_parameters(model)
    backbone = [rates[name] for name, _ in model.named_parameters() if name not in head]
    assert [rates[name] for name in head] == pytest.approx([0.05] * len(head))
    assert max(backbone) == pytest.approx(LR) and min(backbone) < LR / 4
    assert backbone[0] == min(backbone)  # the input side learns slowest


def test_partial_trains_the_last_groups_and_the_head():
    from visiontune.model.freeze import layer_groups

    config, model, phases = setup("partial", train_groups=1)
    apply_phase(model, phases[0])
    groups = layer_groups(model)
    last_backbone = tuple(f"{module}." for module in groups[-2].modules)
    expected = head_parameters(model) | {name for name, _ in model.named_parameters() if name.startswith(last_backbone)}
    assert trainable(model) == expected
    assert len(expected) < len(list(model.parameters()))


def test_gradual_trains_the_head_first_then_everything_at_half_the_rates_discriminatively():
    config, model, phases = setup("gradual", freeze_epochs=1)
    assert [(p.name, p.start_epoch, p.end_epoch, p.train) for p in phases] == [("head", 0, 1, "head"),
                                                                                ("full", 1, 3, "all")]
    apply_phase(model, phases[0])
    assert trainable(model) == head_parameters(model)
    first = lr_by_parameter(model, build_optimizer(model, phases[0], config))
    assert list(first.values()) == pytest.approx([10 * LR] * len(first))
    apply_phase(model, phases[1])
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    rates = lr_by_parameter(model, build_optimizer(model, phases[1], config))
    head = head_parameters(model)
    backbone = [rates[name] for name, _ in model.named_parameters() if name not in head]
    # After unfreezing every rate is halved (fastai's fine_tune does the same): the head keeps
    # what it learnt on frozen features instead of being knocked back by full-rate first steps.
    half = GRADUAL_UNFREEZE_LR_RATIO
    assert max(backbone) == pytest.approx(LR * half) and min(backbone) == pytest.approx(LR * half / 10)
    assert [rates[name] for name in head] == pytest.approx([10 * LR * half] * len(head))


def test_only_gradual_halves_the_rates_of_its_phase_after_unfreezing():
    # full trains everything from epoch 0: nothing to protect, so its rates stay whole.
    config, model, phases = setup("full")
    apply_phase(model, phases[0])
    assert max(lr_by_parameter(model, build_optimizer(model, phases[0], config)).values()) == pytest.approx(10 * LR)


def test_frozen_batchnorm_keeps_its_statistics_while_the_head_trains():
    config, model, phases = setup("linear-probe")
    apply_phase(model, phases[0])
    set_train_mode(model)
    before = {name: buffer.clone() for name, buffer in model.named_buffers() if "running_mean" in name}
    model(torch.randn(4, 3, 32, 32))
    after = dict(model.named_buffers())
    assert before and all(torch.equal(value, after[name]) for name, value in before.items())


def test_adamw_runs_fused_on_cpu_and_steps_as_the_per_tensor_loop_does():
    config, model, phases = setup("full", weight_decay=0.05)
    apply_phase(model, phases[0])
    fused = build_optimizer(model, phases[0], config)
    assert all(group["fused"] for group in fused.param_groups)
    twin = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    loop = torch.optim.AdamW([{**group, "params": [twin[names[id(p)]] for p in group["params"]], "fused": None,
                               "foreach": False} for group in fused.param_groups])
    generator = torch.Generator().manual_seed(0)
    steps = 3
    for _ in range(steps):
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=generator)
            twin[name].grad = p.grad.clone()
        fused.step()
        loop.step()
    # The same formula in another order of float32 operations: per step, a few roundings of the
    # update (about lr in size) and of the weight it is added to; never a different update.
    eps = torch.finfo(torch.float32).eps
    for name, p in model.named_parameters():
        scale = 16 * eps * (max(group["lr"] for group in fused.param_groups) + p.detach().abs().max().item())
        torch.testing.assert_close(p.detach(), twin[name].detach(), rtol=0, atol=steps * scale, msg=name)

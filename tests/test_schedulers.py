"""Schedulers drive dense and expert groups alike (F1) and keep per-group ratios (F2).

Every scheduler is run twice: on expertopt's MoEOptimizer and on a one-group SGD reference with
the same base lr, which gives the schedule s(t) independently of expertopt. Each group's effective
lr must equal s(t) * lr_mult at every step, and an expert group must equal its linked dense group.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR  # DS_ACCELERATOR set in conftest
from torch.optim import lr_scheduler

import expertopt

BASE_LR = 0.02
STEPS = 12


def _torch_factories():
    return {
        "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4) * 0.9**t),
        "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
        "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1),
        "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
            opt,
            [
                lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
                lr_scheduler.ExponentialLR(opt, 0.8),
            ],
            milestones=[4],
        ),
        "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
        "WarmupLR": lambda opt: WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.03, warmup_num_steps=6),
        "WarmupDecayLR": lambda opt: WarmupDecayLR(
            opt, total_num_steps=STEPS + 2, warmup_min_lr=0.0, warmup_max_lr=0.03, warmup_num_steps=4
        ),
    }


def _step_scheduler(scheduler, t):
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        scheduler.step(1.0)  # a flat metric: the lr halves every other step after patience
    else:
        scheduler.step()


def _reference_schedule(name):
    """s(t) from a plain one-group SGD: independent of expertopt."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR, momentum=0.9)
    scheduler = _torch_factories()[name](opt)
    lrs = []
    for t in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        _step_scheduler(scheduler, t)
    return lrs


def _moe_optimizer(model):
    groups = expertopt.build_param_groups(model, lr=BASE_LR, adamw_lr=2e-3, expert_lr_mult=0.5)
    return expertopt.MoEOptimizer.from_groups(groups)


def _train(model, opt, scheduler, steps, t0=0, record=None):
    from conftest import toy_loss

    for t in range(t0, t0 + steps):
        opt.zero_grad()
        toy_loss(model, t).backward()
        if record is not None:
            record.append(opt.effective_lrs())
        opt.step()
        _step_scheduler(scheduler, t)


@pytest.mark.parametrize("name", list(_torch_factories()))
def test_scheduler_drives_dense_and_expert_groups(name, toy_moe):
    opt = _moe_optimizer(toy_moe)
    mults = [g["lr_mult"] for g in opt.param_groups]
    scheduler = _torch_factories()[name](opt)
    recorded = []
    _train(toy_moe, opt, scheduler, STEPS, record=recorded)
    schedule = _reference_schedule(name)
    assert len(set(schedule)) > 2, "the schedule must actually change the lr"
    for t, lrs in enumerate(recorded):
        assert lrs == pytest.approx([schedule[t] * m for m in mults], rel=1e-12), f"step {t}"
    # The expert optimizer's own groups are the ones that carry those lrs (F1).
    expert = {g["name"]: g for g in opt.experts.param_groups}["expert_muon"]
    dense = {g["name"]: g for g in opt.dense.param_groups}["muon"]
    assert expert["lr"] == dense["lr"]


def test_warmup_max_lr_keeps_muon_adamw_and_expert_ratios(toy_moe):
    # F2: DeepSpeed's WarmupLR writes one scalar into every group; ratios must survive.
    opt = _moe_optimizer(toy_moe)
    scheduler = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.03, warmup_num_steps=2)
    _train(toy_moe, opt, scheduler, 4)
    by_name = dict(zip([g["name"] for g in opt.param_groups], opt.effective_lrs(), strict=True))
    assert by_name["muon"] == pytest.approx(0.03)
    assert by_name["adamw"] == pytest.approx(0.03 * 2e-3 / BASE_LR)
    assert by_name["expert_muon"] == pytest.approx(0.03 * 0.5)


def test_scheduler_on_dense_optimizer_only_still_reaches_experts(toy_moe):
    # The upstream F1 bug: the expert optimizer copied the dense lr once and never again.
    opt = _moe_optimizer(toy_moe)
    scheduler = lr_scheduler.LambdaLR(opt.dense, lambda t: 0.5**t)
    _train(toy_moe, opt, scheduler, 4)
    opt.sync_expert_groups()
    dense = {g["name"]: g for g in opt.dense.param_groups}
    for group in opt.experts.param_groups:
        assert group["lr"] == dense[group["link"]]["lr"] == pytest.approx(BASE_LR * 0.5**4)


def test_expert_step_uses_the_scheduled_lr(toy_moe):
    # The lr must reach the update, not just the dict: momentum=0, wd=0 gives an exact step.
    from expertopt.kernels import orthogonalize

    groups = expertopt.build_param_groups(toy_moe, lr=BASE_LR, expert_lr_mult=0.5)
    opt = expertopt.MoEOptimizer.from_groups(groups, momentum=0.0, weight_decay=0.0, ns_dtype="float32")
    for group in opt.dense.param_groups:
        group["weight_decay"] = 0.0
    for group in opt.dense.param_groups:
        if group["name"] == "muon":
            group["lr"] = 0.1  # as a scheduler would
    grad = torch.randn(toy_moe.w_in.shape)
    toy_moe.w_in.grad = grad.clone()
    start = toy_moe.w_in.detach().clone()
    opt.step()
    d_ff, d = grad.shape[-2:]
    expected = start - 0.1 * 0.5 * max(1, d_ff / d) ** 0.5 * orthogonalize(grad, dtype=torch.float32)
    torch.testing.assert_close(toy_moe.w_in.detach(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["LambdaLR", "OneCycleLR", "ReduceLROnPlateau", "WarmupDecayLR"])
def test_schedule_and_weights_survive_a_state_dict_round_trip(name, toy_moe):
    uninterrupted_model = copy.deepcopy(toy_moe)
    opt = _moe_optimizer(uninterrupted_model)
    scheduler = _torch_factories()[name](opt)
    expected = []
    _train(uninterrupted_model, opt, scheduler, STEPS, record=expected)

    model = copy.deepcopy(toy_moe)
    opt = _moe_optimizer(model)
    scheduler = _torch_factories()[name](opt)
    recorded = []
    _train(model, opt, scheduler, STEPS // 2, record=recorded)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)

    resumed_model = copy.deepcopy(toy_moe)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt = _moe_optimizer(resumed_model)
    resumed_scheduler = _torch_factories()[name](resumed_opt)
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_scheduler.load_state_dict(checkpoint["sched"])
    _train(resumed_model, resumed_opt, resumed_scheduler, STEPS - STEPS // 2, t0=STEPS // 2, record=recorded)
    assert recorded == expected
    for (pname, a), b in zip(uninterrupted_model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), pname

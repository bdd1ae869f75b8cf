"""MoEOptimizer: one optimizer object over a dense and a dedicated expert optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_compiled_step_matches_eager, toy_loss

import expertopt
from bench.probe import ProbeMoE, count_step_ops


def _moe(model, **defaults):
    return expertopt.MoEOptimizer.from_groups(expertopt.build_param_groups(model), **defaults)


def test_param_groups_are_the_two_optimizers_groups(toy_moe):
    opt = _moe(toy_moe)
    ids = [id(g) for g in opt.param_groups]
    assert ids == [id(g) for g in opt.dense.param_groups + opt.experts.param_groups]
    assert opt.experts.state is not opt.dense.state  # own state
    expert_param = toy_moe.w_in
    assert "momentum_buffer" in opt.experts.state[expert_param]
    assert expert_param not in opt.dense.state


@pytest.mark.parametrize("fused", [None, False], ids=["device_verdict", "host_verdict"])
def test_nonfinite_expert_gradient_skips_dense_and_experts(toy_moe, fused):
    """One verdict for both halves: parameters and every state tensor (momentum, AdamW moments and
    step counts) bit-identical, counted once. Fused AdamW lets the device flag decide; foreach
    AdamW cannot take it, so the host decides."""
    opt = _moe(toy_moe, fused=fused)
    assert opt._guard_on_device() is (fused is None)
    toy_loss(toy_moe, 0).backward()
    opt.step()  # state is not all zeros
    opt.zero_grad()
    toy_loss(toy_moe, 1).backward()
    toy_moe.w_out.grad[1, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in toy_moe.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="MoEOptimizer: non-finite gradient, step skipped") as caught:
        opt.step()
    assert len(caught) == 1
    assert opt.nonfinite_steps == 1
    for name, param in toy_moe.named_parameters():
        assert torch.equal(param, before[name]), name
    for index, values in opt.state_dict()["state"].items():
        assert values.keys() == state["state"][index].keys()
        for key, value in values.items():
            assert torch.equal(value, state["state"][index][key]), (index, key)
    toy_moe.w_out.grad.nan_to_num_(0.0)
    opt.step()  # a finite step after it steps, and is not counted
    assert opt.nonfinite_steps == 1
    assert not torch.equal(toy_moe.w_out, before["w_out"])


def _probe_moe(**defaults) -> expertopt.MoEOptimizer:
    model = ProbeMoE(2, d=32, d_ff=8)
    model.fill_grads()
    optimizer = _moe(model, **defaults)
    optimizer.step()  # plans the buckets
    return optimizer


def test_capturable_step_has_no_host_sync_and_counts_on_the_device():
    # aten::_local_scalar_dense is what .item(), bool(tensor) and float(tensor) dispatch.
    optimizer = _probe_moe(lr=torch.tensor(0.02), capturable=True)
    assert count_step_ops(optimizer).ops["_local_scalar_dense"] == 0
    # The default reads the one flag once, after both halves are queued, to warn.
    assert count_step_ops(_probe_moe()).ops["_local_scalar_dense"] == 1
    expert = next(p for g in optimizer.experts.param_groups for p in g["params"] if p.ndim == 3)
    expert.grad[0, 0, 0] = float("inf")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    snapshot = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capturable reads nothing back, so it cannot warn
        optimizer.step()
    assert optimizer.nonfinite_steps == 1
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))


def test_shared_finite_check_decides_on_the_host_for_both_halves(toy_moe):
    opt = _moe(toy_moe)
    toy_loss(toy_moe, 0).backward()
    calls = []

    def check(grads):
        calls.append(len(grads))
        return False, "step-0"  # another rank saw inf

    opt.shared_finite_check = check
    assert not opt._guard_on_device()
    before = {n: p.detach().clone() for n, p in toy_moe.named_parameters()}
    with pytest.warns(RuntimeWarning, match="1 skipped so far"):
        opt.step()
    assert calls == [len(list(toy_moe.parameters()))]  # once, over dense and expert gradients
    assert opt.nonfinite_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in toy_moe.named_parameters())


def test_whole_step_of_a_muon_only_moe_optimizer_compiles_without_graph_breaks():
    """``MoEOptimizer.step``: linking, the one guard, both optimizers' buckets in one graph (no
    AdamW half: torch wraps its fused AdamW in ``torch.compiler.disable``)."""

    def build() -> expertopt.MoEOptimizer:
        model = ProbeMoE(2, d=32, d_ff=8)
        model.fill_grads()
        groups = [g for g in expertopt.build_param_groups(model) if g["use_muon"]]
        return expertopt.MoEOptimizer.from_groups(groups, lr=torch.tensor(0.02), capturable=True)

    assert any(g["expert"] for g in build().param_groups)
    assert_compiled_step_matches_eager(build)


def test_capturable_must_agree():
    dense = expertopt.Muon([torch.nn.Parameter(torch.randn(4, 4))], capturable=True)
    experts = expertopt.Muon([{"params": [torch.nn.Parameter(torch.randn(2, 4, 4))], "expert": True}])
    with pytest.raises(ValueError, match=r"capturable to agree.*build both with the same value"):
        expertopt.MoEOptimizer(dense, experts)


def test_matches_a_single_muon_over_the_same_groups(toy_moe):
    # Splitting into two optimizers changes bookkeeping, never the math.
    twin = copy.deepcopy(toy_moe)
    split = _moe(toy_moe)
    single = expertopt.Muon(expertopt.build_param_groups(twin))
    for t in range(3):
        for model, opt in ((toy_moe, split), (twin, single)):
            opt.zero_grad()
            toy_loss(model, t).backward()
            opt.step()
    for (name, a), b in zip(toy_moe.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_add_param_group_routes_by_expert_flag(toy_moe):
    opt = _moe(toy_moe)
    extra = torch.nn.Parameter(torch.randn(2, 4, 4))
    opt.add_param_group(
        {"params": [extra], "param_names": ["extra"], "expert": True, "link": "muon", "name": "more"}
    )
    assert opt.experts.param_groups[-1]["name"] == "more"
    assert opt.param_groups[-1] is opt.experts.param_groups[-1]
    next(g for g in opt.dense.param_groups if g["name"] == "muon")["lr"] = 0.5
    opt.sync_expert_groups()
    assert opt.param_groups[-1]["lr"] == 0.5


def test_state_dict_round_trip_keeps_both_states(toy_moe):
    opt = _moe(toy_moe)
    toy_loss(toy_moe, 0).backward()
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups"}
    fresh = _moe(toy_moe)
    fresh.load_state_dict(state)
    for p in toy_moe.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value)


def test_groups_added_to_a_member_optimizer_are_seen(toy_moe):
    opt = _moe(toy_moe)
    extra = torch.nn.Parameter(torch.randn(4, 4))
    opt.dense.add_param_group({"params": [extra], "param_names": ["extra"], "name": "late"})
    assert opt.param_groups[len(opt.dense.param_groups) - 1]["name"] == "late"
    assert extra in opt.state
    with pytest.raises(AttributeError, match="use add_param_group"):
        opt.param_groups = []

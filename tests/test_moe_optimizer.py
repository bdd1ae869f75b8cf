"""MoEOptimizer: one optimizer object over a dense and a dedicated expert optimizer."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_loss

import expertopt


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


def test_nonfinite_expert_gradient_skips_dense_and_experts(toy_moe):
    opt = _moe(toy_moe)
    toy_loss(toy_moe, 0).backward()
    toy_moe.w_out.grad[1, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in toy_moe.named_parameters()}
    with pytest.warns(RuntimeWarning, match="MoEOptimizer: non-finite gradient, step skipped"):
        opt.step()
    assert opt.nonfinite_steps == 1
    for name, param in toy_moe.named_parameters():
        assert torch.equal(param, before[name]), name
    assert all(not s["momentum_buffer"].any() for s in opt.experts.state.values() if "momentum_buffer" in s)


def test_matches_a_single_muon_over_the_same_groups(toy_moe):
    # Splitting into two optimizers changes bookkeeping, never the math.
    import copy

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

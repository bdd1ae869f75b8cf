"""Issue 10: MoEOptimizer's state_dict is torch's layout, so every checkpointer handles it.

Checked against things outside MoEOptimizer: ``torch.optim.Optimizer.state_dict`` itself applied
to the combined groups, a single ``expertopt.Muon`` over the same groups (same math, one
optimizer), ``torch.distributed.checkpoint`` (save, load, ``get/set_optimizer_state_dict``) and
torch's ``LambdaLR``. Resumed runs must continue bit-identically (same tensors, same operations
in the same order), so tolerances are zero.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ToyMoE, toy_loss
from distributed import run_ranks
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import expertopt


def _groups(model, **options):
    return expertopt.build_param_groups(model, **options)


def _moe(model, **options):
    return expertopt.MoEOptimizer.from_groups(_groups(model, **options), ns_dtype="float32")


def _train(model, optimizer, seeds, scheduler=None):
    for seed in seeds:
        optimizer.zero_grad()
        toy_loss(model, seed).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_same_params(model, expected):
    for (name, actual), reference in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(actual, reference), name


def _assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key, values in expected.items():
        assert actual[key].keys() == values.keys(), key
        for name, value in values.items():
            assert torch.equal(actual[key][name], value), (key, name)


# -- the layout -------------------------------------------------------------------------------
def test_state_dict_is_torchs_layout_over_the_combined_groups(toy_moe):
    optimizer = _moe(toy_moe)
    _train(toy_moe, optimizer, range(2))
    saved = optimizer.state_dict()
    # torch's own Optimizer.state_dict over MoEOptimizer.param_groups and .state (dense, then experts).
    by_torch = torch.optim.Optimizer.state_dict(optimizer)
    assert saved["param_groups"] == by_torch["param_groups"]
    _assert_same_state(saved["state"], by_torch["state"])
    assert list(saved["state"]) == list(range(len(list(toy_moe.parameters()))))
    dense_params = sum(len(g["params"]) for g in optimizer.dense.param_groups)
    assert [g["expert"] for g in saved["param_groups"]] == [g["expert"] for g in optimizer.param_groups]
    expert_indices = [i for g in saved["param_groups"] if g["expert"] for i in g["params"]]
    assert expert_indices == list(range(dense_params, len(saved["state"])))


def test_state_dict_equals_a_single_muon_over_the_same_groups(toy_moe):
    """One Muon stepping dense then expert groups saves the same dict; each loads into the other."""
    twin = copy.deepcopy(toy_moe)
    optimizer = _moe(toy_moe)
    ordered = sorted(_groups(twin), key=lambda g: g["expert"])  # MoEOptimizer's order
    single = expertopt.Muon(ordered, ns_dtype="float32")
    _train(toy_moe, optimizer, range(2))
    _train(twin, single, range(2))
    saved, single_saved = copy.deepcopy((optimizer.state_dict(), single.state_dict()))
    assert saved["param_groups"] == single_saved["param_groups"]
    _assert_same_state(saved["state"], single_saved["state"])
    # Interchangeable: continue each from the other's state, same result.
    optimizer.load_state_dict(single_saved)
    single.load_state_dict(saved)
    _train(toy_moe, optimizer, range(2, 4))
    _train(twin, single, range(2, 4))
    _assert_same_params(toy_moe, twin)


def test_legacy_dense_experts_layout_still_loads(toy_moe):
    """Checkpoints saved before issue 10 held {"dense": ..., "experts": ...}; they keep loading."""
    first = copy.deepcopy(toy_moe)
    optimizer = _moe(first)
    _train(first, optimizer, range(3))
    # Copied, as torch.save would: a state_dict holds references to the live state.
    legacy = copy.deepcopy({"dense": optimizer.dense.state_dict(), "experts": optimizer.experts.state_dict()})
    resumed = copy.deepcopy(first)
    resumed_optimizer = _moe(resumed)
    resumed_optimizer.load_state_dict(legacy)
    _assert_same_state(resumed_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    _train(first, optimizer, range(3, 5))
    _train(resumed, resumed_optimizer, range(3, 5))
    _assert_same_params(resumed, first)


def test_state_dict_of_another_shape_is_refused_with_the_fix(toy_moe):
    optimizer = _moe(toy_moe)
    saved = optimizer.state_dict()
    fix = "built from the same param groups"
    with pytest.raises(
        ValueError, match=rf"has 4 param groups, this optimizer has 5 \(3 dense, then 2 expert\).*{fix}"
    ):
        optimizer.load_state_dict({**saved, "param_groups": saved["param_groups"][:-1]})
    swapped = copy.deepcopy(saved)
    swapped["param_groups"][2]["expert"] = True  # 'muon' saved as an expert group
    with pytest.raises(
        ValueError, match=rf"saved param group 2 \('muon'\) is an expert group.*is a dense group.*{fix}"
    ):
        optimizer.load_state_dict(swapped)
    short = copy.deepcopy(saved)
    short["param_groups"][3]["params"].pop()
    with pytest.raises(ValueError, match=rf"'expert_muon'\) holds 5 parameters.*holds 6: .*{fix}"):
        optimizer.load_state_dict(short)
    stray = copy.deepcopy(saved)
    stray["state"][99] = {}
    with pytest.raises(ValueError, match=r"state for \[99\], which no saved param group lists"):
        optimizer.load_state_dict(stray)
    with pytest.raises(ValueError, match=r"lacks \['param_groups'\].*or the \{'dense', 'experts'\} layout"):
        optimizer.load_state_dict({"state": saved["state"]})


def test_deepcopy_is_an_independent_optimizer(toy_moe):
    """torch's ``__getstate__`` keeps only the (derived) groups and state; MoEOptimizer keeps its
    two optimizers, so a deep copy of model and optimizer together trains on its own."""
    optimizer = _moe(toy_moe)
    _train(toy_moe, optimizer, range(2))
    twin, twin_optimizer = copy.deepcopy((toy_moe, optimizer))
    assert twin_optimizer.experts.param_groups[0]["params"][0] is twin.w_in
    _train(toy_moe, optimizer, range(2, 4))
    _train(twin, twin_optimizer, range(2, 4))
    _assert_same_params(twin, toy_moe)
    assert not any(p is q for p, q in zip(twin.parameters(), toy_moe.parameters(), strict=True))


def test_torch_state_dict_hooks_run(toy_moe):
    optimizer = _moe(toy_moe)
    calls = []
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append(("saved", len(sd["param_groups"]))))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("loaded", opt is optimizer)))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == [("saved", 5), ("loaded", True)]


# -- torch.distributed.checkpoint ---------------------------------------------------------------
def _dcp_round_trip(initial: torch.nn.Module, directory: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """DCP's own idiom: get_*_state_dict -> dcp.save after 3 steps; a fresh model and optimizer
    (stepped once, so their state differs) dcp.load -> set_*_state_dict. Both then take 3 more
    steps; returns (uninterrupted, resumed)."""
    first = copy.deepcopy(initial)
    optimizer = _moe(first)
    _train(first, optimizer, range(3))
    saved = {"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, optimizer)}
    # DCP keys optimizer state by parameter name: the expert stacks' momentum is there by name.
    assert saved["optim"]["state"]["w_in"]["momentum_buffer"].shape == first.w_in.shape
    assert any("w_in" in g["params"] and g["expert"] for g in saved["optim"]["param_groups"])
    dcp.save(saved, checkpoint_id=directory)

    resumed = copy.deepcopy(initial)
    resumed_optimizer = _moe(resumed)
    _train(resumed, resumed_optimizer, [10])
    template = {
        "model": get_model_state_dict(resumed),
        "optim": get_optimizer_state_dict(resumed, resumed_optimizer),
    }
    dcp.load(template, checkpoint_id=directory)
    set_model_state_dict(resumed, template["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, template["optim"])
    _assert_same_state(resumed_optimizer.state_dict()["state"], optimizer.state_dict()["state"])

    _train(first, optimizer, range(3, 6))
    _train(resumed, resumed_optimizer, range(3, 6))
    return first, resumed


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # single process, on purpose
def test_distributed_checkpoint_round_trip_continues_bit_identically(toy_moe, tmp_path):
    uninterrupted, resumed = _dcp_round_trip(toy_moe, str(tmp_path))
    _assert_same_params(resumed, uninterrupted)


def _dcp_rank(rank: int, world_size: int, directory: str) -> dict[str, bool]:
    torch.manual_seed(0)
    uninterrupted, resumed = _dcp_round_trip(ToyMoE(), directory)  # replicated, as under DDP
    return {
        name: torch.equal(a, b)
        for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters(), strict=True)
    }


@pytest.mark.slow
def test_distributed_checkpoint_round_trip_on_two_gloo_ranks(tmp_path):
    """The same with a process group: DCP's planner writes each replicated tensor once and every
    rank reads it back (the state dict has the same keys on every rank)."""
    for same in run_ranks(_dcp_rank, 2, str(tmp_path)):
        assert same and all(same.values()), [name for name, equal in same.items() if not equal]


# -- schedulers after a load (F1) ---------------------------------------------------------------
@pytest.mark.parametrize("linked", [True, False], ids=["linked", "unlinked"])
def test_expert_groups_follow_a_lambda_lr_after_resume(toy_moe, linked):
    """A LambdaLR built on the fresh optimizer before loading drives the loaded expert groups:
    the schedule reaches them directly (unlinked) and through their dense group (linked)."""

    def factor(epoch):
        return 0.5**epoch

    def build(model):
        groups = _groups(model, expert_lr_mult=0.25)
        if not linked:
            for group in groups:
                group.pop("link", None)
        optimizer = expertopt.MoEOptimizer.from_groups(groups, ns_dtype="float32")
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    first = copy.deepcopy(toy_moe)
    optimizer, scheduler = build(first)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    _train(first, optimizer, range(3), scheduler)
    saved = copy.deepcopy({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})

    resumed = copy.deepcopy(first)
    resumed_optimizer, resumed_scheduler = build(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    for epoch in range(3, 6):
        expected = [lr * factor(epoch) for lr in base_lrs]
        for opt in (optimizer, resumed_optimizer):
            assert [group["lr"] for group in opt.param_groups] == pytest.approx(expected)
            mults = [group["lr_mult"] for group in opt.param_groups]
            assert opt.effective_lrs() == pytest.approx(
                [lr * m for lr, m in zip(expected, mults, strict=True)]
            )
        assert any(g["expert"] and g["lr_mult"] == 0.25 for g in resumed_optimizer.param_groups)
        _train(first, optimizer, [epoch], scheduler)
        _train(resumed, resumed_optimizer, [epoch], resumed_scheduler)
    _assert_same_params(resumed, first)

"""build_param_groups: routing, expert detection, rules with coverage checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import expertopt
from expertopt import Rule, build_param_groups, is_expert_param


def _by_name(groups):
    return {g["name"]: g for g in groups}


def _route(groups):
    return {name: g["name"] for g in groups for name in g["param_names"]}


def test_default_routing(toy_moe):
    groups = build_param_groups(toy_moe, lr=0.02, adamw_lr=4e-3, weight_decay=0.1)
    route = _route(groups)
    assert route["q_proj.weight"] == "muon"
    assert route["o_proj.weight"] == "muon"
    assert route["router.weight"] == "muon"  # Moonlight/Kimi default
    assert route["embed.weight"] == "adamw"
    assert route["lm_head.weight"] == "adamw"
    assert route["norm.weight"] == route["norm.bias"] == route["o_proj.bias"] == "adamw_no_decay"
    assert route["w_in"] == route["w_out"] == "expert_muon"
    assert route["experts.0.weight"] == route["experts.3.weight"] == "expert_muon"
    assert route["experts.2.bias"] == "expert_adamw_no_decay"
    # Every trainable parameter exactly once.
    assert sorted(route) == sorted(n for n, _ in toy_moe.named_parameters())

    by_name = _by_name(groups)
    assert by_name["expert_muon"]["expert"] and by_name["expert_muon"]["link"] == "muon"
    assert by_name["expert_adamw_no_decay"]["link"] == "adamw_no_decay"
    assert not by_name["muon"]["expert"] and by_name["muon"]["link"] is None
    # One scheduled lr everywhere; ratios live in lr_mult (F2).
    assert {g["lr"] for g in groups} == {0.02}
    assert by_name["adamw"]["lr_mult"] == pytest.approx(4e-3 / 0.02)
    assert by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert by_name["adamw"]["weight_decay"] == 0.1


def test_router_to_adamw_and_expert_multiplier(toy_moe):
    groups = _by_name(build_param_groups(toy_moe, router="adamw", expert_lr_mult=0.25))
    assert "router.weight" in groups["adamw"]["param_names"]
    assert groups["expert_muon"]["lr_mult"] == pytest.approx(0.25)


def test_tied_head_goes_to_adamw():
    model = nn.Sequential()
    model.embed = nn.Embedding(10, 8)
    model.hidden = nn.Linear(8, 8)
    model.proj = nn.Linear(8, 10, bias=False)
    model.proj.weight = model.embed.weight  # tied under a name no head pattern matches
    route = _route(build_param_groups(model))
    assert route == {"embed.weight": "adamw", "hidden.weight": "muon", "hidden.bias": "adamw_no_decay"}


def test_rules_first_match_wins_and_set_options(toy_moe):
    rules = [
        Rule(r"^q_proj\.", {"num_heads": 4, "name": "attention"}),
        Rule(lambda name, p: name.startswith("experts."), {"use_muon": False, "weight_decay": 0.0}),
        Rule(r"^q_proj\.", {"use_muon": False}),  # never reached for q_proj ... so it is unused
    ]
    with pytest.raises(ValueError, match=r"rules matched no trainable parameter: '\^q_proj\\\\.'"):
        build_param_groups(toy_moe, rules=rules)
    groups = _by_name(build_param_groups(toy_moe, rules=rules[:2]))
    assert groups["attention"]["param_names"] == ["q_proj.weight"] and groups["attention"]["num_heads"] == 4
    assert (
        groups["rule1"]["expert"] and not groups["rule1"]["use_muon"] and groups["rule1"]["link"] == "adamw"
    )


def test_rule_with_unknown_option_is_rejected():
    with pytest.raises(ValueError, match=r"unknown options \['lrr'\]"):
        Rule("x", {"lrr": 1.0})


def test_frozen_parameters_are_left_out(toy_moe):
    toy_moe.embed.weight.requires_grad_(False)
    assert "embed.weight" not in _route(build_param_groups(toy_moe))


@pytest.mark.parametrize(
    ("tag", "value"),
    [("allreduce", False), ("ds_zero_placement_family", "autoep_expert"), ("is_expert_group", True)],
)
def test_deepspeed_and_autoep_expert_tags(tag, value):
    weight = nn.Parameter(torch.randn(8, 8))
    assert not is_expert_param("mlp.weight", weight)
    setattr(weight, tag, value)
    assert is_expert_param("mlp.weight", weight)


def test_conv_weight_is_not_an_expert():
    conv = nn.Conv2d(3, 8, 3)
    assert not is_expert_param("conv.weight", conv.weight, conv)
    assert _route(build_param_groups(nn.Sequential(conv)))["0.weight"] == "muon"


def test_groups_feed_muon_and_moe_optimizer(toy_moe):
    groups = build_param_groups(toy_moe)
    opt = expertopt.MoEOptimizer.from_groups(groups)
    assert [g["name"] for g in opt.experts.param_groups] == ["expert_muon", "expert_adamw_no_decay"]
    assert all(not g["expert"] for g in opt.dense.param_groups)
    assert len(opt.param_groups) == len(groups)

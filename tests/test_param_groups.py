"""build_param_groups: routing, expert detection, rules with coverage checks."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks
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
    groups = _by_name(build_param_groups(nn.Sequential(conv)))
    assert groups["muon_flatten"]["param_names"] == ["0.weight"]
    assert groups["muon_flatten"]["matrix_layout"] == "flatten" and not groups["muon_flatten"]["expert"]


def test_groups_feed_muon_and_moe_optimizer(toy_moe):
    groups = build_param_groups(toy_moe)
    opt = expertopt.MoEOptimizer.from_groups(groups)
    assert [g["name"] for g in opt.experts.param_groups] == ["expert_muon", "expert_adamw_no_decay"]
    assert all(not g["expert"] for g in opt.dense.param_groups)
    assert len(opt.param_groups) == len(groups)


# -- structural routing on plain torch modules ---------------------------------------------------
class _Router(nn.Module):
    def __init__(self, inner: str, d: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.add_module(inner, nn.Linear(d, experts, bias=False))


class _NormEmbedding(nn.Embedding):
    """An embedding whose class name contains 'norm' (e.g. a normalized embedding)."""


class _GptOssLikeExperts(nn.Module):
    """Stored [E, in, out] and declared so, as transformers' ``@use_experts_implementation(is_transposed=True)``."""

    is_transposed = True

    def __init__(self, experts: int = 4, d: int = 8, inter: int = 12) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, d, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(experts, 2 * inter))
        self.down_proj = nn.Parameter(torch.randn(experts, inter, d))


class _SharedExperts(nn.Module):
    def __init__(self, d: int = 8, inter: int = 12) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(1, inter, d))


class _Mamba(nn.Module):
    def __init__(self, heads: int = 4, state: int = 6, channels: int = 16) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(heads, state))  # Jamba: [H, N]
        self.D = nn.Parameter(torch.ones(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.conv1d = nn.Conv1d(channels, channels, 4, groups=channels)  # depthwise [C, 1, K]


def _zoo() -> nn.Module:
    model = nn.Module()
    model.embed = _NormEmbedding(16, 8)
    model.router = _Router("layer")  # JetMoE / DBRX router.layer
    model.gate = _Router("wg")  # Hunyuan gate.wg
    model.mlp = nn.Module()
    model.mlp.router = _Router("proj")  # Gemma-4 router.proj
    model.ffn = nn.Module()
    model.ffn.router = _Router("classifier")  # LongCat / Switch router.classifier
    model.shared_expert_gate = nn.Linear(8, 1, bias=False)  # Qwen2-MoE
    model.experts = _GptOssLikeExperts()
    model.shared_experts = _SharedExperts()
    model.mamba = _Mamba()
    model.forget_gate_A_log = nn.Parameter(torch.zeros(1, 1, 4, 1))  # Kimi-Linear's 4-D A_log
    model.conv = nn.Conv1d(4, 6, 3)  # a full 3-D conv
    model.conv2d = nn.Conv2d(3, 5, 3)
    model.hidden = nn.Linear(8, 8)
    model.lm_head = nn.Linear(8, 16, bias=False)
    return model


def test_structural_routing_of_routers_ssm_convs_experts_and_embeddings():
    groups = build_param_groups(
        _zoo(), router="adamw", rules=[Rule(r"^forget_gate_A_log$", {"use_muon": False, "weight_decay": 0.0})]
    )
    route = _route(groups)
    for name in (
        "router.layer.weight",
        "gate.wg.weight",
        "mlp.router.proj.weight",
        "ffn.router.classifier.weight",
        "shared_expert_gate.weight",
    ):
        assert route[name] == "adamw", name  # every router form honours router="adamw"
    assert route["lm_head.weight"] == route["embed.weight"] == "adamw"
    assert _by_name(groups)["adamw"]["weight_decay"] == 0.1  # the "norm"-named embedding keeps decay
    assert route["mamba.A_log"] == route["mamba.D"] == route["mamba.dt_bias"] == "adamw_no_decay"
    assert route["mamba.conv1d.weight"] == "adamw" and route["mamba.conv1d.bias"] == "adamw_no_decay"
    assert route["conv.weight"] == route["conv2d.weight"] == "muon_flatten"  # every full conv alike
    assert route["experts.gate_up_proj"] == route["experts.down_proj"] == "expert_muon_in_out"
    assert route["experts.gate_up_proj_bias"] == "expert_adamw_no_decay"  # tagged expert, no decay
    assert route["shared_experts.up_proj"] == "muon"  # [1, I, H] shared expert: dense, not an expert
    assert route["hidden.weight"] == "muon"


def test_expert_bias_follows_expert_lr_mult_and_layout_travels_with_groups():
    groups = _by_name(build_param_groups(_zoo(), lr=0.02, adamw_lr=4e-3, expert_lr_mult=0.5))
    assert groups["expert_adamw_no_decay"]["lr_mult"] == pytest.approx(0.5 * 4e-3 / 0.02)
    stacks = groups["expert_muon_in_out"]
    assert (stacks["matrix_layout"], stacks["row_blocks"], stacks["link"]) == ("in_out", None, "muon")
    assert groups["muon"]["matrix_layout"] == "out_in" and "matrix_layout" not in groups["adamw"]
    optimizer = expertopt.MoEOptimizer.from_groups(list(groups.values()))
    assert {g["name"]: g["matrix_layout"] for g in optimizer.param_groups if g["use_muon"]}[
        "expert_muon_in_out"
    ] == "in_out"


# -- per-expert parity with torch.optim.Muon on each expert turned into [out, in] ---------------
def _torch_muon_per_expert(slices, grads_per_step, **kwargs):
    """torch.optim.Muon on each expert matrix ``[out, in]`` on its own: the reference."""
    params = [nn.Parameter(s.clone()) for s in slices]
    optimizer = torch.optim.Muon(params, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    ("layout", "shape", "row_blocks"),
    [
        ("in_out", (3, 8, 24), None),  # gpt-oss gate_up_proj [E, H, 2I]: fan-out 24, fan-in 8
        ("in_out", (3, 12, 8), None),  # gpt-oss down_proj [E, I, H]
        ("out_in", (12, 8), 3),  # DBRX w1 [E*I, H]
        ("in_out", (12, 8), 3),  # DBRX w2 [E*I, H], each expert [I, H] = [in, out]
    ],
)
def test_each_expert_steps_like_torch_muon_on_its_out_in_matrix(layout, shape, row_blocks):
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    grads_per_step = [torch.randn(shape, generator=generator) for _ in range(4)]
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}

    def experts_out_in(tensor):  # [E, out, in] views of the stored tensor
        stack = tensor.reshape(row_blocks, -1, tensor.shape[-1]) if row_blocks else tensor
        return list(stack.transpose(-2, -1) if layout == "in_out" else stack)

    expected = _torch_muon_per_expert(
        experts_out_in(weight.detach()), [experts_out_in(g) for g in grads_per_step], **kwargs
    )
    group = {"params": [weight], "expert": True, "matrix_layout": layout, "row_blocks": row_blocks}
    optimizer = expertopt.Muon([group], ns_dtype="bfloat16", **kwargs)
    start = weight.detach().clone()
    for grad in grads_per_step:
        weight.grad = grad.clone()
        optimizer.step()
    for ours, theirs, begin in zip(
        experts_out_in(weight.detach()), expected, experts_out_in(start), strict=True
    ):
        moved = (theirs - begin).norm()
        # Both run Newton-Schulz in bf16 (torch normalizes in bf16, we in fp32): 0.5-0.6% apart
        # after a few steps (see test_muon). An inverted fan ratio would be off by sqrt(3) = 73%.
        assert (ours - theirs).norm() / moved < 2e-2


# -- the layout in the distributed paths: ZeRO flat partitions and ZeRO-0 replicas --------------
_LAYOUT_CASES = [  # (shape, matrix_layout, row_blocks): gpt-oss-like stacks and a DBRX-like 2-D stack
    ((3, 8, 24), "in_out", None),
    ((3, 12, 8), "in_out", None),
    ((12, 8), "in_out", 3),
]


def _whole_and_grads(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), [
        torch.randn(shape, generator=generator) for _ in range(3)
    ]


def _single_process(shape, layout, blocks):
    start, grads = _whole_and_grads(shape)
    weight = nn.Parameter(start.clone())
    group = {"params": [weight], "expert": True, "matrix_layout": layout, "row_blocks": blocks}
    optimizer = expertopt.Muon([group], lr=0.02, ns_dtype="float32")
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    return weight.detach()


def _layout_paths_on_rank(rank: int, world_size: int) -> list[dict]:
    from expertopt.distributed.layout import flat_partition_layout, replicated_layout
    from expertopt.distributed.step import ShardedMatrices

    results = []
    for shape, layout, blocks in _LAYOUT_CASES:
        start, grads = _whole_and_grads(shape)
        numel = start.numel()
        partition = -(-(numel + 5) // world_size)  # padding past the tensor, as ZeRO alignment adds
        keys = {"expert": True, "matrix_layout": layout, "row_blocks": blocks}
        view = {"is_expert": True, "matrix_layout": layout, "row_blocks": blocks}
        flat_layout = flat_partition_layout([torch.Size(shape)], [0], partition, world_size, **view)

        def my_slice(full, partition=partition):
            padded = torch.cat([full.reshape(-1), full.new_zeros(partition * world_size - full.numel())])
            return padded[rank * partition : (rank + 1) * partition].clone()

        flat = nn.Parameter(my_slice(start))
        sharded = expertopt.Muon(
            [{"params": [nn.Parameter(start.clone())], **keys}], lr=0.02, ns_dtype="float32"
        )
        sharded.param_groups[0]["params"] = [flat]  # as ZeRO-1/2 does after building the optimizer
        sharded.place_shards([(flat, ShardedMatrices(flat_layout, rank))])
        whole = nn.Parameter(start.clone())
        replicated = expertopt.Muon([{"params": [whole], **keys}], lr=0.02, ns_dtype="float32")
        replicas = ShardedMatrices(replicated_layout([torch.Size(shape)], world_size, **view), rank)
        replicated.place_shards([(whole, replicas)])
        for grad in grads:
            flat.grad, whole.grad = my_slice(grad), grad.clone()
            sharded.step()
            replicated.step()
        results.append({"flat": flat.detach(), "replicated": whole.detach()})
    return results


def test_layouts_reach_zero_partitions_and_replicas_unchanged():
    per_rank = run_ranks(_layout_paths_on_rank, 2)
    for index, (shape, layout, blocks) in enumerate(_LAYOUT_CASES):
        expected = _single_process(shape, layout, blocks)
        gathered = torch.cat([r[index]["flat"] for r in per_rank])[: expected.numel()].view(shape)
        # fp32 Newton-Schulz: the same kernel on the same matrices, batching differences only.
        torch.testing.assert_close(gathered, expected, atol=1e-6, rtol=0)
        for result in per_rank:
            torch.testing.assert_close(result[index]["replicated"], expected, atol=1e-6, rtol=0)


# -- layouts that cannot fit a tensor: clear errors ----------------------------------------------
def test_layout_errors_name_the_parameter_and_the_fix(toy_moe):
    with pytest.raises(ValueError, match=r"'w_in' \(shape \(4, 24, 16\)\).*row_blocks=4 needs a 2-D weight"):
        build_param_groups(toy_moe, rules=[Rule(r"^w_in$", {"row_blocks": 4})])
    with pytest.raises(ValueError, match=r"'q_proj.weight' \(shape \(16, 16\)\).*split evenly into expert"):
        build_param_groups(toy_moe, rules=[Rule(r"^q_proj\.", {"row_blocks": 3})])
    with pytest.raises(ValueError, match=r"'norm.weight' \(shape \(16,\)\) goes to AdamW.*matrix_layout"):
        build_param_groups(toy_moe, rules=[Rule(r"^norm\.weight", {"matrix_layout": "in_out"})])
    with pytest.raises(ValueError, match=r"'norm.weight' \(shape \(16,\)\).*Muon needs matrices"):
        build_param_groups(toy_moe, rules=[Rule(r"^norm\.weight", {"use_muon": True})])
    with pytest.raises(
        ValueError, match=r"matrix_layout='inout'; use one of \('out_in', 'in_out', 'flatten'\)"
    ):
        Rule("x", {"matrix_layout": "inout"})
    with pytest.raises(ValueError, match=r"group 'stacks' would mix matrix layouts"):
        rules = [
            Rule(r"^w_in$", {"name": "stacks", "matrix_layout": "in_out"}),
            Rule(r"^w_out$", {"name": "stacks"}),
        ]
        build_param_groups(toy_moe, rules=rules)


def test_muon_rejects_a_group_layout_that_does_not_fit():
    stack = nn.Parameter(torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match=r"parameter #0 \(shape \(2, 6, 4\)\) does not fit.*row_blocks=2"):
        expertopt.Muon([{"params": [stack], "row_blocks": 2}])
    with pytest.raises(ValueError, match=r"matrix_layout='rows' is unknown"):
        expertopt.Muon([{"params": [stack], "matrix_layout": "rows"}])
    with pytest.raises(ValueError, match=r"row_blocks must be a positive int or None, got 0"):
        expertopt.Muon([{"params": [stack], "row_blocks": 0}])

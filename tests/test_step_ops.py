"""Issue 12: the single-process step costs a fixed number of ops per matrix shape, compiles
without graph breaks, needs no host sync, and keeps torch's checkpoint layout.

Ops are counted on the probe model of ``bench/probe.py`` (per layer: qkv, proj, router, two
16-expert stacks, two norms) at small widths: the count depends on the shapes' number, not size.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from conftest import assert_compiled_step_matches_eager

import expertopt
from bench.probe import ProbeMoE, count_step_ops
from expertopt.updates.muon import MuonHyperparams, muon_step, plan_muon_step

# Issue 12's bound on the probe model at any depth.
MAX_OPS = 300


def _probe_optimizer(layers: int, **options) -> expertopt.Muon:
    model = ProbeMoE(layers, d=32, d_ff=8)  # five distinct matrix shapes
    model.fill_grads()
    optimizer = expertopt.Muon(expertopt.build_param_groups(model), **options)
    optimizer.step()  # plans the buckets
    return optimizer


def test_op_count_is_flat_in_depth_and_bounded():
    counts = {layers: count_step_ops(_probe_optimizer(layers)) for layers in (1, 4, 16)}
    totals = {layers: counter.total for layers, counter in counts.items()}
    assert len(set(totals.values())) == 1, totals
    assert totals[1] <= MAX_OPS, counts[1].ops
    # One Newton-Schulz call per distinct shape: qkv, proj, router, w_in, w_out, each 5 steps of
    # 3 products (bmm and baddbmm: their split depends on the compute dtype, see the kernel).
    assert counts[16].ops["bmm"] + counts[16].ops["baddbmm"] == 5 * 5 * 3


def test_capturable_step_has_no_host_sync():
    # aten::_local_scalar_dense is what .item(), bool(tensor) and float(tensor) dispatch.
    optimizer = _probe_optimizer(2, lr=torch.tensor(0.02), capturable=True)
    assert count_step_ops(optimizer).ops["_local_scalar_dense"] == 0
    # The same with the tensor lr in the group itself (a plain parameter list).
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    for param in params:
        param.grad = torch.randn(8, 8)
    optimizer = expertopt.Muon(params, lr=torch.tensor(0.02), capturable=True)
    optimizer.step()
    assert count_step_ops(optimizer).ops["_local_scalar_dense"] == 0
    # The default reads the non-finite flag once, after the step is queued, to warn.
    assert count_step_ops(_probe_optimizer(2)).ops["_local_scalar_dense"] == 1


def _stacks(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 12, 20), (12, 20), (20, 12), (2, 3, 8, 8), (24, 16)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    buffers = [torch.randn(s, generator=generator) for s in shapes]
    return params, grads, buffers


HYPER = MuonHyperparams(
    lr=0.03,
    weight_decay=0.1,
    momentum=0.9,
    nesterov=True,
    ns_method="standard",
    ns_steps=5,
    ns_coefficients=(3.4445, -4.7750, 2.0315),
    ns_dtype="float32",
    eps=1e-7,
    adjust_lr_fn=None,
)


def test_core_step_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break, including a host sync (.item()) dynamo cannot trace."""
    params, grads, buffers = _stacks()
    expected_params, expected_buffers = copy.deepcopy(params), copy.deepcopy(buffers)
    hyper = dataclasses.replace(HYPER, lr=torch.tensor(0.03))
    finite = torch.tensor(True)
    plan = plan_muon_step(params, buffers, hyper, is_expert=True)
    reference_plan = plan_muon_step(expected_params, expected_buffers, hyper, is_expert=True)

    def core(params, grads, plan, hyper, finite):
        muon_step(params, grads, plan.momentum_views, hyper, is_expert=True, plan=plan, finite=finite)

    torch._dynamo.reset()
    compiled = torch.compile(core, fullgraph=True, backend="eager")
    for _ in range(2):
        compiled(params, grads, plan, hyper, finite)
        core(expected_params, grads, reference_plan, hyper, finite)
    for p, q in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_functional_step_without_a_plan_equals_the_planned_one():
    params, grads, buffers = _stacks()
    planned_params, planned_buffers = copy.deepcopy(params), copy.deepcopy(buffers)
    plan = plan_muon_step(planned_params, planned_buffers, HYPER, is_expert=True)
    muon_step(params, grads, buffers, HYPER, is_expert=True)
    muon_step(planned_params, grads, plan.momentum_views, HYPER, is_expert=True, plan=plan)
    for p, q in zip(params, planned_params, strict=True):
        assert torch.equal(p, q)
    for b, view in zip(buffers, plan.momentum_views, strict=True):
        assert torch.equal(b, view)


def _stacks_in(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    return tuple([t.to(dtype) for t in tensors] for tensors in _stacks())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_masked_step_leaves_params_and_momentum_bit_identical(dtype, bad):
    params, grads, buffers = _stacks_in(dtype)
    before_params, before_buffers = copy.deepcopy(params), copy.deepcopy(buffers)
    grads[1][3, 4] = bad
    grads[0][1, 2, 3] = -bad
    grads[2][0, 0] = 1e30  # finite beside the bad values: a skipped step must not orthogonalize it
    muon_step(params, grads, buffers, HYPER, is_expert=True, finite=torch.tensor(False))
    for p, q in zip(params + buffers, before_params + before_buffers, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_step_equals_the_step_without_a_guard_bitwise(dtype):
    # The mask (gradients lerped towards the momentum with weight 0) must not move a single bit.
    # No weight decay: unguarded it is a float, guarded a tensor, and torch's bf16 foreach multiply
    # rounds those two differently (one bf16 ulp, before and after the mask changed).
    hyper = dataclasses.replace(HYPER, weight_decay=0.0)
    params, grads, buffers = _stacks_in(dtype)
    guarded_params, guarded_buffers = copy.deepcopy(params), copy.deepcopy(buffers)
    muon_step(params, grads, buffers, hyper, is_expert=True)
    muon_step(guarded_params, grads, guarded_buffers, hyper, is_expert=True, finite=torch.tensor(True))
    for p, q in zip(params + buffers, guarded_params + guarded_buffers, strict=True):
        assert torch.equal(p, q)


def test_capturable_counts_skipped_steps_on_the_device():
    optimizer = _probe_optimizer(1, lr=torch.tensor(0.02), capturable=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    snapshot = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    params[0].grad[0, 0] = float("inf")
    optimizer.step()  # no warning: capturable reads nothing back
    assert optimizer.nonfinite_steps == 1
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))
    for key, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, state["state"][key][name]), name


def test_state_dict_keeps_torch_layout_and_reloads_into_a_stepped_optimizer(toy_moe):
    """Per-parameter momentum_buffer of the parameter's shape; loading into an optimizer that has
    already planned its buckets re-stacks the loaded momentum (continues bit-identically)."""
    from conftest import toy_loss

    def train(model, optimizer, steps, seed0):
        for t in range(seed0, seed0 + steps):
            optimizer.zero_grad()
            toy_loss(model, t).backward()
            optimizer.step()

    first = copy.deepcopy(toy_moe)
    optimizer = expertopt.Muon(expertopt.build_param_groups(first))
    train(first, optimizer, 3, 0)
    saved = optimizer.state_dict()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if group["use_muon"]:
                assert optimizer.state[param]["momentum_buffer"].shape == param.shape
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": saved}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = copy.deepcopy(toy_moe)
    resumed_optimizer = expertopt.Muon(expertopt.build_param_groups(resumed))
    train(resumed, resumed_optimizer, 1, 10)  # plans its buckets on other momentum
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["opt"])
    train(first, optimizer, 2, 3)
    train(resumed, resumed_optimizer, 2, 3)
    for (name, a), b in zip(first.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_whole_step_of_a_muon_only_optimizer_compiles_without_graph_breaks():
    """``optimizer.step`` itself: guard, plan lookup, every bucket. (torch wraps its own fused
    AdamW in ``torch.compiler.disable``, so a step with an AdamW half breaks the graph there.)"""

    def build() -> expertopt.Muon:
        model = ProbeMoE(2, d=32, d_ff=8)
        model.fill_grads()
        groups = [g for g in expertopt.build_param_groups(model) if g["use_muon"]]
        return expertopt.Muon(groups, lr=torch.tensor(0.02), capturable=True)

    assert_compiled_step_matches_eager(build)


def test_orthogonalize_writes_scaled_result_into_out_even_when_out_is_the_input():
    from expertopt.kernels import orthogonalize

    G = torch.randn(6, 12, 20)
    tall = torch.randn(3, 20, 12)
    scale = torch.full((1, 1, 1), -0.5)
    for matrices in (G, tall):
        expected = -0.5 * orthogonalize(matrices, dtype="float32")
        aliased = matrices.clone()
        result = orthogonalize(aliased, dtype="float32", out=aliased, out_scale=scale)
        assert result is aliased
        torch.testing.assert_close(aliased, expected, atol=1e-6, rtol=0)


def test_plan_for_other_parameters_is_refused():
    params, grads, buffers = _stacks()
    plan = plan_muon_step(params[:2], buffers[:2], HYPER, is_expert=True)
    with pytest.raises(ValueError, match="re-plan"):
        muon_step(params, grads, buffers, HYPER, is_expert=True, plan=plan)

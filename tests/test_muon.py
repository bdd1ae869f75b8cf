"""expertopt.Muon: torch.optim.Muon drop-in, per-expert batching, AdamW half, F8/F10/F11, resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import expertopt
from expertopt.kernels import orthogonalize
from expertopt.kernels.reference import newton_schulz_loop, polar_factor_svd
from expertopt.updates import muon as muon_updates


def _params(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]


def _grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) for p in params]


def _run(optimizer, params, steps, seed0=0):
    for t in range(steps):
        for p, g in zip(params, _grads(params, seed0 + t), strict=True):
            p.grad = g
        optimizer.step()


def _reference_muon(params, grads_per_step, *, lr, wd, momentum, nesterov, adjust):
    """Per-matrix Muon written from torch's formula with an fp32 per-matrix NS loop."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, b, g in zip(params, bufs, grads, strict=True):
            b.lerp_(g, 1 - momentum)
            u = g.lerp(b, momentum) if nesterov else b
            flat = u.reshape(-1, *u.shape[-2:])
            o = torch.stack([orthogonalize(m, dtype=torch.float32) for m in flat]).view_as(p)
            scale = (
                math.sqrt(max(1, p.shape[-2] / p.shape[-1]))
                if adjust is None
                else 0.2 * math.sqrt(max(p.shape[-2:]))
            )
            p.mul_(1 - lr * wd).add_(o, alpha=-lr * scale)
    return params


# -- drop-in for torch.optim.Muon -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 0.02, "weight_decay": 0.0, "nesterov": False},
        {"lr": torch.tensor(0.01), "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"},
        {"lr": 0.05, "adjust_lr_fn": "original", "ns_steps": 4, "ns_coefficients": (3.0, -3.2, 1.2)},
    ],
)
def test_follows_torch_muon_trajectory_on_2d(kwargs):
    # Both run Newton-Schulz in bf16; torch normalizes in bf16, we in fp32, so trajectories
    # differ by bf16 rounding: measured 0.5-0.6% of the displacement after 10 steps.
    ours = _params((32, 64), (64, 32), (48, 48))
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    _run(expertopt.Muon(ours, **copy.deepcopy(kwargs)), ours, 10)
    _run(torch.optim.Muon(theirs, **copy.deepcopy(kwargs)), theirs, 10)
    for p, q, p0 in zip(ours, theirs, start, strict=True):
        moved = (q - p0).norm()
        assert moved > 0
        assert (p - q).norm() / moved < 2e-2


def test_same_defaults_as_torch_muon():
    torch_defaults = torch.optim.Muon(_params((4, 4))).defaults
    ours = expertopt.Muon(_params((4, 4))).defaults
    for key, value in torch_defaults.items():
        assert ours[key] == value, key


def test_loads_torch_muon_checkpoint_and_continues_identically():
    # A torch.optim.Muon state_dict (momentum_buffer keys) loads into expertopt.Muon.
    params = _params((8, 16), (16, 8))
    torch_opt = torch.optim.Muon(params, lr=0.02)
    _run(torch_opt, params, 2)
    ours = expertopt.Muon(params, lr=0.02)
    ours.load_state_dict(torch_opt.state_dict())
    for p in params:
        assert torch.equal(ours.state[p]["momentum_buffer"], torch_opt.state[p]["momentum_buffer"])


# -- stacked experts: the core invariant --------------------------------------------------------
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_stacked_experts_equal_per_matrix_reference(adjust, nesterov):
    stacked = _params((6, 12, 20), (6, 20, 12), (3, 2, 8, 8))  # incl. tall experts and a 4-D stack
    grads_per_step = [_grads(stacked, seed) for seed in range(4)]
    expected = _reference_muon(
        stacked, grads_per_step, lr=0.03, wd=0.1, momentum=0.9, nesterov=nesterov, adjust=adjust
    )
    opt = expertopt.Muon(
        [{"params": stacked, "expert": True}],
        lr=0.03,
        momentum=0.9,
        nesterov=nesterov,
        adjust_lr_fn=adjust,
        ns_dtype="float32",
    )
    for grads in grads_per_step:
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, ref in zip(stacked, expected, strict=True):
        torch.testing.assert_close(p.detach(), ref, atol=2e-6, rtol=0)


def test_one_expert_scaled_does_not_change_others():
    # F8: normalizing across the expert axis would shrink the other experts' updates.
    grads = torch.randn(4, 8, 16)
    louder = grads.clone()
    louder[0] *= 1000
    base = orthogonalize(grads, dtype=torch.float32)
    changed = orthogonalize(louder, dtype=torch.float32)
    torch.testing.assert_close(base[1:], changed[1:], atol=1e-6, rtol=0)


def test_conv_weight_flattened_unless_expert():
    conv = _params((8, 3, 3, 3))[0]
    grad = torch.randn(conv.shape)
    conv.grad = grad.clone()
    start = conv.detach().clone()
    expertopt.Muon([conv], lr=0.1, weight_decay=0, momentum=0, ns_dtype="float32").step()
    flat = orthogonalize(grad.reshape(8, 27), dtype=torch.float32).view_as(grad)
    torch.testing.assert_close(conv.detach(), start - 0.1 * flat, atol=1e-6, rtol=0)


def test_same_shape_matrices_share_one_newton_schulz_call(monkeypatch):
    calls = []

    def counting(G, **kwargs):
        calls.append(tuple(G.shape))
        return orthogonalize(G, **kwargs)

    monkeypatch.setattr(muon_updates, "orthogonalize", counting)
    params = _params((16, 32), (16, 32), (4, 16, 32), (32, 16), (8, 8))
    for p in params:
        p.grad = torch.randn(p.shape)
    expertopt.Muon(params).step()
    # [16,32] x2 + 4 experts -> one call of 6; [32,16] and [8,8] are other shapes.
    assert sorted(calls) == sorted([(6, 16, 32), (1, 32, 16), (1, 8, 8)])


def test_per_head_orthogonalization():
    weight = _params((12, 16))[0]
    grad = torch.randn(12, 16)
    weight.grad = grad.clone()
    start = weight.detach().clone()
    opt = expertopt.Muon(
        [{"params": [weight], "num_heads": 3}], lr=0.1, weight_decay=0, momentum=0, ns_dtype="float32"
    )
    opt.step()
    heads = torch.cat([orthogonalize(h, dtype=torch.float32) for h in grad.split(4)])
    torch.testing.assert_close(weight.detach(), start - 0.1 * heads, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["standard", "gram", "polar_express"])
def test_per_head_step_equals_float64_reference_for_every_method(method):
    # One SGD-like step (momentum 0, no decay) on a weight of 3 tall heads [16, 8] beside an
    # expert stack [2, 16, 8]: every head and expert moves by lr * sqrt(16 / 8) (its own shape,
    # not the weight's sqrt(48 / 8)) times its own polar direction. References outside the
    # kernel: the textbook quintic in float64, one head at a time, for standard and gram (equal
    # in exact arithmetic); for Polar Express with all 8 tabled steps, the exact float64 SVD
    # polar factor of each head. fp32 vs float64 over the iteration: measured ~1e-6.
    weight, experts = _params((48, 8), (2, 16, 8))
    grads = _grads([weight, experts], 1)
    weight.grad, experts.grad = (g.clone() for g in grads)
    starts = [weight.detach().clone(), experts.detach().clone()]
    steps = 8 if method == "polar_express" else 5
    groups = [{"params": [weight], "num_heads": 3}, {"params": [experts], "expert": True}]
    expertopt.Muon(
        groups, lr=0.1, momentum=0, weight_decay=0, ns_method=method, ns_steps=steps, ns_dtype="float32"
    ).step()
    for param, start, grad in zip((weight, experts), starts, grads, strict=True):
        matrices = grad.reshape(-1, 16, 8).double()  # the 3 heads, or the 2 experts
        if method == "polar_express":
            directions = polar_factor_svd(matrices)
        else:
            directions = newton_schulz_loop(matrices, dtype=torch.float64)
        expected = start.double() - 0.1 * math.sqrt(16 / 8) * directions.reshape(param.shape)
        torch.testing.assert_close(param.detach().double(), expected, atol=1e-5, rtol=0)


def test_gradient_scale_of_one_sgd_like_step():
    # momentum=0, wd=0: the step must be exactly lr * AdjustLR * NS(g), per expert.
    experts = _params((4, 24, 8))[0]
    grad = torch.randn(experts.shape)
    experts.grad = grad.clone()
    start = experts.detach().clone()
    opt = expertopt.Muon(
        [{"params": [experts], "expert": True, "lr_mult": 0.5}],
        lr=0.2,
        momentum=0,
        weight_decay=0,
        ns_dtype="float32",
    )
    opt.step()
    expected = start - 0.2 * 0.5 * math.sqrt(24 / 8) * orthogonalize(grad, dtype=torch.float32)
    torch.testing.assert_close(experts.detach(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["gram", "polar_express", "auto"])
def test_other_ns_methods_step(method):
    params = _params((16, 64), (4, 64, 16))
    start = [p.detach().clone() for p in params]
    _run(expertopt.Muon(params, lr=0.02, ns_method=method), params, 2)
    for p, p0 in zip(params, start, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, p0)


def test_auto_method_on_cpu_is_the_standard_iteration():
    a = _params((16, 64), (4, 64, 16))
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    _run(expertopt.Muon(a, ns_method="auto"), a, 2)
    _run(expertopt.Muon(b, ns_method="standard"), b, 2)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


# -- AdamW half -----------------------------------------------------------------------------------
def test_adamw_groups_match_torch_adamw():
    vectors = _params((16,), (8, 4), (3,))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in vectors]
    ours = expertopt.Muon(
        [
            {
                "params": vectors,
                "use_muon": False,
                "lr": 0.01,
                "betas": (0.8, 0.95),
                "eps": 1e-10,
                "weight_decay": 0.05,
            }
        ]
    )
    theirs = torch.optim.AdamW(
        reference, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05, fused=True
    )
    _run(ours, vectors, 5)
    _run(theirs, reference, 5)
    for p, q in zip(vectors, reference, strict=True):
        assert torch.equal(p, q)


def test_adamw_half_uses_its_own_eps_default():
    opt = expertopt.Muon(
        [{"params": _params((4, 4)), "use_muon": True}, {"params": _params((4,)), "use_muon": False}]
    )
    assert opt.param_groups[0]["eps"] == 1e-7  # Newton-Schulz epsilon, as torch.optim.Muon
    assert opt.param_groups[1]["eps"] == 1e-8  # AdamW epsilon


# -- non-finite gradients (F10) --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_leaves_params_and_state_untouched(bad):
    params = _params((8, 16), (4, 8, 8), (8,))
    groups = [{"params": params[:2]}, {"params": params[2:], "use_muon": False}]
    opt = expertopt.Muon(groups, lr=0.02)
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = expertopt.Muon(
        [{"params": reference_params[:2]}, {"params": reference_params[2:], "use_muon": False}], lr=0.02
    )
    _run(opt, params, 2)
    _run(reference, reference_params, 2)
    before = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[1].grad[2, 0, 0] = bad  # one expert of one tensor
    with pytest.warns(RuntimeWarning, match="non-finite gradient, step skipped"):
        opt.step()
    assert opt.nonfinite_steps == 1
    for p, s in zip(params, snapshot, strict=True):
        assert torch.equal(p, s)
    after = opt.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value), name
    # Training continues exactly as if the bad step never happened.
    _run(opt, params, 2, seed0=2)
    _run(reference, reference_params, 2, seed0=2)
    for p, q in zip(params, reference_params, strict=True):
        assert torch.equal(p, q)


# -- state: eager (F11) and resumable ------------------------------------------------------------
def test_state_is_created_eagerly_for_parameters_without_gradients():
    params = _params((8, 8), (4, 8, 8), (8,))
    opt = expertopt.Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}])
    params[0].grad = torch.randn(8, 8)  # the experts and the vector get no gradient
    opt.step()
    assert set(opt.state[params[1]]) == {"momentum_buffer"}
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert len(opt.state_dict()["state"]) == 3


def test_resume_is_bit_identical(toy_moe):
    from conftest import toy_loss

    def make(model):
        groups = expertopt.build_param_groups(model, lr=0.02, adamw_lr=3e-3)
        return expertopt.Muon(groups)

    def train(model, opt, steps, seed0):
        for t in range(seed0, seed0 + steps):
            opt.zero_grad()
            toy_loss(model, t).backward()
            opt.step()

    uninterrupted = copy.deepcopy(toy_moe)
    opt = make(uninterrupted)
    train(uninterrupted, opt, 6, 0)

    first = copy.deepcopy(toy_moe)
    opt_first = make(first)
    train(first, opt_first, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = copy.deepcopy(toy_moe)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(checkpoint["opt"])
    train(resumed, opt_resumed, 3, 3)
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name

"""Tests for the batched Newton-Schulz kernels: loop parity, torch parity, spectra, FLOPs, validation.

Tolerances are stated where they are used and were measured on a 2-core x86 CPU with torch 2.13.
Spectra use well-conditioned wide Gaussian matrices (fixed seed), where a 48 x 96 matrix has
sigma_min / sigma_max ~ 0.17, so 5 quintic steps reach the iteration's fixed band.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz
from torch.utils.flop_counter import FlopCounterMode

from expertopt.kernels import (
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    NS_DTYPES,
    POLAR_EXPRESS_COEFFICIENTS,
    newton_schulz,
    ns_flops,
    orthogonalize,
    resolve_ns_dtype,
    resolve_ns_method,
)
from expertopt.kernels.reference import newton_schulz_loop, polar_factor_svd

CPU = torch.device("cpu")
METHODS = ("standard", "gram", "polar_express")


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


# ---------------------------------------------------------------- batched == per-matrix loop


@pytest.mark.parametrize("shape", [(6, 24, 40), (6, 40, 24), (2, 3, 16, 16), (24, 40)])
def test_batched_equals_reference_loop_fp32(shape):
    G = gaussian(*shape)
    batched = orthogonalize(G, dtype="float32")
    # fp32 batched GEMMs and fused baddbmm accumulate in a different order from the loop's plain
    # ops: measured max 1.2e-6 over these shapes.
    torch.testing.assert_close(batched, newton_schulz_loop(G, dtype=torch.float32), atol=3e-6, rtol=0)


def test_polar_express_batched_equals_reference_loop_fp32():
    G = gaussian(6, 24, 40)
    batched = orthogonalize(G, method="polar_express", dtype="float32")
    reference = newton_schulz_loop(
        G, coefficients=POLAR_EXPRESS_COEFFICIENTS[:DEFAULT_NS_STEPS], norm_scale=1.01
    )
    # Same fp32 reordering as above; the first Polar Express polynomial has larger coefficients
    # (a ~ 8.2, c ~ 16.5), which doubles it: measured max 2.0e-6.
    torch.testing.assert_close(batched, reference, atol=5e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_matrix_calls_bf16(method):
    G = gaussian(8, 32, 64)
    batched = orthogonalize(G, method=method, dtype="bfloat16")
    per_matrix = torch.stack([orthogonalize(g, method=method, dtype="bfloat16") for g in G])
    # Bitwise equal on this CPU (measured 0); one bf16 ulp at magnitude 1 (2**-7) is allowed
    # because a GEMM library may block a batch of 8 differently from a batch of 1.
    torch.testing.assert_close(batched, per_matrix, atol=2**-7, rtol=0)


def test_batched_bf16_close_to_unfused_reference_loop():
    G = gaussian(8, 32, 64)
    batched = orthogonalize(G, dtype="bfloat16")
    reference = newton_schulz_loop(G, dtype=torch.bfloat16)
    # The kernel fuses b*A + c*A@A into one baddbmm (one rounding) where the reference rounds
    # after each op; over 5 bf16 steps this moves entries by a few bf16 ulps (measured max
    # 0.023, relative Frobenius 3.6%): bf16 NS noise (BRIEF section 6), not a math difference.
    torch.testing.assert_close(batched, reference, atol=4e-2, rtol=0)
    assert (batched - reference).norm() / reference.norm() < 6e-2


@pytest.mark.parametrize("coefficients", [DEFAULT_NS_COEFFICIENTS, (2.0, -1.5, 0.0), (1.5, -0.5, 0.005)])
def test_fp32_polynomial_forms_equal_the_reference_loop(coefficients):
    """fp32 forms aI + bA + cA^2 by completing the square, or directly where that would cancel
    (c = 0, or c tiny against b): each matches the plain per-matrix loop."""
    G = gaussian(5, 24, 40)
    reference = newton_schulz_loop(G, coefficients=coefficients, dtype=torch.float32)
    # fp32 reassociation only: measured max 7.7e-7, 2.1e-7 and 2.4e-7.
    torch.testing.assert_close(
        orthogonalize(G, coefficients=coefficients, dtype="float32"), reference, atol=3e-6, rtol=0
    )


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("shape", [(3, 12, 20), (3, 20, 12)])
def test_in_place_result_equals_a_fresh_one(steps, shape):
    # The optimizer step writes the result over its input (out=G): fp32 reads the input in the
    # first product only (normalization folded in), so the last product may overwrite it, except
    # with a single iteration, which normalizes into the workspace as before.
    G = gaussian(*shape)
    expected = orthogonalize(G, steps=steps, dtype="float32")
    in_place = G.clone()
    assert orthogonalize(in_place, steps=steps, dtype="float32", out=in_place) is in_place
    assert torch.equal(in_place, expected)


def test_planned_workspace_is_reused_and_must_fit():
    G = gaussian(6, 24, 40)
    shape = newton_schulz.workspace_shape(G.shape, torch.float32, CPU)
    workspace = newton_schulz.Workspace.allocate(*shape, torch.float32, CPU)
    fresh = orthogonalize(G, dtype="float32")
    for _ in range(2):  # the buffers hold the last call's iterates: nothing leaks into the next one
        assert torch.equal(orthogonalize(G, dtype="float32", workspace=workspace), fresh)
    with pytest.raises(ValueError, match=r"workspace holds torch.float32.*needs torch.bfloat16"):
        orthogonalize(G, dtype="bfloat16", workspace=workspace)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(7, 24, 40), (7, 40, 24), (2, 3, 24, 40)])
def test_cpu_chunking_does_not_change_the_result(monkeypatch, method, shape):
    """On CPU big batches run in cache-sized chunks; force 2-3 matrices per chunk on small shapes."""
    G = gaussian(*shape)
    whole = orthogonalize(G, method=method, dtype="float32")
    monkeypatch.setattr(newton_schulz, "_CPU_CHUNK_BYTES", 3 * 24 * 40 * 4 - 1)
    monkeypatch.setattr(newton_schulz, "_CPU_CHUNK_MIN_MATRIX_BYTES", 0)
    assert newton_schulz._chunk_size(G.reshape(-1, 24, 40).shape, torch.float32, CPU) == 2
    assert torch.equal(orthogonalize(G, method=method, dtype="float32"), whole)


# ---------------------------------------------------------------- per-matrix normalization (F8)


@pytest.mark.parametrize("method", METHODS)
def test_f8_scaling_one_expert_leaves_the_others_unchanged(method):
    """F8: a norm taken across the expert axis would shrink every other expert's input by ~1000x."""
    G = gaussian(4, 16, 32)
    scaled = G.clone()
    scaled[0] *= 1000.0
    before = orthogonalize(G, method=method, dtype="float32")
    after = orthogonalize(scaled, method=method, dtype="float32")
    assert torch.equal(after[1:], before[1:])
    # Expert 0 itself is scale invariant up to fp32 rounding of the normalization.
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- parity with torch.optim.Muon


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (40, 120)])
def test_matches_torch_muon_kernel_bitwise_on_prenormalized_bf16(shape):
    G = gaussian(*shape)
    # A bf16 matrix whose bf16 norm is exactly 1.0: torch's bf16 division is then exact and our
    # fp32 normalization rounds back to the same bf16 values, isolating the iteration itself.
    G = (G / G.norm()).bfloat16()
    assert G.norm().item() == 1.0
    ours = orthogonalize(G, dtype=torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(G, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS, DEFAULT_EPS)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96), (100, 300)])
def test_matches_torch_muon_kernel_bf16(shape):
    G = gaussian(*shape)
    ours = orthogonalize(G, dtype="bfloat16").float()
    theirs = _zeropower_via_newtonschulz(G, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS, DEFAULT_EPS).float()
    # torch rounds the input to bf16 before normalizing, we normalize in fp32: the two bf16
    # inputs differ by ~1 ulp and 5 bf16 steps amplify that to max 0.011 / relative 1.8%
    # (measured). Within bf16 noise, far below the O(1) gap a wrong kernel would give.
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=0)
    assert (ours - theirs).norm() / theirs.norm() < 3e-2


# ---------------------------------------------------------------- methods agree; spectra


@pytest.mark.parametrize("shape", [(4, 24, 48), (4, 96, 24), (2, 2, 16, 128)])
def test_gram_matches_standard_fp32(shape):
    G = gaussian(*shape)
    gram = orthogonalize(G, method="gram", dtype="float32")
    standard = orthogonalize(G, method="standard", dtype="float32")
    # Equal in exact arithmetic; fp32 reassociation measured at max 1.2e-6.
    torch.testing.assert_close(gram, standard, atol=1e-5, rtol=0)


def test_gram_falls_back_to_standard_on_square():
    G = gaussian(3, 32, 32)
    assert torch.equal(orthogonalize(G, method="gram", dtype="float32"), orthogonalize(G, dtype="float32"))


@pytest.mark.parametrize(
    ("method", "steps", "low", "high"),
    [
        # Keller's quintic does not converge to 1: its fixed band measured [0.6818, 1.1344].
        ("standard", 5, 0.67, 1.14),
        ("gram", 5, 0.67, 1.14),
        # Polar Express after 5 of its 8 tabled steps: measured [0.870, 1.124].
        ("polar_express", 5, 0.86, 1.13),
        # ... and after all 8: within 3e-7 of 1 (measured), we allow 1e-5.
        ("polar_express", 8, 1 - 1e-5, 1 + 1e-5),
    ],
)
def test_singular_values_land_in_the_promised_band(method, steps, low, high):
    G = gaussian(4, 48, 96)
    sigma = singular_values(orthogonalize(G, method=method, steps=steps, dtype="float32"))
    print(f"{method} steps={steps}: sigma in [{sigma.min():.4f}, {sigma.max():.4f}]")
    assert low <= sigma.min() and sigma.max() <= high


def test_polar_express_is_closer_to_the_polar_factor_than_standard():
    G = gaussian(4, 48, 96)
    exact = polar_factor_svd(G)
    standard_error = (orthogonalize(G, dtype="float32") - exact).abs().max()
    polar_error = (orthogonalize(G, method="polar_express", dtype="float32") - exact).abs().max()
    assert polar_error < 0.5 * standard_error  # measured 0.036 vs 0.083
    converged = orthogonalize(G, method="polar_express", steps=8, dtype="float32")
    torch.testing.assert_close(converged, exact, atol=1e-5, rtol=0)  # measured 1.1e-6


def test_polar_express_table_is_the_papers_with_safety_factor():
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 8
    a, b, c = POLAR_EXPRESS_COEFFICIENTS[0]
    assert (a, b, c) == (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
    assert POLAR_EXPRESS_COEFFICIENTS[-1] == (1.875, -1.25, 0.375)  # the last one is left unscaled
    # Steps past the table reuse the last triple, so 10 steps equal 8 steps plus two fixed-point steps.
    G = gaussian(2, 16, 32)
    ten = orthogonalize(G, method="polar_express", steps=10, dtype="float32")
    reference = newton_schulz_loop(
        G, coefficients=[*POLAR_EXPRESS_COEFFICIENTS, *POLAR_EXPRESS_COEFFICIENTS[-1:] * 2], norm_scale=1.01
    )
    torch.testing.assert_close(ten, reference, atol=5e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_output_is_finite_and_roughly_orthogonal(method):
    G = gaussian(4, 48, 96)
    Y = orthogonalize(G, method=method, dtype="bfloat16")
    assert Y.isfinite().all()
    sigma = singular_values(Y)
    # Loose on purpose: bf16 moves the fp32 band by ~0.01 (measured [0.672, 1.136] for standard
    # and gram, [0.871, 1.124] for polar_express).
    assert sigma.min() >= 0.5 and sigma.max() <= 1.3


# ---------------------------------------------------------------- shapes and edge cases


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape", [(24, 40), (40, 24), (5, 24, 40), (5, 40, 24), (2, 3, 24, 40), (2, 3, 32, 32)]
)
def test_shapes_and_dtypes_round_trip(method, shape):
    G = gaussian(*shape, dtype=torch.bfloat16)
    Y = orthogonalize(G, method=method, dtype="float32")
    assert Y.shape == G.shape and Y.dtype == G.dtype
    # Leading dims are just a batch: a 4-D stack equals its 3-D flattening.
    flat = orthogonalize(G.reshape(-1, *shape[-2:]), method=method, dtype="float32")
    assert torch.equal(Y.reshape(-1, *shape[-2:]), flat)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_matrix_gives_zeros_not_nan(method, dtype):
    G = gaussian(3, 16, 32)
    G[1] = 0.0
    Y = orthogonalize(G, method=method, dtype=dtype)
    assert torch.equal(Y[1], torch.zeros_like(Y[1]))
    assert Y.isfinite().all()


@pytest.mark.parametrize("method", METHODS)
def test_fp16_input_whose_norm_overflows_fp16_gives_finite_output(method):
    """F10: 1e4-sized entries make the fp16 Frobenius norm inf; we normalize in fp32."""
    G = gaussian(3, 32, 64) * 1e4
    G16 = G.half()
    assert G16.norm(dim=(-2, -1)).isinf().all()
    Y = orthogonalize(G16, method=method, dtype="float32")
    assert Y.dtype == torch.float16 and Y.isfinite().all()
    # Same answer as the fp32 input up to the fp16 rounding of input and output (measured 2.4e-4).
    torch.testing.assert_close(Y.float(), orthogonalize(G, method=method, dtype="float32"), atol=5e-3, rtol=0)


@pytest.mark.parametrize(("fast_bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_method_and_dtype_on_cpu_are_standard_in_the_fast_dtype(monkeypatch, fast_bf16, dtype):
    monkeypatch.setattr(newton_schulz, "_CPU_BF16_MATMUL_IS_FAST", fast_bf16)
    G = gaussian(4, 16, 128)  # aspect ratio 8: auto would pick gram on an accelerator
    assert torch.equal(orthogonalize(G, method="auto"), orthogonalize(G, dtype=dtype))


# ---------------------------------------------------------------- method / dtype policy


@pytest.mark.parametrize("method", ["standard", "gram", "polar_express"])
def test_auto_dtype_on_cpu_is_never_float16(method):
    assert resolve_ns_dtype("auto", CPU, method) != torch.float16


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["cpu-with-onednn-bf16", "cpu-without"])
def test_auto_dtype_policy_per_device(monkeypatch, fast_bf16):
    monkeypatch.setattr(newton_schulz, "_CPU_BF16_MATMUL_IS_FAST", fast_bf16)
    cpu_half = torch.bfloat16 if fast_bf16 else torch.float32
    assert resolve_ns_dtype("auto", CPU, "standard") == cpu_half
    assert resolve_ns_dtype("auto", CPU, "polar_express") == cpu_half
    assert resolve_ns_dtype("auto", CPU, "gram") == torch.float32
    # Accelerators do not depend on the host CPU.
    assert resolve_ns_dtype("auto", torch.device("cuda"), "standard") == torch.bfloat16
    assert resolve_ns_dtype("auto", torch.device("cuda"), "polar_express") == torch.bfloat16
    assert resolve_ns_dtype("auto", torch.device("cuda"), "gram") == torch.float16
    assert resolve_ns_dtype("auto", torch.device("meta"), "standard") == torch.float32


@pytest.mark.parametrize("supported", [True, False])
def test_cpu_bf16_capability_is_torchs_onednn_check(monkeypatch, supported):
    """The policy reads torch's own check (the one that routes bf16 matmuls to oneDNN)."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    assert newton_schulz.cpu_bf16_matmul_is_fast() is (supported and torch.backends.mkldnn.is_available())


def test_auto_dtype_on_this_cpu_follows_its_bf16_capability():
    fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_ns_dtype("auto", CPU, "standard") == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.float32),
    ],
)
def test_explicit_dtype_is_honoured_even_on_cpu(dtype, expected):
    for method in METHODS:
        assert resolve_ns_dtype(dtype, CPU, method) == expected


def test_auto_method_never_picks_polar_express():
    for device in (CPU, torch.device("cuda")):
        for shape in [(64, 64), (64, 128), (64, 512), (512, 64), (8, 64, 512)]:
            assert resolve_ns_method("auto", shape, device) in ("standard", "gram")
    assert resolve_ns_method("auto", (64, 512), CPU) == "standard"
    assert resolve_ns_method("auto", (8, 64, 512), torch.device("cuda")) == "gram"
    assert resolve_ns_method("auto", (64, 64), torch.device("cuda")) == "standard"
    for method in METHODS:
        assert resolve_ns_method(method, (64, 64), CPU) == method


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "newton"}, r"'newton'.*\('standard', 'gram', 'polar_express', 'auto'\)"),
        ({"dtype": "float64"}, r"'float64'.*'bfloat16'"),
        ({"dtype": torch.float64}, r"torch\.float64.*'bfloat16'"),
        ({"dtype": 16}, r"16.*'bfloat16'"),
        ({"steps": 0}, r"steps.*\[1, 100\).*got 0"),
        ({"steps": 100}, r"steps.*got 100"),
        ({"steps": 2.5}, r"steps.*got 2\.5"),
        ({"coefficients": (1.0, 2.0)}, r"3 numbers.*\(1\.0, 2\.0\).*default"),
        ({"coefficients": (1.0, 2.0, "c")}, r"3 numbers"),
    ],
)
def test_bad_arguments_raise_value_error_naming_value_and_choices(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        orthogonalize(gaussian(2, 8, 16), **kwargs)


@pytest.mark.parametrize("shape", [(), (16,)])
def test_vectors_are_rejected_with_advice(shape):
    with pytest.raises(ValueError, match=re.escape(f"got {shape}") + r".*AdamW"):
        orthogonalize(torch.ones(shape))


def test_policy_helpers_reject_bad_values():
    with pytest.raises(ValueError, match=r"'svd'.*'polar_express'"):
        resolve_ns_method("svd", (4, 4), CPU)
    with pytest.raises(ValueError, match=r"resolved method.*'auto'.*resolve_ns_method"):
        resolve_ns_dtype("auto", CPU, "auto")
    with pytest.raises(ValueError, match=r"'half'"):
        resolve_ns_dtype("half", CPU, "standard")
    with pytest.raises(ValueError, match=r"resolved method.*'auto'"):
        ns_flops((4, 8), method="auto")
    assert set(NS_DTYPES) == {"auto", "bfloat16", "float16", "float32"}


# ---------------------------------------------------------------- FLOP counts


def counted_flops(G: torch.Tensor, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        orthogonalize(G, dtype="float32", **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (3, 16, 16), (2, 3, 8, 64)])
def test_ns_flops_equals_flop_counter(method, steps, shape):
    G = gaussian(*shape)
    assert ns_flops(shape, method=method, steps=steps) == counted_flops(G, method=method, steps=steps)


@pytest.mark.parametrize(
    ("aspect_ratio", "expected_saving"),
    # Per n^3 (5 steps): standard 20r + 10, gram 8r + 28 with plain GEMMs; square falls back.
    [(1, 0.0), (2, 1 - 44 / 50), (4, 1 - 60 / 90), (8, 1 - 92 / 170)],
)
def test_gram_saves_flops_from_aspect_ratio_2(aspect_ratio, expected_saving):
    shape = (2, 16, 16 * aspect_ratio)
    standard = counted_flops(gaussian(*shape), method="standard")
    gram = counted_flops(gaussian(*shape), method="gram")
    saving = 1 - gram / standard
    print(f"aspect ratio {aspect_ratio}: gram saves {saving:.1%} of standard's counted FLOPs")
    assert saving == pytest.approx(expected_saving, abs=1e-12)
    if aspect_ratio == 1:
        assert gram == standard
    else:
        assert gram < standard

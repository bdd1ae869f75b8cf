"""Newton-Schulz kernel benchmarks: batching, FLOP rate against a plain GEMM, and the three methods.

Every result is a ratio of two things timed in the same test, interleaved round by round (the
baseline runs in pedantic's untimed setup/teardown, alternating), so host noise hits both sides
alike. The ratio goes to ``benchmark.extra_info`` and to the end-of-run summary;
``bench/plot_newton_schulz.py`` turns the ``--benchmark-json`` file into tables and
``docs/ns_batching.png``. No absolute time is asserted.

    EXPERTOPT_BENCH_THREADS=1 python -m pytest bench/test_bench_newton_schulz.py --benchmark-json=bench/ns.json
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from expertopt.kernels import ns_flops, orthogonalize

__all__: list[str] = []

EXPERT_COUNTS = (8, 32, 64, 128)
EXPERT_SHAPES = ((32, 64), (64, 128), (128, 256), (256, 512), (512, 1024))
GEMM_SHAPES = ((8, 512, 1024), (32, 256, 512))
ASPECT_RATIOS = (1, 2, 4, 8)
METHOD_VARIANTS = (
    ("standard", "bfloat16"),
    ("polar_express", "bfloat16"),
    ("gram", "float32"),  # what dtype="auto" picks for gram on CPU
    ("gram", "bfloat16"),
)


def _rounds_for(flops: int) -> int:
    """Few rounds for big problems so the file stays within ~6 minutes on 2 cores (~100-350 GFLOP/s bf16)."""
    if flops > 2e11:
        return 5
    if flops > 2e10:
        return 9
    return 15


def _interleaved(
    benchmark,
    target: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int,
    warmup_rounds: int = 1,
) -> tuple[float, float] | None:
    """Time ``target`` with pytest-benchmark and ``baseline`` once per round in pedantic's untimed hooks.

    The baseline runs before the target on even rounds (setup) and after it on odd rounds
    (teardown), so neither side always inherits the other's cache or allocator state. Returns
    the medians (target, baseline) in seconds, or None under ``--benchmark-disable``.
    """
    baseline_times: list[float] = []
    round_index = 0

    def time_baseline() -> None:
        start = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - start)

    def setup() -> None:
        if round_index % 2 == 0:
            time_baseline()

    def teardown() -> None:
        nonlocal round_index
        if round_index % 2 == 1:
            time_baseline()
        round_index += 1

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=warmup_rounds)
    if benchmark.stats is None:
        return None
    return benchmark.stats.stats.median, statistics.median(baseline_times[warmup_rounds:])


def _record_machine(benchmark) -> None:
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    benchmark.extra_info["load_average_1min"] = os.getloadavg()[0]


@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("experts", EXPERT_COUNTS, ids=lambda e: f"E{e}")
def test_batched_vs_per_expert_loop(benchmark, report_line, experts, shape):
    """(a) One batched bf16 call on [E, out, in] vs a Python loop of 2-D calls (torch.optim.Muon's way)."""
    benchmark.group = "ns-batching"
    G = torch.randn(experts, *shape, generator=torch.Generator().manual_seed(0))
    flops = ns_flops(G.shape, method="standard")

    def batched():
        return orthogonalize(G, dtype="bfloat16")

    def per_expert_loop():
        return [orthogonalize(G[e], dtype="bfloat16") for e in range(experts)]

    medians = _interleaved(benchmark, batched, per_expert_loop, rounds=_rounds_for(flops))
    _record_machine(benchmark)
    if medians is None:
        return
    batched_s, loop_s = medians
    speedup = loop_s / batched_s
    benchmark.extra_info.update(
        experts=experts, shape=list(shape), flops=flops, batched_s=batched_s, loop_s=loop_s, speedup=speedup
    )
    report_line(
        f"batching E={experts:4d} {shape[0]:4d}x{shape[1]:<5d} loop {loop_s * 1e3:9.2f} ms  "
        f"batched {batched_s * 1e3:9.2f} ms  speedup {speedup:6.2f}x"
    )


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ns_flop_rate_vs_bf16_gemm(benchmark, report_line, shape):
    """(b) Achieved NS FLOP rate vs one plain bf16 bmm of the NS's dominant product, [B,n,n] @ [B,n,m]."""
    benchmark.group = "ns-flop-rate"
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=generator)
    batch, short, long = shape[0], min(shape[-2:]), max(shape[-2:])
    P = torch.randn(batch, short, short, generator=generator).bfloat16()
    X = torch.randn(batch, short, long, generator=generator).bfloat16()
    flops = ns_flops(G.shape, method="standard")
    gemm_flops = 2 * batch * short * short * long

    medians = _interleaved(
        benchmark,
        lambda: orthogonalize(G, dtype="bfloat16"),
        lambda: torch.bmm(P, X),
        rounds=_rounds_for(flops),
    )
    _record_machine(benchmark)
    if medians is None:
        return
    ns_s, gemm_s = medians
    ns_rate, gemm_rate = flops / ns_s, gemm_flops / gemm_s
    benchmark.extra_info.update(
        shape=list(shape),
        flops=flops,
        ns_gflops=ns_rate / 1e9,
        gemm_gflops=gemm_rate / 1e9,
        rate_ratio=ns_rate / gemm_rate,
    )
    report_line(
        f"flop rate {'x'.join(map(str, shape)):>12}  NS {ns_rate / 1e9:6.1f} GFLOP/s  "
        f"bmm {gemm_rate / 1e9:6.1f} GFLOP/s  ratio {ns_rate / gemm_rate:5.2f}"
    )


@pytest.mark.parametrize(("method", "dtype"), METHOD_VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("aspect_ratio", ASPECT_RATIOS, ids=lambda r: f"r{r}")
def test_methods_by_aspect_ratio(benchmark, report_line, aspect_ratio, method, dtype):
    """(c) Counted FLOPs and time of each method relative to standard bf16 on [8, 256, 256 r]."""
    benchmark.group = f"ns-methods-r{aspect_ratio}"
    shape = (8, 256, 256 * aspect_ratio)
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    flops = ns_flops(shape, method=method)
    standard_flops = ns_flops(shape, method="standard")

    medians = _interleaved(
        benchmark,
        lambda: orthogonalize(G, method=method, dtype=dtype),
        lambda: orthogonalize(G, method="standard", dtype="bfloat16"),
        rounds=_rounds_for(standard_flops),
    )
    _record_machine(benchmark)
    if medians is None:
        return
    method_s, standard_s = medians
    benchmark.extra_info.update(
        aspect_ratio=aspect_ratio,
        method=method,
        dtype=dtype,
        shape=list(shape),
        flops=flops,
        flop_ratio=flops / standard_flops,
        method_s=method_s,
        standard_s=standard_s,
        time_ratio=method_s / standard_s,
    )
    report_line(
        f"methods r={aspect_ratio} {method:>13} {dtype:>8}  FLOPs x{flops / standard_flops:4.2f}  "
        f"time x{method_s / standard_s:5.2f} of standard bf16 ({standard_s * 1e3:7.1f} ms)"
    )

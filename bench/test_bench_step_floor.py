"""Issue 12: the optimizer step against its floor. Three measurements, one run:

- **aten ops per step** on the probe model (``bench/probe.py``) at 8, 32 and 64 layers, for
  expertopt.Muon, torch.optim.Muon (+ fused AdamW for the norms) and DeepSpeed's
  ``SingleDeviceMuonWithAuxAdam``. Exact counts. Target: expertopt flat in depth and <= 300.
- **step time over its Newton-Schulz GEMMs alone**: the same products the step runs (per bucket
  and iteration ``X X^T``, ``A A``, ``B X``) as plain ``bmm`` in the step's Newton-Schulz dtype on
  pre-made stacked tensors of the step's bucket shapes, nothing else; timed interleaved with expertopt's step round by round on
  the dense and MoE models of ``bench/models.py``. Target: step <= 1.2x the GEMMs.
- **peak memory of a step**: the most bytes the step has allocated and not yet freed at any
  moment (``bench.probe.PeakMemory``, a dispatch mode; what existed before the step, parameters,
  state and the plan's workspace, is not counted), next to the momentum the optimizer keeps
  and the largest bucket.

Run from the repository root (one torch thread, as the other step benchmarks)::

    EXPERTOPT_BENCH_THREADS=1 python -m pytest bench/test_bench_step_floor.py -p no:cacheprovider \\
        --benchmark-columns=median,min,max,rounds

The figures are printed in the terminal summary ("benchmark ratios").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import pytest
import torch

import expertopt
from bench.probe import PROBE_OPTIMIZERS, count_step_ops, peak_step_memory, probe_optimizer
from bench.test_bench_optimizer_step import OURS, THREADS, _interleaved, _make
from expertopt.kernels import resolve_ns_dtype

__all__: list[str] = []

LAYERS = (8, 32, 64)
MAX_OPS = 300
MAX_RATIO = 1.2
MODELS = ("dense", "moe")

OPS: dict[tuple[str, int], int] = {}
FLOOR_RATIOS: dict[str, tuple[float, float]] = {}  # model -> (step median, GEMMs median)
PEAKS: dict[str, tuple[int, int, int]] = {}  # model -> (peak, momentum bytes, largest bucket bytes)


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", list(PROBE_OPTIMIZERS))
def test_ops_per_step(name: str, layers: int) -> None:
    if name == "deepspeed":
        pytest.importorskip("deepspeed")
    OPS[name, layers] = count_step_ops(probe_optimizer(name, layers)).total
    if name == OURS:
        assert OPS[name, layers] <= MAX_OPS


def test_expertopt_ops_flat_in_depth() -> None:
    counts = [OPS.get((OURS, layers)) for layers in LAYERS]
    if None in counts:
        pytest.skip("run together with test_ops_per_step")
    assert len(set(counts)) == 1, counts


def _buckets(optimizer: expertopt.Muon) -> list[tuple[int, int, int]]:
    """``(B, short, long)`` of every Newton-Schulz call the step makes (from its cached plans)."""
    shapes = []
    for _, plan in optimizer._muon_plans.values():
        for partition in plan.partitions:
            for bucket in partition.buckets:
                batch, m, n = bucket.work.shape
                shapes.append((batch, min(m, n), max(m, n)))
    return shapes


def _compute_dtype(optimizer: expertopt.Muon) -> torch.dtype:
    """The dtype the step's Newton-Schulz runs in ("auto" is fp32 on a CPU without oneDNN bf16)."""
    return resolve_ns_dtype(optimizer.param_groups[0]["ns_dtype"], torch.device("cpu"), "standard")


def _gemms_alone(optimizer: expertopt.Muon, dtype: torch.dtype = torch.bfloat16) -> Callable[[], None]:
    """The step's Newton-Schulz products as plain bmm in ``dtype`` on pre-made tensors: nothing else.

    Same operand layouts as the kernel (``X X^T`` reads ``X.mT``, a view): on this CPU a bmm on
    a transposed view runs at a different rate than on a contiguous copy.
    """
    steps = optimizer.param_groups[0]["ns_steps"]
    operands = []
    for batch, short, long in _buckets(optimizer):
        X = torch.randn(batch, short, long, dtype=dtype)
        A = torch.randn(batch, short, short, dtype=dtype)
        operands.append((X, A))

    def run() -> None:
        for X, A in operands:
            for _ in range(steps):
                torch.bmm(X, X.mT)  # A = X X^T
                torch.bmm(A, A)  # A A
                torch.bmm(A, X)  # B X

    return run


@pytest.mark.parametrize("model", MODELS)
def test_step_over_gemms(benchmark, model: str) -> None:
    """The GEMMs alone timed by pytest-benchmark, expertopt's step before each round (untimed setup)."""
    benchmark.group = f"step vs its Newton-Schulz GEMMs: {model} model"
    optimizer = _make(model, OURS, warm=True)
    step = _interleaved(benchmark, _gemms_alone(optimizer, _compute_dtype(optimizer)), optimizer.step)
    if step is not None:
        FLOOR_RATIOS[model] = (step, benchmark.stats.stats.median)
        benchmark.extra_info.update(step_ms=step * 1e3, ratio=step / benchmark.stats.stats.median)


@pytest.mark.parametrize("model", MODELS)
def test_peak_memory(model: str) -> None:
    """Extra bytes of one step, beside the momentum and the largest bucket (fp32)."""
    optimizer = _make(model, OURS, warm=True)
    momentum = sum(
        optimizer.state[p]["momentum_buffer"].nbytes
        for g in optimizer.param_groups
        if g["use_muon"]
        for p in g["params"]
    )
    largest = max(batch * short * long * 4 for batch, short, long in _buckets(optimizer))
    PEAKS[model] = (peak_step_memory(optimizer), momentum, largest)


def test_report(report_line) -> None:
    if not (OPS or FLOOR_RATIOS or PEAKS):
        pytest.skip("nothing measured in this run")
    report_line(f"torch {torch.__version__}, {THREADS} thread(s), load average {os.getloadavg()[0]:.1f}")
    for name in PROBE_OPTIMIZERS:
        counts = [OPS.get((name, layers)) for layers in LAYERS]
        if any(counts):
            cells = ", ".join(
                f"{layers} layers: {count}" for layers, count in zip(LAYERS, counts, strict=True)
            )
            report_line(f"aten ops per step, probe model, {name}: {cells}")
    for model, (step, gemms) in FLOOR_RATIOS.items():
        verdict = "met" if step / gemms <= MAX_RATIO else "MISSED"
        report_line(
            f"{model}: step {step * 1e3:.2f} ms / its NS GEMMs alone {gemms * 1e3:.2f} ms = "
            f"{step / gemms:.2f}x (target <= {MAX_RATIO}x: {verdict})"
        )
    for model, (peak, momentum, largest) in PEAKS.items():
        report_line(
            f"{model}: peak step memory {peak / 2**20:.2f} MiB; momentum {momentum / 2**20:.2f} MiB, "
            f"largest bucket in fp32 {largest / 2**20:.2f} MiB"
        )

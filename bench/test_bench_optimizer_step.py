"""Full optimizer step: expertopt.Muon vs DeepSpeed's and torch's Muon, ratios from one run.

Issue target: on a MoE-shaped model, ``expertopt.Muon`` at least 2x faster than DeepSpeed's
``SingleDeviceMuonWithAuxAdam``; on a dense 2-D model, at least 2x faster than
``torch.optim.Muon``. Only ``optimizer.step()`` is timed, on fixed random gradients assigned once
(``bench.models``); every optimizer steps its own bitwise-identical copy of the model.

Dtype policy: expertopt's default (``ns_method="standard"``, ``ns_dtype="auto"``) and
``torch.optim.Muon`` run Newton-Schulz in bf16 on CPU, and so does DeepSpeed with
``ns_method="standard"``. DeepSpeed's default ``ns_method="gram"`` asks the accelerator for fp16
support; DeepSpeed's CPU accelerator answers ``None`` here (``torch.ops.mkldnn.
_is_mkldnn_fp16_supported()`` is false), so its Gram iteration, and the standard iteration it falls
back to on square matrices, run in fp32. Both DeepSpeed settings are timed, with
``expertopt.Muon(ns_method="gram")`` (fp32 on CPU) as the like-for-like row for the default.

Noise (BRIEF section 6): the machine is shared, so only ratios measured in the same run count.
Each baseline's step is timed by pytest-benchmark while an expertopt step on its own model copy
runs, and is timed, in pedantic's untimed ``setup`` before every round, so load changes hit both
sides alike; the ratio is the quotient of the two medians. Torch runs on
``EXPERTOPT_BENCH_THREADS`` threads (default 1 here): with two OpenMP threads on two busy cores an
elementwise op was measured 50x slower when another process held one core. DeepSpeed's
``muon_update`` is ``torch.compile``d; compilation happens in untimed warm-up steps.

Run from the repository root (``python -m`` puts it on ``sys.path`` for ``bench.models``)::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_optimizer_step.py -p no:cacheprovider \\
        --benchmark-columns=median,min,max,rounds --benchmark-sort=name

The terminal summary (``bench/conftest.py``) then lists median step times, ratios, matmul FLOPs
per step (``FlopCounterMode``), achieved GFLOP/s next to a plain batched GEMM, the
Newton-Schulz floor, and where expertopt's step spends its time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import expertopt
import expertopt.optim._base
import expertopt.optim.muon
import expertopt.updates.muon
from bench.models import (
    ADAMW_EPS,
    BETAS,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    DenseSpec,
    MoESpec,
    build_dense,
    build_moe,
    deepspeed_groups,
    describe,
    expertopt_groups,
)
from expertopt.kernels import ns_flops, orthogonalize, resolve_ns_method

__all__: list[str] = []

THREADS = int(os.environ.get("EXPERTOPT_BENCH_THREADS", "1"))
ROUNDS = int(os.environ.get("EXPERTOPT_BENCH_ROUNDS", "30"))
# Untimed steps before timing: the first creates state (and compiles DeepSpeed's muon_update for
# every shape), the second shows no recompilation is left.
WARMUP_STEPS = 2
PROFILE_STEPS = 5
# A plain batched GEMM with the shape of the dense model's attention bucket: the achievable rate.
GEMM_SHAPE = (32, 128, 128)

Params = dict[str, nn.Parameter]
Factory = Callable[[Params], torch.optim.Optimizer]


def _deepspeed(ns_method: str) -> Factory:
    def make(params: Params) -> torch.optim.Optimizer:
        muon = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon")
        return muon.SingleDeviceMuonWithAuxAdam(deepspeed_groups(params, ns_method))

    return make


def _expertopt_moe(**options: Any) -> Factory:
    def make(params: Params) -> torch.optim.Optimizer:
        return expertopt.Muon(
            expertopt_groups(params),
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            betas=BETAS,
            adamw_eps=ADAMW_EPS,
            **options,
        )

    return make


def _expertopt_dense(params: Params) -> torch.optim.Optimizer:
    return expertopt.Muon(list(params.values()), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _torch_dense(params: Params) -> torch.optim.Optimizer:
    return torch.optim.Muon(list(params.values()), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


# Ratios are taken against OURS (expertopt.Muon with its defaults) on the same model.
OURS = "expertopt"
MOE_OPTIMIZERS: dict[str, Factory] = {
    OURS: _expertopt_moe(),
    "deepspeed-default": _deepspeed("gram"),
    "deepspeed-standard": _deepspeed("standard"),
    "expertopt-gram": _expertopt_moe(ns_method="gram"),
}
DENSE_OPTIMIZERS: dict[str, Factory] = {OURS: _expertopt_dense, "torch": _torch_dense}
LABELS = {
    OURS: "expertopt.Muon (defaults: standard, bf16)",
    "deepspeed-default": "DeepSpeed MuonWithAuxAdam (default: gram, fp32)",
    "deepspeed-standard": "DeepSpeed MuonWithAuxAdam (standard, bf16)",
    "expertopt-gram": "expertopt.Muon (ns_method=gram, fp32)",
    "torch": "torch.optim.Muon (bf16)",
}
MODELS: dict[str, tuple[Callable[[], Params], dict[str, Factory]]] = {
    "moe": (lambda: build_moe(MoESpec()), MOE_OPTIMIZERS),
    "dense": (lambda: build_dense(DenseSpec()), DENSE_OPTIMIZERS),
}
# The baselines of the issue's targets; the other rows are context.
TARGETS = {"moe": ("deepspeed-default", "deepspeed-standard"), "dense": ("torch",)}

# Filled by the tests, read by test_report. Keys: (model, optimizer name).
MEDIANS: dict[tuple[str, str], float] = {}
RATIOS: dict[tuple[str, str], float] = {}  # baseline median / interleaved expertopt median
FLOPS: dict[tuple[str, str], int] = {}
GEMM_RATES: dict[str, float] = {}
FLOORS: dict[str, tuple[float, float]] = {}  # model -> (floor median, interleaved expertopt median)
PROFILES: dict[tuple[str, str], dict[str, float]] = {}
PHASES: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _cases() -> list[tuple[str, str]]:
    return [(model, name) for model, (_, optimizers) in MODELS.items() for name in optimizers]


def _make(model: str, name: str, warm: bool = False) -> torch.optim.Optimizer:
    build, optimizers = MODELS[model]
    optimizer = optimizers[name](build())
    for _ in range(WARMUP_STEPS if warm else 0):
        optimizer.step()
    return optimizer


def _interleaved(benchmark, target: Callable[[], object], reference: Callable[[], object]) -> float | None:
    """Time ``target`` with pytest-benchmark and ``reference`` before each round, in the untimed setup.

    Returns the reference's median over the timed rounds (None under ``--benchmark-disable``).
    """
    reference_times: list[float] = []

    def time_reference() -> None:
        start = time.perf_counter()
        reference()
        reference_times.append(time.perf_counter() - start)

    warmup_rounds = 1
    benchmark.pedantic(target, setup=time_reference, rounds=ROUNDS, iterations=1, warmup_rounds=warmup_rounds)
    if benchmark.stats is None:
        return None
    return statistics.median(reference_times[warmup_rounds:])


@pytest.mark.parametrize(("model", "name"), _cases())
def test_step(benchmark, model: str, name: str) -> None:
    """Median wall time of ``optimizer.step()``; baselines interleaved round by round with expertopt's."""
    benchmark.group = f"optimizer step: {model} model"
    benchmark.extra_info.update(optimizer=LABELS[name], threads=THREADS, load_average_1min=os.getloadavg()[0])
    optimizer = _make(model, name, warm=True)
    if name == OURS:
        benchmark.pedantic(optimizer.step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        ours = None
    else:
        ours = _interleaved(benchmark, optimizer.step, _make(model, OURS, warm=True).step)
    if benchmark.stats is None:  # --benchmark-disable
        return
    MEDIANS[model, name] = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = round(MEDIANS[model, name] * 1e3, 3)
    if ours is not None:
        RATIOS[model, name] = MEDIANS[model, name] / ours
        benchmark.extra_info.update(expertopt_median_ms=round(ours * 1e3, 3), ratio=RATIOS[model, name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_plain_gemm(benchmark, dtype: torch.dtype) -> None:
    """A bare batched GEMM: the matmul rate this machine reaches in this run."""
    benchmark.group = "reference: plain batched GEMM"
    x = torch.randn(GEMM_SHAPE, dtype=dtype)
    benchmark.pedantic(torch.bmm, args=(x, x), rounds=5 * ROUNDS, iterations=1, warmup_rounds=3)
    if benchmark.stats is not None:
        batch, m, n = GEMM_SHAPE
        GEMM_RATES[str(dtype).removeprefix("torch.")] = 2 * batch * m * n * n / benchmark.stats.stats.median


def _buckets(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, str]]:
    """The Newton-Schulz inputs of one expertopt step: per Muon group, same-shape gradients stacked."""
    buckets = []
    for group in optimizer.param_groups:
        if not group["use_muon"]:
            continue
        by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
        for param in group["params"]:
            m, n = param.shape[-2:]
            by_shape.setdefault((m, n), []).append(param.grad.reshape(-1, m, n))
        buckets += [(torch.cat(grads), group["ns_method"]) for grads in by_shape.values()]
    return buckets


@pytest.mark.parametrize("model", list(MODELS))
def test_ns_floor(benchmark, model: str) -> None:
    """``orthogonalize()`` alone on the step's pre-stacked buckets, interleaved with expertopt's step.

    No momentum, guard, concatenation or update: the Newton-Schulz math itself, so a lower bound
    on expertopt's step with its bucketing, and ``baseline / floor`` bounds the ratio any
    overhead reduction could reach.
    """
    benchmark.group = f"optimizer step: {model} model"
    benchmark.extra_info["optimizer"] = "floor: orthogonalize() on expertopt's buckets only"
    optimizer = _make(model, OURS, warm=True)
    buckets = _buckets(optimizer)

    def newton_schulz() -> None:
        for stacked, method in buckets:
            orthogonalize(stacked, method=method)

    ours = _interleaved(benchmark, newton_schulz, optimizer.step)
    if ours is not None:
        FLOORS[model] = (benchmark.stats.stats.median, ours)


def _count_flops(optimizer: torch.optim.Optimizer) -> int:
    """Matmul FLOPs of one step; DeepSpeed's compiled muon_update runs eagerly so every aten op is seen."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        optimizer.step()
    return counter.get_total_flops()


def _expected_expertopt_flops(optimizer: torch.optim.Optimizer) -> int:
    """What expertopt's kernels should cost: ``ns_flops`` per Muon parameter (batching adds none)."""
    total = 0
    for group in optimizer.param_groups:
        if group["use_muon"]:
            for param in group["params"]:
                method = resolve_ns_method(group["ns_method"], param.shape, param.device)
                total += ns_flops(tuple(param.shape), method=method, steps=group["ns_steps"])
    return total


@pytest.mark.parametrize(("model", "name"), _cases())
def test_flops(model: str, name: str) -> None:
    """Matmul FLOPs of one step (exact, not noisy); expertopt's must equal ``ns_flops``'s prediction."""
    optimizer = _make(model, name, warm=True)
    FLOPS[model, name] = _count_flops(optimizer)
    if isinstance(optimizer, expertopt.Muon):
        assert FLOPS[model, name] == _expected_expertopt_flops(optimizer)


def test_same_work_at_same_method() -> None:
    """The standard iteration costs the same matmuls everywhere: any speed ratio there is overhead or GEMM rate."""
    pairs = [(("moe", OURS), ("moe", "deepspeed-standard")), (("dense", OURS), ("dense", "torch"))]
    if not all(key in FLOPS for pair in pairs for key in pair):
        pytest.skip("run together with test_flops")
    for ours, theirs in pairs:
        assert FLOPS[ours] == FLOPS[theirs], (ours, theirs)


# Self CPU time of aten ops by what they do (torch.profiler event names).
OP_CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "isfinite checks": ("aten::isfinite", "aten::abs", "aten::eq", "aten::ne", "aten::all", "aten::where"),
    "copies, casts, cat": ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone"),
    "AdamW": ("aten::_fused_adamw_", "aten::sqrt", "aten::pow", "aten::square"),
}
OTHER_ATEN, GLUE = "other elementwise", "Python, dispatch, inductor-fused kernels"


def _categorize(events) -> dict[str, float]:
    totals = dict.fromkeys([*OP_CATEGORIES, OTHER_ATEN, GLUE], 0.0)
    for event in events:
        category = next((c for c, ops in OP_CATEGORIES.items() if event.key in ops), None)
        if category is None:
            category = OTHER_ATEN if event.key.startswith("aten::") else GLUE
        totals[category] += event.self_cpu_time_total / PROFILE_STEPS / 1e6
    return totals


PROFILED = [("moe", OURS), ("moe", "deepspeed-standard"), ("dense", OURS), ("dense", "torch")]


@pytest.mark.parametrize(("model", "name"), PROFILED)
def test_profile(model: str, name: str) -> None:
    """Where a step's time goes, by op category (torch.profiler self CPU time; profiler overhead included)."""
    optimizer = _make(model, name, warm=True)
    with torch.profiler.profile() as profiler:
        for _ in range(PROFILE_STEPS):
            optimizer.step()
    PROFILES[model, name] = _categorize(profiler.key_averages())


# expertopt's step, phase by phase: (module, function) wrapped with a perf_counter timer.
PHASE_FUNCTIONS = {
    "non-finite guard (finite_flag)": (expertopt.optim._base, "finite_flag"),
    "Muon groups (muon_step: momentum, bucketing, NS, update)": (expertopt.optim.muon, "muon_step"),
    "Newton-Schulz (orthogonalize, incl. normalize and casts)": (expertopt.updates.muon, "orthogonalize"),
    "AdamW groups (step_adamw_group)": (expertopt.optim.muon, "step_adamw_group"),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_phases(monkeypatch, model: str) -> None:
    """Wall time of each phase of expertopt's step, median over steps (functions wrapped in place)."""
    optimizer = _make(model, OURS, warm=True)
    spent: dict[str, float] = {}

    def timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        return wrapper

    for label, (module, attribute) in PHASE_FUNCTIONS.items():
        if hasattr(module, attribute):  # a refactor that renames a phase drops it from the table
            monkeypatch.setattr(module, attribute, timed(label, getattr(module, attribute)))
    muon_groups = "Muon groups (muon_step: momentum, bucketing, NS, update)"
    newton_schulz = "Newton-Schulz (orthogonalize, incl. normalize and casts)"
    steps: list[dict[str, float]] = []
    for _ in range(2 * PROFILE_STEPS):
        spent.update(dict.fromkeys(PHASE_FUNCTIONS, 0.0))
        start = time.perf_counter()
        optimizer.step()
        whole = time.perf_counter() - start
        spent[muon_groups] -= spent[newton_schulz]  # leaves momentum, bucketing and the update
        spent["rest (Python, _grads_of, lr, state lookups)"] = whole - sum(spent[k] for k in PHASE_FUNCTIONS)
        spent["whole step"] = whole
        steps.append(dict(spent))
    PHASES[model] = {label: statistics.median(step[label] for step in steps) for label in steps[0]}


def _cell(value: float | None, fmt: str, width: int) -> str:
    return format(value, fmt) if value is not None else "-".rjust(width)


def _report() -> list[str]:
    lines = [
        f"torch {torch.__version__}, {THREADS} thread(s), {ROUNDS} rounds, load average {os.getloadavg()[0]:.1f}",
        f"moe model:   {describe(build_moe(MoESpec()))}",
        f"dense model: {describe(build_dense(DenseSpec()))}",
    ]
    if GEMM_RATES:
        rates = ", ".join(f"{dtype} {rate / 1e9:.0f} GFLOP/s" for dtype, rate in GEMM_RATES.items())
        lines.append(f"plain bmm {list(GEMM_SHAPE)} @ {list(GEMM_SHAPE)}: {rates}")
    header = f"{'model':6} {'optimizer':48} {'median ms':>9} {'GFLOP':>6} {'GFLOP/s':>7} {'x expertopt':>11}"
    lines += [header, "-" * len(header)]
    for model, name in _cases():
        median, flops = MEDIANS.get((model, name)), FLOPS.get((model, name))
        ratio = 1.0 if name == OURS and median else RATIOS.get((model, name))
        rate = flops / median / 1e9 if flops and median else None
        lines.append(
            f"{model:6} {LABELS[name]:48} {_cell(median and median * 1e3, '9.1f', 9)} "
            f"{_cell(flops and flops / 1e9, '6.3f', 6)} {_cell(rate, '7.0f', 7)} {_cell(ratio, '11.2f', 11)}"
        )
    for model, baselines in TARGETS.items():
        floor = FLOORS.get(model)
        if floor:
            lines.append(
                f"{model}: orthogonalize() alone on expertopt's buckets {floor[0] * 1e3:.1f} ms "
                f"= {floor[0] / floor[1]:.0%} of expertopt's step ({floor[1] * 1e3:.1f} ms interleaved)"
            )
        for baseline in baselines:
            ratio = RATIOS.get((model, baseline))
            if ratio is None:
                continue
            verdict = "met" if ratio >= 2 else "MISSED"
            bound = f"; at most {ratio * floor[1] / floor[0]:.2f}x with zero overhead" if floor else ""
            lines.append(f"{model}: target >= 2x vs {LABELS[baseline]}: {ratio:.2f}x, {verdict}{bound}")
    for (model, name), totals in PROFILES.items():
        whole = sum(totals.values())
        parts = ", ".join(f"{c} {s * 1e3:.1f} ms ({s / whole:.0%})" for c, s in totals.items() if s)
        lines.append(f"profile {model} {name} ({whole * 1e3:.1f} ms/step under the profiler): {parts}")
    for model, phases in PHASES.items():
        parts = ", ".join(f"{label} {seconds * 1e3:.2f} ms" for label, seconds in phases.items())
        lines.append(f"phases {model} expertopt: {parts}")
    return lines


def test_report(report_line) -> None:
    """Send this run's table and ratios to the terminal summary; no time is asserted (shared, noisy CPU)."""
    if not (MEDIANS or FLOPS or PROFILES or PHASES):
        pytest.skip("nothing measured in this run")
    for line in _report():
        report_line(line)

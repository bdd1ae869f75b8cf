"""DeepSpeed ZeRO-3 on 4 ranks: step time of expertopt Muon vs DeepSpeed's Muon vs DeepSpeed AdamW.

Same model and configs as the ZeRO-3 bytes benchmark (``bench/test_bench_zero3_comm.py``:
``DenseLM``, every parameter partitioned, fp32, clipping 1.0; DeepSpeed's Muon with the
``"reduce_scatter": false`` it forces at stage 3; expertopt with its defaults, gradients reduced
to their owners, and with ``"zero3_muon_gradients": "reduce_scatter"``). The four engines
are built side by side in each rank and stepped in turn, round after round, so machine noise
(other processes on a shared CPU) falls on all four alike. Per round and engine we time, after
a barrier, forward+backward and ``engine.step()`` on every rank and keep the slowest rank (a
step ends for everyone when the slowest is done); the table reports medians over rounds and
the ratios of those medians.

On a CPU with gloo these are relative figures only: Newton-Schulz runs in bf16 for both Muons
here (the bytes benchmark's config pins expertopt's ``ns_dtype="bfloat16"``; DeepSpeed's
Muon always casts to bf16), and the collectives are loopback copies.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero3_step_time.py -p no:cacheprovider -q
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch

from bench.test_bench_zero3_comm import BATCH, NAMES, OPTIMIZERS, SEQ, VOCAB, WORLD, DenseLM, _config
from bench.zero_harness import spawn

WARMUP, ROUNDS = 2, 9


def _engine(optimizer: str) -> Any:
    import deepspeed

    import expertopt

    torch.manual_seed(0)
    model = DenseLM()
    if optimizer.startswith("expertopt"):
        return expertopt.initialize(model=model, config=_config(optimizer))[0]
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(optimizer))[
        0
    ]


def _timed_step(engine: Any, tokens: torch.Tensor) -> tuple[float, float]:
    """Seconds of forward+backward and of ``engine.step()`` on this rank, each after a barrier."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    engine.backward(engine(tokens))
    middle = time.perf_counter()
    dist.barrier()
    middle_synced = time.perf_counter()
    engine.step()
    return middle - start, time.perf_counter() - middle_synced


def measure(rank: int, world_size: int) -> dict[str, list[tuple[float, float]]]:
    torch.compiler.set_stance("force_eager")  # DeepSpeed compiles muon_update; run it eagerly
    engines = {optimizer: _engine(optimizer) for optimizer in OPTIMIZERS}
    times: dict[str, list[tuple[float, float]]] = {optimizer: [] for optimizer in OPTIMIZERS}
    for step in range(WARMUP + ROUNDS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        for optimizer, engine in engines.items():
            timing = _timed_step(engine, tokens)
            if step >= WARMUP:
                times[optimizer].append(timing)
    return times


def _medians(per_rank: list[dict]) -> dict[str, dict[str, float]]:
    """Per optimizer: medians over rounds of the slowest rank's step and train-step seconds."""
    out = {}
    for optimizer in OPTIMIZERS:
        rounds = list(zip(*(rank[optimizer] for rank in per_rank), strict=True))
        steps = [max(step for _, step in r) for r in rounds]
        trains = [max(fwd_bwd + step for fwd_bwd, step in r) for r in rounds]
        out[optimizer] = {"step": statistics.median(steps), "train": statistics.median(trains)}
    return out


def _report(medians: dict[str, dict[str, float]], emit) -> dict[str, float]:
    emit(f"ZeRO-3 step time, {WORLD} gloo ranks, dense LM, fp32 (median of {ROUNDS} rounds, slowest rank)")
    emit("  optimizer         engine.step ms  train step ms")
    for optimizer in OPTIMIZERS:
        m = medians[optimizer]
        emit(f"  {NAMES[optimizer]:<17} {1e3 * m['step']:14.1f} {1e3 * m['train']:14.1f}")
    eo, ds, adamw = (medians[o] for o in ("expertopt_muon", "ds_muon", "ds_adamw"))
    info = {
        "step_vs_ds_muon": eo["step"] / ds["step"],
        "step_vs_adamw": eo["step"] / adamw["step"],
        "train_vs_ds_muon": eo["train"] / ds["train"],
        "train_vs_adamw": eo["train"] / adamw["train"],
        "ds_muon_step_vs_adamw": ds["step"] / adamw["step"],
        "train_to_owner_vs_reduce_scatter": eo["train"] / medians["expertopt_muon_rs"]["train"],
    }
    emit(
        f"  expertopt/DS Muon: step {info['step_vs_ds_muon']:.3f}, train step {info['train_vs_ds_muon']:.3f}"
        f"   expertopt/AdamW: step {info['step_vs_adamw']:.3f}, train step {info['train_vs_adamw']:.3f}"
        f"   DS Muon/AdamW step {info['ds_muon_step_vs_adamw']:.3f}"
    )
    emit(f"  to_owner/reduce_scatter: train step {info['train_to_owner_vs_reduce_scatter']:.3f}")
    return info


def test_zero3_step_time_vs_deepspeed_muon(benchmark, report_line):
    per_rank = benchmark.pedantic(spawn, args=(measure, WORLD), rounds=1, iterations=1)
    info = _report(_medians(per_rank), report_line)
    benchmark.extra_info.update(info)
    assert all(len(rank[o]) == ROUNDS for rank in per_rank for o in OPTIMIZERS)

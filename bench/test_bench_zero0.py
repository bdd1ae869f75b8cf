"""ZeRO-0: Newton-Schulz by owners plus an all-gather vs redundantly on every rank, 2 and 4 ranks.

Without ZeRO every rank of a data-parallel group holds the same averaged gradients, so the
``"redundant"`` mode runs every matrix's Newton-Schulz on every rank (what DeepSpeed's own Muon
does at stage 0), while ``"owners"`` (expertopt's default, ``zero0_newton_schulz``) runs each
matrix once on one owner and all-gathers the results. Same model as the ZeRO-1/2 benchmark
(``bench.zero_workload.ZeroMoE``, ep_size 2), fp32 weights, bf16 Newton-Schulz, clipping off
(DeepSpeed 0.19.8 clips wrongly at stage 0 with experts; expertopt refuses it).

Per mode and world size: Newton-Schulz FLOPs per rank (``FlopCounterMode``), bytes per rank
sent by the all-gather (same convention as ``bench.zero_harness.CommCounter``), and whole
iterations timed interleaved round by round (slowest rank per round, median over rounds); the
ratio owners / redundant is the figure. Weights after the timed rounds must agree between the
two modes within bf16 Newton-Schulz noise, and across ranks exactly.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero0.py -p no:cacheprovider -q
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch
import torch.distributed as dist

from bench.zero_harness import CommCounter, spawn
from bench.zero_workload import ModelSpec, ZeroMoE, _NSFlops, muon_matrix_shapes
from expertopt.kernels import ns_flops

MODES = ("owners", "redundant")
WARMUP, ROUNDS = 2, 25
SPEC = ModelSpec(ep_size=2)
TOTAL_FLOPS = sum(ns_flops(shape, method="standard") for shape in muon_matrix_shapes(SPEC))


def _engine(mode: str) -> Any:
    import expertopt

    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": SPEC.batch,
        "gradient_clipping": 0.0,
        "optimizer": {
            "type": "Muon",
            # bf16 pinned, as recorded: "auto" is fp32 on a CPU without oneDNN bf16 (twice the reply bytes).
            "params": {
                "lr": 0.02,
                "adamw_lr": 3e-4,
                "weight_decay": 0.1,
                "zero0_newton_schulz": mode,
                "ns_dtype": "bfloat16",
            },
        },
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = expertopt.initialize(model=ZeroMoE(SPEC), config=config)
    return engine


def _tokens(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randint(0, SPEC.vocab, (SPEC.batch, SPEC.seq), generator=generator)


def _measure(rank: int, world_size: int) -> dict[str, Any]:
    import expertopt.updates.muon as updates

    ns = _NSFlops()  # the ZeRO-1/2 benchmark's counter, on expertopt's one Newton-Schulz kernel
    updates.orthogonalize = ns.wrap(updates.orthogonalize)
    counter = CommCounter().install()
    engines = {mode: _engine(mode) for mode in MODES}
    result: dict[str, Any] = {mode: {"times": [], "steps": []} for mode in MODES}
    for mode, engine in engines.items():
        for step in range(WARMUP):
            engine.backward(engine(_tokens(rank, step)))
            engine.step()
        engine.backward(engine(_tokens(rank, WARMUP)))
        counter.reset()
        ns.flops, ns.on = 0, True
        with counter.during("step"):
            engine.step()
        ns.on = False
        result[mode]["ns_flops"] = ns.flops
        result[mode]["step_bytes"] = sum(wire for _, _, wire in counter.records.values())
    for r in range(ROUNDS):
        for mode, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            engine.backward(engine(_tokens(rank, WARMUP + 1 + r)))
            stepping = time.perf_counter()
            engine.step()
            result[mode]["times"].append(time.perf_counter() - start)
            result[mode]["steps"].append(time.perf_counter() - stepping)
    for mode, engine in engines.items():
        named = list(engine.module.named_parameters())
        result[mode]["dense"] = torch.cat([p.detach().reshape(-1) for n, p in named if ".experts." not in n])
        result[mode]["weights"] = torch.cat([p.detach().reshape(-1) for _, p in named])
    return result


def test_zero0_owners_vs_redundant(benchmark, report_line):
    outcomes = {}

    def run() -> None:
        for world in (2, 4):
            outcomes[world] = spawn(_measure, world)

    benchmark.pedantic(run, rounds=1, iterations=1)
    report_line("ZeRO-0 Newton-Schulz, owners + all-gather vs redundant on every rank (bf16 NS, ep_size 2)")
    for world, per_rank in outcomes.items():
        medians, steps = (
            {
                mode: statistics.median(max(t) for t in zip(*(r[mode][key] for r in per_rank), strict=True))
                for mode in MODES
            }
            for key in ("times", "steps")
        )
        for mode in MODES:
            ns = [r[mode]["ns_flops"] for r in per_rank]
            sent = statistics.fmean(r[mode]["step_bytes"] for r in per_rank)
            report_line(
                f"  {world} ranks {mode:<9} iteration {medians[mode] * 1e3:6.1f} ms, step {steps[mode] * 1e3:5.1f} ms;"
                f" NS per rank {' '.join(f'{f / 1e6:6.1f}' for f in ns)} MFLOP;"
                f" step sends {sent / 1024:6.1f} KiB per rank"
            )
        ratio = medians["owners"] / medians["redundant"]
        report_line(f"  {world} ranks iteration time owners / redundant = {ratio:.3f}")
        benchmark.extra_info[f"owners_over_redundant_{world}"] = ratio

        # Invariants: owners run every distinct matrix exactly once across the world; dense
        # weights (replicated) stay bit-identical across ranks in both modes.
        owners = [r["owners"]["ns_flops"] for r in per_rank]
        assert sum(owners) == TOTAL_FLOPS, (owners, TOTAL_FLOPS)
        for mode in MODES:
            assert all(torch.equal(r[mode]["dense"], per_rank[0][mode]["dense"]) for r in per_rank), mode
        drift = max((r["owners"]["weights"] - r["redundant"]["weights"]).abs().max().item() for r in per_rank)
        report_line(
            f"  {world} ranks: owners' busiest rank {max(owners) / (TOTAL_FLOPS / world):.3f}x total/N;"
            f" max |weights owners - redundant| after {WARMUP + 1 + ROUNDS} steps {drift:.1e} (bf16 NS)"
        )

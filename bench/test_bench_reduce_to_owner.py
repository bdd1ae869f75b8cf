"""ZeRO-3 Muon on 4 ranks: reduce-scatter plus gather-to-owner (landed) vs reduce straight to the owner.

Issue 10 asks to try reducing each Muon matrix's gradient straight to its owner instead of
ZeRO-3's reduce-scatter followed by the gather-to-owner exchange, and to let the measured bytes
decide. This benchmark runs both with the library's steps at the collective level (no DeepSpeed
engine: ``bench/test_bench_zero3_comm.py`` measures them inside it) on the Muon matrices of the dense ZeRO-3 bench's model (``MUON_SHAPES``), each
parameter cut into ``WORLD`` chunks as ZeRO-3 partitions it (``param_partition_layout``), every
rank starting each step from its own unreduced fp32 gradient of every matrix:

- **A, reduce-scatter** (``"zero3_muon_gradients": "reduce_scatter"``): ``reduce_scatter_tensor`` of the gradients into the partitions (fp32, averaged,
  what DeepSpeed does), then :func:`sharded_muon_step` on the partition: momentum there, pieces
  gathered to the owners in fp32, Newton-Schulz, pieces back in the Newton-Schulz dtype.
- **B, reduce-to-owner**: the library's owner path, as the DeepSpeed ZeRO-3 glue runs it
  (``reduce_to_owners``: one coalesced ``reduce`` per owner of the gradients of the matrices it
  owns, fp32, the same owners; then ``owner_muon_step``: momentum and Newton-Schulz on the whole
  matrices at the owner, the update sent back to the partition holders with one
  ``all_to_all_single``, applied there with the same arithmetic).
- **AdamW baseline**: the reduce-scatter alone.

Parity: both paths land on the same partitions after ``STEPS`` steps with fp32 Newton-Schulz.
Bytes (with bf16 Newton-Schulz, as the ZeRO-3 bench pins; ``BYTE_STEPS`` steps): ``CommCounter``'s ring-equivalent
rule, where a reduce counts ``(g-1)/g * S`` on every rank (its mean over roots), and, per rank,
the root-aware figure of a pipelined reduce (every non-root sends ``S``, the root nothing). The
rest of the model's gradients (embeddings, head, norms: AdamW at ZeRO-3) are reduce-scattered
alike in every variant and reported apart, so whole-model ratios compare with the ZeRO-3 bench.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_reduce_to_owner.py -p no:cacheprovider -q
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch
import torch.distributed as dist
from torch import Tensor

from bench.test_bench_zero3_comm import MUON_SHAPES, WORLD, DenseLM
from bench.zero_harness import CommCounter, spawn

STEPS = 3  # parity run (fp32 Newton-Schulz)
BYTE_STEPS = 1  # bytes run (bf16): the same collectives every step, and bf16 Newton-Schulz is slow on CPU
LR, WEIGHT_DECAY = 0.02, 0.1
PARITY_ATOL = 1e-6  # fp32 Newton-Schulz; the paths differ only in the order gloo sums the 4 gradients
MUON_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "ffn_in", "ffn_out")


def _hyper(ns_dtype: str):
    from expertopt.kernels import DEFAULT_EPS, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS
    from expertopt.updates.muon import MuonHyperparams

    return MuonHyperparams(
        lr=LR, weight_decay=WEIGHT_DECAY, momentum=0.95, nesterov=True, ns_method="standard",
        ns_steps=DEFAULT_NS_STEPS, ns_coefficients=DEFAULT_NS_COEFFICIENTS, ns_dtype=ns_dtype,
        eps=DEFAULT_EPS, adjust_lr_fn=None,
    )  # fmt: skip


def _rest_shapes() -> list[torch.Size]:
    """The dense model's parameters that are not Muon matrices (AdamW at ZeRO-3)."""
    return [p.shape for n, p in DenseLM().named_parameters() if not any(m in n for m in MUON_NAMES)]


def _chunks(shapes: list) -> list[int]:
    """ZeRO-3's partition of each parameter: ``ceil(numel / world)`` elements per rank."""
    return [math.ceil(math.prod(s) / WORLD) for s in shapes]


def _scatter_input(fulls: list[Tensor], chunks: list[int]) -> Tensor:
    """Rank ``r``'s slot holds its chunk of every parameter, back to back (ZeRO-3's flat partition)."""
    padded = [
        torch.nn.functional.pad(f, (0, c * WORLD - f.numel())) for f, c in zip(fulls, chunks, strict=True)
    ]
    return torch.cat(
        [p[r * c : (r + 1) * c] for r in range(WORLD) for p, c in zip(padded, chunks, strict=True)]
    )


def _gradients(rank: int, step: int, shapes: list, seed: int) -> list[Tensor]:
    """This rank's unreduced gradient of every parameter at ``step`` (flat, fp32)."""
    generator = torch.Generator().manual_seed(seed + 1000 * step + rank)
    return [torch.randn(math.prod(s), generator=generator) for s in shapes]


def _reduce_scatter(fulls: list[Tensor], chunks: list[int]) -> Tensor:
    """DeepSpeed's averaged reduce-scatter of the gradients into this rank's flat partition."""
    send = _scatter_input(fulls, chunks)
    out = send.new_empty(send.numel() // WORLD)
    dist.reduce_scatter_tensor(out, send)
    return out.div_(WORLD)


def _step_landed(fulls, partition, momentum, shards, hyper, counter) -> None:
    from expertopt.distributed.step import sharded_muon_step

    with counter.during("reduce"):
        grad = _reduce_scatter(fulls, _chunks(MUON_SHAPES))
    with counter.during("exchange"):
        sharded_muon_step([partition], [grad], [momentum], shards, hyper)


def _sends(fulls: list[Tensor], shards) -> dict[int, list[Tensor]]:
    """Every matrix's full gradient, by owner, in matrix order (what ``reduce_to_owners`` takes)."""
    sends: dict[int, list[Tensor]] = {}
    for index, owner in enumerate(shards.owners):
        sends.setdefault(owner, []).append(fulls[shards.layout.matrices[index].param].reshape(-1))
    return sends


def _step_to_owner(fulls, partition, owned_momentum, shards, hyper, counter, rooted) -> None:
    """The library's owner path, as the DeepSpeed ZeRO-3 glue runs it: ``reduce_to_owners`` into
    the unit's owned gradient, then ``owner_muon_step``. ``rooted`` accumulates the root-aware
    bytes this rank sends (pipelined reduce: a non-root sends the whole buffer once, the root
    nothing)."""
    from expertopt.distributed._runtime import reduce_to_owners
    from expertopt.distributed.step import owner_muon_step

    sends = _sends(fulls, shards)
    rooted[0] += sum(t.numel() * t.element_size() for o, ts in sends.items() if o != shards.rank for t in ts)
    with counter.during("reduce"):
        owned = reduce_to_owners(sends)
    if owned is not None:
        shards.owned_gradient.copy_(owned)
    with counter.during("exchange"):
        owner_muon_step([partition], owned_momentum, shards, hyper)


def _run(rank: int, path: str, ns_dtype: str, steps: int, counter: CommCounter) -> dict[str, Any]:
    from expertopt.distributed.layout import param_partition_layout
    from expertopt.distributed.step import ShardedMatrices

    chunks = _chunks(MUON_SHAPES)
    layout = param_partition_layout(MUON_SHAPES, chunks, WORLD)
    shards = ShardedMatrices(layout, rank, gradients_at_owner=path == "to_owner")
    if any(m.numel != math.prod(s) for m, s in zip(layout.matrices, MUON_SHAPES, strict=True)):
        raise ValueError("MUON_SHAPES must be 2-D weights: one matrix per parameter")
    weights = _gradients(0, -1, MUON_SHAPES, seed=7)  # the same initial weights on every rank
    partition = _scatter_input(weights, chunks).view(WORLD, -1)[rank].clone()
    momentum = shards.new_momentum(partition)  # the partition's, or the owned matrices' (to_owner)
    hyper, rooted = _hyper(ns_dtype), [0.0]
    counter.reset()
    for step in range(steps):
        fulls = _gradients(rank, step, MUON_SHAPES, seed=0)
        if path == "landed":
            _step_landed(fulls, partition, momentum, shards, hyper, counter)
        else:
            _step_to_owner(fulls, partition, momentum, shards, hyper, counter, rooted)
        with counter.during("rest"):  # the AdamW parameters' gradients: the same in every variant
            _reduce_scatter(_gradients(rank, step, _rest_shapes(), seed=50), _chunks(_rest_shapes()))
    wire = {
        phase: sum(v[2] for k, v in counter.records.items() if k[0] == phase) / steps
        for phase in ("reduce", "exchange", "rest")
    }
    return {
        "partition": partition,
        "wire": wire,
        "rooted_reduce": rooted[0] / steps,
        "state_bytes": momentum.numel() * momentum.element_size(),
        "owners": shards.owners,
        "owned": (shards.owned_matrices, shards.plan.owned_numel),
    }


def measure(rank: int, world_size: int) -> dict[str, Any]:
    if world_size != WORLD:
        raise ValueError(f"world_size must be {WORLD} (the partitions are cut for it), got {world_size}")
    counter = CommCounter().install()
    return {
        (path, ns_dtype): _run(rank, path, ns_dtype, steps, counter)
        for ns_dtype, steps in (("float32", STEPS), ("bfloat16", BYTE_STEPS))
        for path in ("landed", "to_owner")
    }


def _per_rank(per_rank: list[dict], path: str) -> list[dict[str, float]]:
    """Bytes per rank per step (bf16 run): Muon total under the ring rule and root-aware, and the rest."""
    rows = []
    for rank in per_rank:
        run = rank[(path, "bfloat16")]
        reduce = run["wire"]["reduce"]
        rooted = run["rooted_reduce"] if path == "to_owner" else reduce
        rows.append({
            "reduce": reduce, "exchange": run["wire"]["exchange"], "rest": run["wire"]["rest"],
            "muon": reduce + run["wire"]["exchange"], "muon_rooted": rooted + run["wire"]["exchange"],
            "state": run["state_bytes"],
        })  # fmt: skip
    return rows


def _report(per_rank: list[dict], emit) -> dict[str, float]:
    info: dict[str, float] = {}
    landed, to_owner = _per_rank(per_rank, "landed"), _per_rank(per_rank, "to_owner")
    adamw = statistics.fmean(r["reduce"] for r in landed)  # the reduce-scatter alone
    rest = statistics.fmean(r["rest"] for r in landed)
    emit(
        f"ZeRO-3 Muon gradient paths, {WORLD} ranks, {len(MUON_SHAPES)} Muon matrices, bf16 NS: KiB sent per rank per step"
    )
    emit(
        "  path               reduce  exchange  Muon total  busiest(ring)  busiest(root-aware)  momentum KiB/rank (max)"
    )
    emit(f"  AdamW (RS alone)  {adamw / 1024:7.1f} {0:9.1f} {adamw / 1024:11.1f}")
    for name, rows in (("A landed", landed), ("B reduce-to-owner", to_owner)):
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        info[f"{name}|muon"], info[f"{name}|busiest_rooted"] = (
            mean["muon"],
            max(r["muon_rooted"] for r in rows),
        )
        info[f"{name}|state_max"] = max(r["state"] for r in rows)
        emit(
            f"  {name:<17} {mean['reduce'] / 1024:7.1f} {mean['exchange'] / 1024:9.1f} {mean['muon'] / 1024:11.1f}"
            f" {max(r['muon'] for r in rows) / 1024:14.1f} {info[f'{name}|busiest_rooted'] / 1024:20.1f}"
            f" {mean['state'] / 1024:12.1f} ({info[f'{name}|state_max'] / 1024:.1f})"
        )
    a, b = info["A landed|muon"], info["B reduce-to-owner|muon"]
    info.update(ratio_a=a / adamw, ratio_b=b / adamw, ratio_b_a=b / a)
    info.update(model_a=(a + rest) / (adamw + rest), model_b=(b + rest) / (adamw + rest))
    info["busiest_b_a"] = info["B reduce-to-owner|busiest_rooted"] / info["A landed|busiest_rooted"]
    emit(
        f"  Muon matrices: A/AdamW {info['ratio_a']:.3f}  B/AdamW {info['ratio_b']:.3f}  B/A {info['ratio_b_a']:.3f}"
        f"  (busiest rank, root-aware: B/A {info['busiest_b_a']:.3f})"
    )
    emit(
        f"  whole model (+{rest / 1024:.1f} KiB AdamW-parameter reduce-scatter in each):"
        f" A/AdamW {info['model_a']:.3f}  B/AdamW {info['model_b']:.3f}"
    )
    info["parity_max_diff"] = max(
        (rank[("landed", "float32")]["partition"] - rank[("to_owner", "float32")]["partition"])
        .abs()
        .max()
        .item()
        for rank in per_rank
    )
    owned = [rank[("to_owner", "bfloat16")]["owned"] for rank in per_rank]
    emit(f"  owners (library's, by Newton-Schulz cost): (matrices, elements) per rank {owned}")
    emit(
        f"  parity after {STEPS} steps (fp32 NS): max |A - B| = {info['parity_max_diff']:.2e} (atol {PARITY_ATOL:.0e})"
    )
    return info


def test_reduce_to_owner_bytes_and_parity(benchmark, report_line):
    per_rank = benchmark.pedantic(spawn, args=(measure, WORLD), rounds=1, iterations=1)
    info = _report(per_rank, report_line)
    benchmark.extra_info.update(info)
    start = _scatter_input(_gradients(0, -1, MUON_SHAPES, seed=7), _chunks(MUON_SHAPES)).view(WORLD, -1)
    for rank, result in enumerate(per_rank):
        assert result[("landed", "float32")]["owners"] == result[("to_owner", "float32")]["owners"]
        landed, to_owner = (
            result[("landed", "float32")]["partition"],
            result[("to_owner", "float32")]["partition"],
        )
        assert not torch.allclose(landed, start[rank], atol=1e-3)  # the steps moved the weights
        torch.testing.assert_close(to_owner, landed, atol=PARITY_ATOL, rtol=0)
    assert info["ratio_b_a"] < 1  # B drops the fp32 gather; the reduce costs the reduce-scatter's ring bytes


# -- Time of the two reductions on gloo ---------------------------------------------------------
# In the engine, to_owner's train step measured 1.11x reduce_scatter's on loopback gloo although
# it sends 0.863x the bytes (docs/benchmarks.md). This times the reductions alone on the same
# bytes: the Muon gradients of ``MUON_SHAPES`` (fp32), reduced to their owners with the library's
# ``reduce_to_owners`` (one ``dist.reduce`` per owner) against one ``reduce_scatter_tensor`` of
# the same buffer, interleaved, ``TIMED_ROUNDS`` rounds after a warm-up; the slowest rank counts.
TIMED_ROUNDS = 15


def measure_reduction_time(rank: int, world_size: int) -> dict[str, list[float]]:
    import time

    from expertopt.distributed._runtime import reduce_to_owners
    from expertopt.distributed.layout import param_partition_layout
    from expertopt.distributed.step import ShardedMatrices

    layout = param_partition_layout(MUON_SHAPES, _chunks(MUON_SHAPES), WORLD)
    shards = ShardedMatrices(layout, rank)
    fulls = _gradients(rank, 0, MUON_SHAPES, seed=7)
    flat = torch.cat([f.reshape(-1) for f in fulls])
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % WORLD)])
    times: dict[str, list[float]] = {"reduce_to_owners": [], "reduce_scatter_tensor": []}
    for round_ in range(TIMED_ROUNDS + 2):
        sends = _sends(fulls, shards)
        dist.barrier()
        start = time.perf_counter()
        reduce_to_owners(sends)
        middle = time.perf_counter()
        dist.barrier()
        middle_synced = time.perf_counter()
        dist.reduce_scatter_tensor(flat.new_empty(flat.numel() // WORLD), flat.clone())
        end = time.perf_counter()
        if round_ >= 2:
            times["reduce_to_owners"].append(middle - start)
            times["reduce_scatter_tensor"].append(end - middle_synced)
    return times


def test_reduction_time_on_gloo(benchmark, report_line):
    per_rank = benchmark.pedantic(spawn, args=(measure_reduction_time, WORLD), rounds=1, iterations=1)
    medians = {
        kind: statistics.median(max(rank[kind][i] for rank in per_rank) for i in range(TIMED_ROUNDS))
        for kind in ("reduce_to_owners", "reduce_scatter_tensor")
    }
    ratio = medians["reduce_to_owners"] / medians["reduce_scatter_tensor"]
    report_line(
        f"gloo, {WORLD} ranks, {sum(math.prod(s) for s in MUON_SHAPES)} fp32 Muon gradient elements: "
        f"reduce to owners / reduce_scatter_tensor time {ratio:.2f} "
        f"(median of {TIMED_ROUNDS} rounds, slowest rank; same bytes under the ring rule)"
    )
    benchmark.extra_info["reduce_to_owners_vs_reduce_scatter_time"] = ratio
    assert all(len(rank["reduce_to_owners"]) == TIMED_ROUNDS for rank in per_rank)

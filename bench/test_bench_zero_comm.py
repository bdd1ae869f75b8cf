"""DeepSpeed ZeRO-1/2 on 4 ranks: bytes per rank per step, Newton-Schulz FLOPs per rank, step time.

Issue targets, on one MoE model (``bench.zero_workload.ModelSpec``: ``deepspeed.moe.layer.MoE``
with ep_size 2, so EDP 2, plus dense matrices that straddle ZeRO partitions), at ZeRO-1 and 2:

- expertopt Muon moves at most 1.25x the bytes of DeepSpeed AdamW and fewer than DeepSpeed Muon;
- expertopt's Newton-Schulz FLOPs per rank within 1.3x of total/N (DeepSpeed repeats them on
  every holder of a straddling matrix);
- the step-time ratio expertopt Muon / DeepSpeed Muon, measured in the same run;
- which ``zero_optimization`` communication settings move the fewest bytes
  (``use_multi_rank_bucket_allreduce``, ``overlap_comm``, ``reduce_scatter``).

One 4-rank gloo job (``bench.zero_harness.spawn``) builds every engine in turn, counts the
collectives of a few steps by wrapping ``deepspeed.comm`` and ``torch.distributed``
(``bench.zero_harness.CommCounter``; bytes are what a rank *sends* under the bandwidth-optimal
algorithm, all-reduce = 2x reduce-scatter, see there), counts Newton-Schulz FLOPs with
``FlopCounterMode``, and times whole iterations of the ``TIMED_CONFIGS`` engines interleaved
round by round. The MoE all-to-all of forward and backward is the same for every optimizer; it is
reported in its own column and left out of the totals. pytest-benchmark times the whole launch
(one round); the numbers are printed in the terminal summary and stored in ``extra_info``.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero_comm.py -p no:cacheprovider -q

``EXPERTOPT_ZERO_JSON=path`` also writes the per-rank raw numbers there.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

from bench.zero_harness import spawn
from bench.zero_workload import Case, ModelSpec, measure, muon_matrix_shapes
from expertopt.kernels import ns_flops

WORLD = 4
WARMUP, COUNTED, ROUNDS = 1, 2, 25
OPTIMIZERS = ("ds_adamw", "ds_muon", "expertopt_muon")
NAMES = {"ds_adamw": "DeepSpeed AdamW", "ds_muon": "DeepSpeed Muon", "expertopt_muon": "expertopt Muon"}
# label -> zero_optimization keys, explicit so that both libraries run the same one. Defaults:
# DeepSpeed's use_multi_rank_bucket_allreduce is true; expertopt.initialize sets false.
COMM_CONFIGS = {
    "multi_rank_bucket_allreduce=true": {"use_multi_rank_bucket_allreduce": True},
    "multi_rank_bucket_allreduce=false": {"use_multi_rank_bucket_allreduce": False},
    "overlap_comm=true, multi_rank_bucket_allreduce=true": {
        "overlap_comm": True,
        "use_multi_rank_bucket_allreduce": True,
    },
    "overlap_comm=true, multi_rank_bucket_allreduce=false": {
        "overlap_comm": True,
        "use_multi_rank_bucket_allreduce": False,
    },
    "reduce_scatter=false": {"reduce_scatter": False},
}
TIMED_CONFIGS = ("multi_rank_bucket_allreduce=true", "multi_rank_bucket_allreduce=false")
DEFAULTS = {  # each library's own default config
    "ds_adamw": "multi_rank_bucket_allreduce=true",
    "ds_muon": "multi_rank_bucket_allreduce=true",
    "expertopt_muon": "multi_rank_bucket_allreduce=false",
}
CATEGORIES = ("allreduce", "reduce", "allgather", "exchange", "small")
EP1 = ModelSpec(ep_size=1)


def _label(optimizer: str, stage: int, config: str, variant: str = "") -> str:
    return f"{optimizer}|Z{stage}|{config}{'|' + variant if variant else ''}"


def _cases() -> list[Case]:
    cases = []
    for stage in (1, 2):
        for config, zero in COMM_CONFIGS.items():
            for optimizer in OPTIMIZERS:
                if config == "reduce_scatter=false" and optimizer != "ds_adamw":
                    continue  # DeepSpeed asserts on it for any MoE model: once per stage is enough
                timed = config in TIMED_CONFIGS
                cases.append(Case(_label(optimizer, stage, config), optimizer, stage, zero, timed=timed))
    for config in TIMED_CONFIGS:
        for optimizer in OPTIMIZERS:
            zero = COMM_CONFIGS[config]
            cases.append(Case(_label(optimizer, 2, config, "bf16"), optimizer, 2, zero, bf16=True))
            cases.append(Case(_label(optimizer, 2, config, "ep1"), optimizer, 2, zero, spec=EP1))
    # fp32 Newton-Schulz: the comm configs must train identically up to reduction order (bf16
    # Newton-Schulz amplifies 1e-7 gradient differences in near-null directions to ~1e-3).
    for config, zero in COMM_CONFIGS.items():
        if config != "reduce_scatter=false":
            label = _label("expertopt_muon", 2, config, "fp32 NS")
            cases.append(Case(label, "expertopt_muon", 2, zero, ns_dtype="float32"))
    return cases


def _category(key: tuple, calls: float, payload: float) -> str:
    phase, source, op, _, _ = key
    if phase == "fwd" or (op == "all_to_all_single" and source == "deepspeed"):
        return "moe"  # MoE dispatch/combine and its capacity all-reduce: identical for all optimizers
    if op == "all_to_all_single":
        return "exchange"  # expertopt's gather-to-owner and scatter-back
    if payload <= 64 * calls:
        return "small"  # norms, overflow and non-finite flags
    if op.startswith("all_reduce"):
        return "allreduce"
    if op == "reduce":
        return "reduce"
    if "gather" in op:
        return "allgather"
    return "other"


def _bytes(per_rank: list[dict], label: str) -> dict[str, Any]:
    """Mean over ranks of wire bytes per category, total (MoE excluded), max rank, calls."""
    sums: dict[str, float] = defaultdict(float)
    totals, calls, payload = [], 0.0, 0.0
    for rank in per_rank:
        total = 0.0
        for key, (n, pay, wire) in rank["cases"][label]["comm"].items():
            category = _category(key, n, pay)
            sums[category] += wire / len(per_rank)
            if category != "moe":
                total += wire
                calls += n / len(per_rank)
                payload += pay / len(per_rank)
        totals.append(total)
    return {
        **{c: sums.get(c, 0.0) for c in (*CATEGORIES, "other", "moe")},
        "total": statistics.fmean(totals),
        "max_rank": max(totals),
        "calls": calls,
        "payload": payload,
    }


def _kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def _iteration_medians(per_rank: list[dict], label: str) -> dict[str, float]:
    """Median over rounds of the slowest rank's forward, backward, step and whole iteration."""
    rounds = list(zip(*(rank["times"][label] for rank in per_rank), strict=True))
    phases = {}
    for index, name in enumerate(("fwd", "bwd", "step")):
        phases[name] = statistics.median(max(r[index] for r in round_) for round_ in rounds)
    phases["iter"] = statistics.median(max(sum(r) for r in round_) for round_ in rounds)
    return phases


def _report(per_rank: list[dict], emit) -> dict[str, Any]:
    info: dict[str, Any] = {}
    cases = per_rank[0]["cases"]
    total_flops = sum(ns_flops(shape, method="standard") for shape in muon_matrix_shapes(ModelSpec()))
    fair = total_flops / WORLD

    emit(
        f"ZeRO comm, {WORLD} ranks, MoE ep_size=2 (EDP 2), fp32: wire KiB sent per rank per step (mean of ranks)"
    )
    emit(
        "  optimizer        stage config                         all-red  reduce  all-gath  exchange  small   TOTAL  max-rank  calls  | MoE a2a"
    )
    for config in COMM_CONFIGS:
        for stage in (1, 2):
            for optimizer in OPTIMIZERS:
                label = _label(optimizer, stage, config)
                if label not in cases:
                    continue
                if "error" in cases[label]:
                    emit(
                        f"  {NAMES[optimizer]:<16} Z{stage}    {config[:30]:<30} rejected: {cases[label]['error'][:70]}"
                    )
                    continue
                b = _bytes(per_rank, label)
                info[label] = b
                emit(
                    f"  {NAMES[optimizer]:<16} Z{stage}    {config[:30]:<30} {_kib(b['allreduce']):>8} {_kib(b['reduce']):>7}"
                    f" {_kib(b['allgather']):>9} {_kib(b['exchange']):>9} {_kib(b['small']):>6} {_kib(b['total']):>7}"
                    f" {_kib(b['max_rank']):>9} {b['calls']:>6.0f}  | {_kib(b['moe']):>7}"
                )
    for variant in ("bf16", "ep1"):
        for config in TIMED_CONFIGS:
            for optimizer in OPTIMIZERS:
                label = _label(optimizer, 2, config, variant)
                b = _bytes(per_rank, label)
                info[label] = b
                emit(
                    f"  {NAMES[optimizer]:<16} Z2    {(variant + ', ' + config)[:30]:<30} {_kib(b['allreduce']):>8}"
                    f" {_kib(b['reduce']):>7} {_kib(b['allgather']):>9} {_kib(b['exchange']):>9} {_kib(b['small']):>6}"
                    f" {_kib(b['total']):>7} {_kib(b['max_rank']):>9} {b['calls']:>6.0f}  | {_kib(b['moe']):>7}"
                )

    emit("Targets (same comm config on both sides): expertopt/DS AdamW <= 1.25, expertopt/DS Muon < 1")
    for variant in ("", "bf16", "ep1"):
        for config in TIMED_CONFIGS:
            for stage in (1, 2) if not variant else (2,):
                adamw, muon, eo = (info[_label(o, stage, config, variant)]["total"] for o in OPTIMIZERS)
                info[f"ratio|Z{stage}|{config}|{variant}"] = (eo / adamw, eo / muon)
                emit(
                    f"  Z{stage} {(variant + ' ' + config).strip():<40} expertopt/AdamW {eo / adamw:5.3f}"
                    f" [{'ok' if eo / adamw <= 1.25 else 'MISS'}]   expertopt/DS Muon {eo / muon:5.3f}"
                    f" [{'ok' if eo < muon else 'MISS'}]"
                )
    for variant in ("", "bf16", "ep1"):
        stage = 2
        adamw, muon, eo = (info[_label(o, stage, DEFAULTS[o], variant)]["total"] for o in OPTIMIZERS)
        info[f"ratio|Z{stage}|each default|{variant}"] = (eo / adamw, eo / muon)
        emit(
            f"  Z{stage} {(variant + ' each library at its default').strip():<40} expertopt/AdamW {eo / adamw:5.3f}"
            f"   expertopt/DS Muon {eo / muon:5.3f}"
        )

    emit(
        f"Newton-Schulz FLOPs per rank per step (standard, 5 steps); total over distinct matrices {total_flops / 1e6:.1f} M, total/N {fair / 1e6:.1f} M"
    )
    for stage in (1, 2):
        for optimizer in ("ds_muon", "expertopt_muon"):
            label = _label(optimizer, stage, DEFAULTS[optimizer])
            flops = [rank["cases"][label]["ns_flops"] for rank in per_rank]
            info[f"flops|{label}"] = flops
            emit(
                f"  Z{stage} {NAMES[optimizer]:<16} per rank (M) {' '.join(f'{f / 1e6:7.1f}' for f in flops)}"
                f"  max/(total/N) {max(flops) / fair:5.3f}  sum/total {sum(flops) / total_flops:5.3f}"
                f"  [{'ok' if max(flops) <= 1.3 * fair else 'MISS'} <= 1.3]"
            )

    label = _label("expertopt_muon", 2, TIMED_CONFIGS[1])
    plans = [rank["cases"][label]["plan"] for rank in per_rank]
    emit(
        f"expertopt exchange (Z2): Muon-matrix elements per rank {statistics.fmean(p['held'] for p in plans):,.0f},"
        f" in matrices straddling partitions {statistics.fmean(p['straddling'] for p in plans):,.0f},"
        f" sent to another owner {statistics.fmean(p['sent'] for p in plans):,.0f}"
        f" ({_kib(info[label]['exchange'])} KiB both ways; reply in the Newton-Schulz dtype);"
        f" owners' Newton-Schulz max/(total/N) {max(p['flops'] for p in plans) / fair:.3f}"
    )

    emit("Iteration time, slowest rank, median of rounds (ms): fwd / bwd / step / whole; NS in bf16")
    for config in TIMED_CONFIGS:
        for stage in (1, 2):
            medians = {}
            for optimizer in OPTIMIZERS:
                label = _label(optimizer, stage, config)
                if label not in per_rank[0]["times"]:
                    continue
                medians[optimizer] = m = _iteration_medians(per_rank, label)
                inside = [rank["inside"][label] for rank in per_rank]
                ns = statistics.fmean(i["ns"] for i in inside) / ROUNDS
                comm = statistics.fmean(sum(v for k, v in i.items() if k != "ns") for i in inside) / ROUNDS
                info[f"time|{label}"] = {**m, "ns": ns, "comm": comm}
                emit(
                    f"  Z{stage} {config[:34]:<34} {NAMES[optimizer]:<16}"
                    f" {m['fwd'] * 1e3:6.1f} {m['bwd'] * 1e3:6.1f} {m['step'] * 1e3:6.1f} {m['iter'] * 1e3:6.1f}"
                    f"   in NS {ns * 1e3:5.1f}, in collectives {comm * 1e3:5.1f} (mean of ranks)"
                )
            ratio = medians["expertopt_muon"]["iter"] / medians["ds_muon"]["iter"]
            info[f"time_ratio|Z{stage}|{config}"] = ratio
            line = (
                f"  Z{stage} {config[:34]:<34} iteration time expertopt Muon / DeepSpeed Muon = {ratio:.3f}"
            )
            if "ds_adamw" in medians:
                base = medians["ds_adamw"]["iter"]
                overhead = (medians["expertopt_muon"]["iter"] - base) / (medians["ds_muon"]["iter"] - base)
                info[f"overhead_ratio|Z{stage}|{config}"] = overhead
                line += f"; time over DS AdamW, expertopt / DS Muon = {overhead:.3f}"
            emit(line)
    for optimizer in ("ds_muon", "expertopt_muon"):
        inside = [rank["inside"][_label(optimizer, 2, TIMED_CONFIGS[0])] for rank in per_rank]
        ops = {k: statistics.fmean(i.get(k, 0.0) for i in inside) / ROUNDS for k in inside[0] if k != "ns"}
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
        emit(
            f"  Z2 {TIMED_CONFIGS[0]} {NAMES[optimizer]:<16} ms per iteration inside: "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in top)
        )
    return info


def _check(per_rank: list[dict]) -> None:
    """Invariants of the measurement itself (the targets are reported, not asserted)."""
    total_flops = sum(ns_flops(shape, method="standard") for shape in muon_matrix_shapes(ModelSpec()))
    for label, case in per_rank[0]["cases"].items():
        if "error" in case:
            assert label.endswith("reduce_scatter=false"), (label, case["error"])
            continue
        measured = _bytes(per_rank, label)
        assert measured["allgather"] > 0, label  # the counter saw ZeRO's parameter all-gather
        if label.startswith("expertopt_muon"):
            plans = [rank["cases"][label]["plan"] for rank in per_rank]
            flops = [rank["cases"][label]["ns_flops"] for rank in per_rank]
            # Every Muon matrix orthogonalized exactly once, by its owner, as planned.
            assert sum(flops) == total_flops, (label, sum(flops), total_flops)
            assert flops == [p["flops"] for p in plans], label
            # The exchange moves exactly the pieces whose owner is elsewhere: out in the partition's
            # dtype, back in the reply dtype.
            assert abs(measured["exchange"] - statistics.fmean(p["wire"] for p in plans)) < 1, label


def test_zero_comm_bytes_flops_and_step_time(benchmark, report_line):
    per_rank = benchmark.pedantic(
        spawn, args=(measure, WORLD, _cases(), WARMUP, COUNTED, ROUNDS), rounds=1, iterations=1
    )
    if path := os.environ.get("EXPERTOPT_ZERO_JSON"):
        with open(path, "w") as handle:
            json.dump(
                [
                    {
                        "cases": {
                            label: {
                                k: ({str(kk): vv for kk, vv in v.items()} if k == "comm" else v)
                                for k, v in c.items()
                            }
                            for label, c in rank["cases"].items()
                        },
                        "times": rank["times"],
                        "inside": rank["inside"],
                    }
                    for rank in per_rank
                ],
                handle,
                indent=1,
            )
    info = _report(per_rank, report_line)
    diffs = {
        label: max(rank["cases"][label].get("param_diff", 0.0) for rank in per_rank)
        for label in per_rank[0]["cases"]
    }
    report_line(
        "Max |param difference| vs the same optimizer/stage/dtype under the first comm config: "
        + ", ".join(f"{label} {d:.1e}" for label, d in diffs.items() if d > 0)
    )
    benchmark.extra_info.update(
        {k: v for k, v in info.items() if k.startswith(("ratio|", "time_ratio|", "flops|"))}
    )
    _check(per_rank)

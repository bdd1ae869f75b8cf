"""DeepSpeed ZeRO-3 with AutoEP experts on 4 ranks: bytes per rank per step and state per rank.

Four optimizers on the same Qwen3-MoE (transformers, tiny config in code, AutoEP EP 2, so each
expert-data-parallel group has 2 ranks):

- DeepSpeed AdamW (``deepspeed.initialize``, experts partitioned over EDP by AutoEP);
- DeepSpeed Muon, with the setting it forces at stage 3 (``"reduce_scatter": false``);
- expertopt Muon, ``"expert_placement": "sharded"`` (AutoEP's own ZeRO-3 partitioning: experts
  gathered in forward and backward);
- expertopt Muon, ``"expert_placement": "replicated"`` (experts whole on every EDP rank as
  ZeRO-3 persistent parameters, re-gathered once per step after the update).

``stage3_max_reuse_distance: 0`` and ``stage3_prefetch_bucket_size: 0`` make ZeRO-3 release
each module's weights after use and fetch them again in backward, as it does for any model
whose layers are larger than the reuse distance (default 1e9 elements, i.e. every model large
enough to need ZeRO-3); the tiny model would otherwise keep them from forward to backward.

Bytes are counted as in the other ZeRO benchmarks (``bench.zero_harness.CommCounter``: what a
rank *sends* under the bandwidth-optimal algorithm). Unlike the dense ZeRO-3 benchmark, the
parameter all-gathers are part of the compared total, because the expert placement changes
them. AutoEP's token all-to-alls (identical for every optimizer) are reported, not compared.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero3_experts.py -p no:cacheprovider -q
"""

from __future__ import annotations

import os
import statistics
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch

from bench.test_bench_zero3_comm import _config as dense_config
from bench.test_bench_zero3_comm import _state_bytes
from bench.zero_harness import CommCounter, spawn

WORLD, EP = 4, 2
EDP = WORLD // EP
WARMUP, COUNTED = 1, 2  # the warm-up step records ZeRO-3's trace
D, EXPERTS, EXPERT_HIDDEN, LAYERS, VOCAB, BATCH, SEQ = 64, 8, 128, 2, 256, 2, 16
# "@gasN": gradient accumulation N (bytes still per optimizer step); the others run GAS 1.
OPTIMIZERS = ("ds_adamw", "ds_muon", "eo_sharded", "eo_replicated", "eo_sharded@gas2", "eo_replicated@gas2")
NAMES = {
    "ds_adamw": "DeepSpeed AdamW",
    "ds_muon": "DeepSpeed Muon",
    "eo_sharded": "expertopt sharded",
    "eo_replicated": "expertopt replicated",
    "eo_sharded@gas2": "  sharded, GAS 2",
    "eo_replicated@gas2": "  replicated, GAS 2",
}


def _accumulation(optimizer: str) -> int:
    return int(optimizer.partition("@gas")[2] or 1)


def _model() -> torch.nn.Module:
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        intermediate_size=4 * D,
        moe_intermediate_size=EXPERT_HIDDEN,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def _config(optimizer: str) -> dict[str, Any]:
    """The dense ZeRO-3 bytes benchmark's config for the same optimizer, with AutoEP, this
    benchmark's batch and accumulation, weights released after each use, and the placement."""
    config = dense_config("expertopt_muon" if optimizer.startswith("eo_") else optimizer)
    config["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    if optimizer.startswith("eo_"):
        config["optimizer"]["params"]["expert_placement"] = optimizer.removeprefix("eo_").partition("@")[0]
    config["train_micro_batch_size_per_gpu"] = BATCH
    config["gradient_accumulation_steps"] = _accumulation(optimizer)
    config["expert_parallel"] = {"enabled": True, "autoep_size": EP, "preset_model": "qwen3_moe"}
    return config


def _initialize(optimizer: str) -> Any:
    import deepspeed

    import expertopt
    from expertopt.integrations._autoep_compat import transformers_registry_shim

    model, config = _model(), _config(optimizer)
    if optimizer.startswith("eo_"):
        return expertopt.initialize(model=model, config=config)[0]
    with transformers_registry_shim(config):
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]


def _resident_expert_bytes(engine: Any) -> int:
    """Bytes of expert compute weights this rank holds between steps (whole or its partition)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    total = 0
    for param in engine.module.parameters():
        if getattr(param, "ds_zero_placement_family", None) != "autoep_expert":
            continue
        whole = param.ds_status == ZeroParamStatus.AVAILABLE
        total += (param.ds_numel if whole else param.ds_tensor.numel()) * param.element_size()
    return total


def _measure_one(rank: int, optimizer: str, counter: CommCounter) -> dict[str, Any]:
    try:
        engine = _initialize(optimizer)
    except Exception as error:  # reported in the table: why this optimizer cannot run here
        return {"error": f"{type(error).__name__}: {error}"}
    for step in range(WARMUP + COUNTED):
        if step == WARMUP:
            counter.reset()
        for micro in range(_accumulation(optimizer)):
            generator = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
            with counter.during("fwd"):
                loss = engine(input_ids=tokens, labels=tokens).loss
            with counter.during("bwd"):
                engine.backward(loss)
            with counter.during("step"):
                engine.step()
    return {
        "comm": {key: [v / COUNTED for v in value] for key, value in counter.records.items()},
        "state_bytes": _state_bytes(engine),
        "expert_weight_bytes": _resident_expert_bytes(engine),
    }


def measure(rank: int, world_size: int) -> dict[str, Any]:
    torch.compiler.set_stance("force_eager")  # DeepSpeed compiles muon_update; run it eagerly
    counter = CommCounter().install()
    return {optimizer: _measure_one(rank, optimizer, counter) for optimizer in OPTIMIZERS}


def _split(comm: dict) -> dict[str, float]:
    """Wire bytes by kind: dense and expert parameter gathers in forward/backward, gradient
    reduction, the step's collectives, expertopt's exchange, and AutoEP's token all-to-alls."""
    out = dict.fromkeys(("dense_gather", "expert_gather", "grad_reduce", "step", "exchange", "tokens"), 0.0)
    for (phase, source, op, size, _), (_, _, wire) in comm.items():
        if phase in ("fwd", "bwd") and op == "all_to_all_single":
            out["tokens"] += wire
        elif phase in ("fwd", "bwd") and "gather" in op:
            out["expert_gather" if size == EDP else "dense_gather"] += wire
        elif phase in ("fwd", "bwd"):
            out["grad_reduce"] += wire
        elif op == "all_to_all_single" and source == "torch":
            out["exchange"] += wire
        else:
            out["step"] += wire
    out["total"] = sum(v for k, v in out.items() if k != "tokens")
    return out


def _report(per_rank: list[dict], emit) -> dict[str, float]:
    info: dict[str, float] = {}
    emit(f"ZeRO-3 + AutoEP (EP {EP}, EDP {EDP}), {WORLD} ranks, Qwen3-MoE fp32: KiB sent per rank per step")
    emit(
        "  optimizer             dense-gather expert-gather grad-reduce   step exchange   TOTAL"
        " | tokens  opt-state  expert-weights"
    )
    for optimizer in OPTIMIZERS:
        if "error" in per_rank[0][optimizer]:
            emit(f"  {NAMES[optimizer]:<21} cannot run: {per_rank[0][optimizer]['error'][:300]}")
            continue
        splits = [_split(rank[optimizer]["comm"]) for rank in per_rank]
        mean = {k: statistics.fmean(s[k] for s in splits) for k in splits[0]}
        state = statistics.fmean(rank[optimizer]["state_bytes"] for rank in per_rank)
        weights = statistics.fmean(rank[optimizer]["expert_weight_bytes"] for rank in per_rank)
        info.update({f"{optimizer}|total": mean["total"], f"{optimizer}|state": state})
        info[f"{optimizer}|expert_weights"] = weights
        emit(
            f"  {NAMES[optimizer]:<21} {mean['dense_gather'] / 1024:12.1f} {mean['expert_gather'] / 1024:13.1f}"
            f" {mean['grad_reduce'] / 1024:11.1f} {mean['step'] / 1024:6.1f} {mean['exchange'] / 1024:8.1f}"
            f" {mean['total'] / 1024:7.1f} | {mean['tokens'] / 1024:6.1f} {state / 1024:10.1f}"
            f" {weights / 1024:15.1f}"
        )
    adamw = info["ds_adamw|total"]
    ratios = [
        f"{NAMES[o].strip()} {info[f'{o}|total'] / adamw:.3f}"
        for o in OPTIMIZERS
        if f"{o}|total" in info and "@" not in o
    ]
    emit("  bytes / DeepSpeed AdamW (GAS 1): " + ", ".join(ratios))
    for suffix in ("", "@gas2"):
        ratio = info[f"eo_replicated{suffix}|total"] / info[f"eo_sharded{suffix}|total"]
        info[f"replicated_over_sharded{suffix}"] = ratio
        emit(f"  replicated / sharded, GAS {_accumulation(suffix)}: bytes {ratio:.3f}")
    return info


def test_zero3_expert_placements_bytes_and_state(benchmark, report_line):
    per_rank = benchmark.pedantic(spawn, args=(measure, WORLD), rounds=1, iterations=1)
    info = _report(per_rank, report_line)
    benchmark.extra_info.update(info)
    # Replicated experts are never gathered in forward or backward.
    for rank in per_rank:
        for suffix in ("", "@gas2"):
            assert _split(rank[f"eo_replicated{suffix}"]["comm"])["expert_gather"] == 0
            assert _split(rank[f"eo_sharded{suffix}"]["comm"])["expert_gather"] > 0

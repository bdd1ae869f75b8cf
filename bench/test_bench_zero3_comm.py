"""DeepSpeed ZeRO-3 on 4 ranks: bytes per rank per step, optimizer-state bytes, Newton-Schulz balance.

Issue targets, on a dense LM (``DenseLM``: every parameter partitioned over the 4 ranks,
``stage3_param_persistence_threshold: 0``), fp32, gradient accumulation 1, clipping on:

- expertopt Muon moves at most 1.5x the gradient+optimizer bytes of DeepSpeed AdamW, and at
  most 0.35x those of DeepSpeed's Muon (which forces ``"reduce_scatter": false``, an all-reduce,
  and all-gathers full gradients and momentum in its step);
- every Muon matrix orthogonalized once; the busiest rank's Newton-Schulz FLOPs <= 1.1x total/N.

Bytes are counted as in the ZeRO-1/2 benchmark (``bench.zero_harness.CommCounter``: what a rank
*sends* under the bandwidth-optimal algorithm, all-reduce = 2x reduce-scatter). ZeRO-3's
parameter all-gathers in forward and backward are the same for every optimizer; they are
reported in their own column and left out of the compared total, which is the gradient
reduction (backward) plus everything in ``engine.step``.

expertopt runs both ways dense Muon gradients can reach their owners
(``"zero3_muon_gradients"``): "to_owner" (the default: one reduce per owner in backward, only
the bf16 update sent back in the step) and "reduce_scatter" (DeepSpeed's reduce-scatter, then a
gather to the owner and the way back). The collective-level model of the same comparison is
``bench/test_bench_reduce_to_owner.py``.

Run from the repository root::

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero3_comm.py -p no:cacheprovider -q
"""

from __future__ import annotations

import os
import statistics
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch
from torch import nn

from bench.zero_harness import CommCounter, spawn

WORLD = 4
WARMUP, COUNTED = 1, 2
LR, ADAMW_LR = 0.02, 3e-4
OPTIMIZERS = ("ds_adamw", "ds_muon", "expertopt_muon", "expertopt_muon_rs")
NAMES = {
    "ds_adamw": "DeepSpeed AdamW",
    "ds_muon": "DeepSpeed Muon",
    "expertopt_muon": "expertopt to_owner",
    "expertopt_muon_rs": "expertopt red-scat",
}
D, D_FF, LAYERS, VOCAB, BATCH, SEQ = 96, 384, 2, 512, 4, 32


class DenseLM(nn.Module):
    """Attention-shaped and FFN matrices (Muon), embeddings, head, norms (AdamW)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(D),
                    "q_proj": nn.Linear(D, D, bias=False),
                    "k_proj": nn.Linear(D, D, bias=False),
                    "v_proj": nn.Linear(D, D, bias=False),
                    "o_proj": nn.Linear(D, D, bias=False),
                    "ffn_in": nn.Linear(D, D_FF, bias=False),
                    "ffn_out": nn.Linear(D_FF, D, bias=False),
                }
            )
            for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            h = block["norm"](x)
            q, k, v = block["q_proj"](h), block["k_proj"](h), block["v_proj"](h)
            x = x + block["o_proj"](torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v)
            x = x + block["ffn_out"](torch.relu(block["ffn_in"](block["norm"](x))))
        logits = self.lm_head(self.norm(x))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


MUON_SHAPES = [(D, D)] * 4 * LAYERS + [(D_FF, D), (D, D_FF)] * LAYERS


def _config(optimizer: str) -> dict[str, Any]:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if optimizer == "ds_adamw":
        block = {"type": "AdamW", "params": {"lr": ADAMW_LR, "torch_adam": True}}
    elif optimizer == "ds_muon":
        block = {
            "type": "Muon",
            "params": {"lr": LR, "adam_lr": ADAMW_LR, "ns_method": "standard", "torch_adam": True},
        }
        zero["reduce_scatter"] = False  # DeepSpeed 0.19.8: "Muon and reduce scatter cannot be used together"
    else:
        # bf16 pinned (the recorded bytes are bf16 replies); "auto" is fp32 on a CPU without oneDNN bf16.
        block = {"type": "Muon", "params": {"lr": LR, "adamw_lr": ADAMW_LR, "ns_dtype": "bfloat16"}}
        if optimizer == "expertopt_muon_rs":
            block["params"]["zero3_muon_gradients"] = "reduce_scatter"
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": block,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def _state_bytes(engine: Any) -> int:
    """Bytes of optimizer state tensors this rank holds (momentum, Adam moments; not master weights)."""
    total = 0
    for state in engine.optimizer.optimizer.state.values():
        total += sum(
            v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0
        )
    return total


def _measure_one(rank: int, optimizer: str, counter: CommCounter) -> dict[str, Any]:
    import deepspeed

    import expertopt
    import expertopt.distributed.step as eo_step
    from expertopt.kernels import ns_flops

    torch.manual_seed(0)
    model = DenseLM()
    config = _config(optimizer)
    if optimizer.startswith("expertopt"):
        engine, *_ = expertopt.initialize(model=model, config=config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    matrices = {"count": 0, "flops": 0}
    kernel = eo_step.orthogonalize_updates

    def counted(views, **kwargs):
        for view in views:
            matrices["count"] += 1
            matrices["flops"] += ns_flops(tuple(view.shape), method="standard")
        return kernel(views, **kwargs)

    for step in range(WARMUP + COUNTED):
        if step == WARMUP:
            counter.reset()
            eo_step.orthogonalize_updates = counted
        generator = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        with counter.during("fwd"):
            loss = engine(tokens)
        with counter.during("bwd"):
            engine.backward(loss)
        with counter.during("step"):
            engine.step()
    eo_step.orthogonalize_updates = kernel
    comm = {key: [v / COUNTED for v in value] for key, value in counter.records.items()}
    return {
        "comm": comm,
        "state_bytes": _state_bytes(engine),
        "ns_matrices": matrices["count"] / COUNTED,
        "ns_flops": matrices["flops"] / COUNTED,
    }


def measure(rank: int, world_size: int) -> dict[str, Any]:
    torch.compiler.set_stance("force_eager")  # DeepSpeed compiles muon_update; run it eagerly
    counter = CommCounter().install()
    return {optimizer: _measure_one(rank, optimizer, counter) for optimizer in OPTIMIZERS}


def _split(comm: dict) -> dict[str, float]:
    """Wire bytes by kind: parameter gathers (fwd/bwd), gradient reduction, step, exchange."""
    out = dict.fromkeys(("param_gather", "grad_reduce", "step_other", "exchange"), 0.0)
    for (phase, source, op, _, _), (_, _, wire) in comm.items():
        if phase in ("fwd", "bwd") and "gather" in op:
            out["param_gather"] += wire
        elif phase in ("fwd", "bwd"):
            out["grad_reduce"] += wire
        elif op == "all_to_all_single" and source == "torch":
            out["exchange"] += wire
        else:
            out["step_other"] += wire
    out["total"] = out["grad_reduce"] + out["step_other"] + out["exchange"]
    return out


def _report(per_rank: list[dict], emit) -> dict[str, float]:
    from expertopt.kernels import ns_flops

    info: dict[str, float] = {}
    emit(f"ZeRO-3 comm, {WORLD} ranks, dense LM, fp32: wire KiB sent per rank per step (mean of ranks)")
    emit(
        "  optimizer         grad-reduce  step-other  exchange  TOTAL  max-rank | param-gather  opt-state KiB"
    )
    totals = {}
    for optimizer in OPTIMIZERS:
        splits = [_split(rank[optimizer]["comm"]) for rank in per_rank]
        mean = {k: statistics.fmean(s[k] for s in splits) for k in splits[0]}
        totals[optimizer] = mean["total"]
        for split, value in mean.items():  # grad_reduce, step_other, exchange, total, param_gather
            info[f"{optimizer}|{split}"] = value
        state = statistics.fmean(rank[optimizer]["state_bytes"] for rank in per_rank)
        info[f"{optimizer}|state"] = state
        emit(
            f"  {NAMES[optimizer]:<17} {mean['grad_reduce'] / 1024:11.1f} {mean['step_other'] / 1024:11.1f}"
            f" {mean['exchange'] / 1024:9.1f} {mean['total'] / 1024:7.1f} {max(s['total'] for s in splits) / 1024:8.1f}"
            f" | {mean['param_gather'] / 1024:12.1f} {state / 1024:14.1f}"
        )
    eo, adamw, ds_muon = totals["expertopt_muon"], totals["ds_adamw"], totals["ds_muon"]
    info["ratio_adamw"], info["ratio_ds_muon"] = eo / adamw, eo / ds_muon
    info["ratio_to_owner_vs_reduce_scatter"] = eo / totals["expertopt_muon_rs"]
    emit(
        f"  expertopt/AdamW {eo / adamw:.3f} [{'ok' if eo / adamw <= 1.5 else 'MISS'} <= 1.5]"
        f"   expertopt/DS Muon {eo / ds_muon:.3f} [{'ok' if eo / ds_muon <= 0.35 else 'MISS'} <= 0.35]"
        f"   DS Muon/AdamW {ds_muon / adamw:.3f}"
    )
    emit(
        f"  to_owner/reduce_scatter {info['ratio_to_owner_vs_reduce_scatter']:.3f}"
        f"   reduce_scatter/AdamW {totals['expertopt_muon_rs'] / adamw:.3f}"
    )
    total_flops = sum(ns_flops(s, method="standard") for s in MUON_SHAPES)
    flops = [rank["expertopt_muon"]["ns_flops"] for rank in per_rank]
    counts = [rank["expertopt_muon"]["ns_matrices"] for rank in per_rank]
    info["ns_busiest"] = max(flops) / (total_flops / WORLD)
    emit(
        f"  expertopt Newton-Schulz: matrices per rank {counts} (sum {sum(counts):.0f} of {len(MUON_SHAPES)});"
        f" busiest rank {info['ns_busiest']:.3f}x total/N [{'ok' if info['ns_busiest'] <= 1.1 else 'MISS'} <= 1.1]"
    )
    return info


def test_zero3_comm_bytes_and_state(benchmark, report_line):
    per_rank = benchmark.pedantic(spawn, args=(measure, WORLD), rounds=1, iterations=1)
    info = _report(per_rank, report_line)
    benchmark.extra_info.update(info)
    for variant in ("expertopt_muon", "expertopt_muon_rs"):
        counts = [rank[variant]["ns_matrices"] for rank in per_rank]
        assert sum(counts) == len(MUON_SHAPES)  # every matrix once per step, on its owner
        assert info[f"{variant}|exchange"] > 0  # the counter saw the exchange

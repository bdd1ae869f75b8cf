"""The ZeRO-1/2 communication benchmark's model, engines and per-rank measurement.

:func:`measure` runs on every rank (spawned by ``bench.zero_harness.spawn``). For each
:class:`Case` it builds the same MoE model (same seed), an engine through
``deepspeed.initialize`` (DeepSpeed's AdamW and Muon) or ``expertopt.initialize`` (expertopt's
Muon), trains a few warm-up steps, then counts on a few more steps:

- collectives (``bench.zero_harness.CommCounter``) by phase: ``fwd`` (MoE dispatch only),
  ``bwd`` (MoE all-to-all backward, plus ZeRO-1/2's gradient reduction, which both stages run at
  the end of backward on an accumulation boundary), ``step`` (everything in ``engine.step``:
  expertopt's exchange, the parameter all-gather, norms and flags);
- Newton-Schulz matmul FLOPs (``FlopCounterMode``) inside DeepSpeed's ``muon_update`` (it runs in
  ZeRO's gradient epilogue, on every rank holding part of a matrix) and inside expertopt's
  ``orthogonalize_updates`` (on the owner only);
- expertopt's owner plan (``_plan_summary``): what its exchange must send, to check the count;

then times whole training iterations (forward, backward, step), interleaved round by round over
the cases that have ``timed=True`` so load changes hit all of them alike, with the wall time spent
inside collectives and inside Newton-Schulz.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.zero_harness import CommCounter

__all__ = ["Case", "ModelSpec", "ZeroMoE", "measure", "muon_matrix_shapes"]

LR, ADAMW_LR, WEIGHT_DECAY, MOMENTUM = 0.02, 3e-4, 0.1, 0.95


@dataclass(frozen=True)
class ModelSpec:
    """A small MoE transformer-shaped model: dense matrices that straddle ZeRO partitions."""

    layers: int = 2
    d_model: int = 96
    d_ff: int = 160  # dense (shared) FFN
    d_expert: int = 192  # expert FFN hidden size
    num_experts: int = 4
    ep_size: int = 2
    vocab: int = 512
    batch: int = 4  # sequences per rank
    seq: int = 32


class _Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        d = spec.d_model
        self.norm1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, spec.d_ff, bias=False)
        self.ffn_out = nn.Linear(spec.d_ff, d, bias=False)
        expert = nn.Sequential(nn.Linear(d, spec.d_expert), nn.GELU(), nn.Linear(spec.d_expert, d))
        self.moe = MoE(
            hidden_size=d, expert=expert, num_experts=spec.num_experts, ep_size=spec.ep_size, k=1,
            min_capacity=4, drop_tokens=False, use_rts=False,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.o_proj(attn)
        h = self.norm2(x)
        moe_out, aux, _ = self.moe(h)
        return x + self.ffn_out(torch.relu(self.ffn_in(h))) + moe_out, aux


class ZeroMoE(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.d_model)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.d_model)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        aux_total = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.lm_head(self.norm(x))
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, self.spec.vocab), tokens[:, 1:].reshape(-1)
        )
        return loss + 0.01 * aux_total


def muon_matrix_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """Every distinct matrix Muon orthogonalizes (each global expert once): both Muons agree.

    DeepSpeed tags every >= 2-D parameter whose name has no "embed"/"lm_head"; expertopt routes
    hidden matrices, the router (``gate.wg``) and experts to Muon: the same set here.
    """
    d = spec.d_model
    dense = [(d, d)] * 4 + [(spec.d_ff, d), (d, spec.d_ff), (spec.num_experts, d)]
    experts = [(spec.d_expert, d), (d, spec.d_expert)] * spec.num_experts
    return (dense + experts) * spec.layers


@dataclass(frozen=True)
class Case:
    """One engine: who builds the optimizer, ZeRO stage, extra ``zero_optimization`` keys."""

    label: str
    optimizer: str  # "ds_adamw", "ds_muon" or "expertopt_muon"
    stage: int
    zero: dict[str, Any] = field(default_factory=dict)
    timed: bool = False
    bf16: bool = False
    # expertopt's Newton-Schulz dtype, also the dtype results travel back in. bf16 pinned: the
    # recorded figures are bf16 replies, and "auto" computes in fp32 on a CPU without oneDNN bf16.
    ns_dtype: str = "bfloat16"
    spec: ModelSpec = ModelSpec()


def _config(case: Case) -> dict[str, Any]:
    if case.optimizer == "ds_adamw":
        optimizer = {
            "type": "AdamW",
            "params": {"lr": ADAMW_LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True},
        }
    elif case.optimizer == "ds_muon":
        optimizer = {
            "type": "Muon",
            "params": {
                "lr": LR, "adam_lr": ADAMW_LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                "ns_method": "standard", "torch_adam": True,
            },
        }  # fmt: skip
    else:
        optimizer = {
            "type": "Muon",
            "params": {"lr": LR, "adamw_lr": ADAMW_LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        }
        optimizer["params"]["ns_dtype"] = case.ns_dtype
    config = {
        "train_micro_batch_size_per_gpu": case.spec.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": optimizer,
        "zero_optimization": {"stage": case.stage, **case.zero},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case.bf16:
        config["bf16"] = {"enabled": True}
    return config


class _NSFlops:
    """Accumulates FLOPs of every call to the wrapped Newton-Schulz entry points while on."""

    def __init__(self) -> None:
        self.flops = 0
        self.calls = 0
        self.on = False
        self.seconds: float | None = None  # when a float: wall time inside the wrapped calls

    def wrap(self, fn):
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                if self.seconds is None:
                    return fn(*args, **kwargs)
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                self.seconds += time.perf_counter() - start
                return out
            counter = FlopCounterMode(display=False)
            with counter:
                out = fn(*args, **kwargs)
            self.flops += counter.get_total_flops()
            self.calls += 1
            return out

        return counted


def _install_flop_hooks(ns: _NSFlops) -> None:
    import deepspeed.runtime.zero.muon.original_muon as ds_muon

    import expertopt.distributed.step as eo_step
    import expertopt.updates.muon as eo_updates

    # stage_1_and_2 imports muon_update from the module at each call: patching the attribute works.
    ds_muon.muon_update = ns.wrap(ds_muon.muon_update)
    eo_step.orthogonalize_updates = ns.wrap(eo_step.orthogonalize_updates)
    eo_updates.orthogonalize_updates = ns.wrap(eo_updates.orthogonalize_updates)


def _build(case: Case) -> Any:
    import deepspeed

    import expertopt

    torch.manual_seed(0)
    model = ZeroMoE(case.spec)
    config = _config(case)
    if case.optimizer == "expertopt_muon":
        engine, *_ = expertopt.initialize(model=model, config=config)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _tokens(case: Case, rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randint(0, case.spec.vocab, (case.spec.batch, case.spec.seq), generator=generator)


def _train_step(engine: Any, tokens: torch.Tensor, counter: CommCounter | None) -> tuple[float, float, float]:
    """One iteration; returns (forward, backward, step) seconds on this rank."""
    t0 = time.perf_counter()
    if counter is not None:
        with counter.during("fwd"):
            loss = engine(tokens)
        t1 = time.perf_counter()
        with counter.during("bwd"):
            engine.backward(loss)
        t2 = time.perf_counter()
        with counter.during("step"):
            engine.step()
    else:
        loss = engine(tokens)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def _plan_summary(engine: Any) -> dict[str, int]:
    """expertopt's owner plan on this rank, from its layouts.

    ``sent``: Muon-matrix elements of this rank's partitions whose owner is another rank;
    ``wire``: the bytes the exchange must send for them (out in the partition's dtype, back in
    the reply dtype); ``flops``: Newton-Schulz FLOPs of the matrices this rank owns.
    """
    from expertopt.kernels import ns_flops

    optimizer = engine.basic_optimizer
    summary = dict.fromkeys(("held", "straddling", "sent", "wire", "flops"), 0)
    units = getattr(optimizer, "shard_units", [])  # expertopt's; DeepSpeed's Muon has none
    if not units:
        return summary
    ns_dtype = next(g["ns_dtype"] for g in optimizer.param_groups if g.get("use_muon"))
    for unit in units:
        layout, rank = unit.layout, unit.rank
        reply = unit.reply_dtype(unit.ns_method, ns_dtype, torch.zeros((), dtype=torch.float32))
        for index, matrix in enumerate(layout.matrices):
            held = matrix.held(rank)
            summary["held"] += held
            summary["straddling"] += held if len({p.rank for p in matrix.pieces}) > 1 else 0
            if unit.owners[index] != rank:
                summary["sent"] += held
                summary["wire"] += held * (4 + reply.itemsize)  # fp32 partitions out, reply back
            else:
                summary["flops"] += ns_flops((matrix.rows, matrix.cols), method="standard")
    return summary


def _flat_params(engine: Any) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])


def measure(rank: int, world_size: int, cases: list[Case], warmup: int, counted: int, rounds: int) -> dict:
    """Per-rank numbers for every case (see the module docstring); timed cases last, interleaved."""
    torch.compiler.set_stance("force_eager")  # DeepSpeed compiles muon_update; run it eagerly everywhere
    counter = CommCounter().install()
    ns = _NSFlops()
    _install_flop_hooks(ns)
    results: dict[str, Any] = {"cases": {}, "times": {}}
    engines: dict[str, tuple[Case, Any, int]] = {}
    references: dict[tuple, torch.Tensor] = {}
    for case in cases:
        try:
            engine = _build(case)
        except Exception as error:  # a configuration DeepSpeed rejects is a result, not a crash
            results["cases"][case.label] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            dist.barrier()
            continue
        step = 0
        for _ in range(warmup):
            _train_step(engine, _tokens(case, rank, step), None)
            step += 1
        counter.reset()
        ns.flops = ns.calls = 0
        ns.on = True
        for _ in range(counted):
            _train_step(engine, _tokens(case, rank, step), counter)
            step += 1
        ns.on = False
        # Same optimizer, stage, dtype and model under another comm config must train the same.
        params = _flat_params(engine)
        reference = references.setdefault(
            (case.optimizer, case.stage, case.bf16, case.ns_dtype, case.spec), params
        )
        zero = engine.optimizer
        groups = engine.basic_optimizer.param_groups
        results["cases"][case.label] = {
            "comm": {key: [v / counted for v in value] for key, value in counter.records.items()},
            "ns_flops": ns.flops / counted,
            "ns_calls": ns.calls / counted,
            "plan": _plan_summary(engine),
            "param_diff": (params - reference).abs().max().item(),
            "groups": [
                {
                    "numel": sum(p.numel() for p in zero.bit16_groups[i]),
                    "partition": int(zero.partition_size[i]),
                    "group_size": dist.get_world_size(zero.real_dp_process_group[i]),
                    "muon": bool(groups[i].get("use_muon", False)) and case.optimizer != "ds_adamw",
                    "moe": bool(groups[i].get("moe", False)),
                }
                for i in range(len(zero.bit16_groups))
            ],
        }
        if case.timed:
            engines[case.label] = (case, engine, step)
        else:
            del engine
    # Whole iterations, interleaved round by round over the timed cases; one warm-up round.
    # Also the time inside collectives and inside Newton-Schulz, summed over the timed rounds.
    results["inside"] = {label: {"ns": 0.0} for label in engines}
    for label in engines:
        results["times"][label] = []
    for r in range(rounds + 1):
        for label, (case, engine, step) in engines.items():
            dist.barrier()
            inside = results["inside"][label]
            counter.seconds, ns.seconds = (inside, 0.0) if r > 0 else (None, None)
            elapsed = _train_step(engine, _tokens(case, rank, step + r), None)
            if r > 0:
                inside["ns"] += ns.seconds
                results["times"][label].append(elapsed)
            counter.seconds = ns.seconds = None
    return results

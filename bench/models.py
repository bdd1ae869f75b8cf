"""Benchmark models for the optimizer-step benchmark: named parameters with fixed gradients.

No forward pass: an optimizer step only reads ``param.grad``, so a model here is an ordered
``{name: nn.Parameter}`` dict whose gradients are drawn once from a seeded generator. Building
the same spec twice gives bitwise-identical parameters and gradients, so every optimizer in a
comparison starts from the same point on its own copy (optimizers mutate parameters, and
DeepSpeed's Muon also overwrites ``p.grad`` in place with the Nesterov blend).

Two shapes of model:

- :class:`MoESpec`: per layer q, k, v, o ``[d, d]``, a router ``[E, d]``, stacked experts
  ``w_in [E, d_ff, d]`` and ``w_out [E, d, d_ff]``, two norms ``[d]``; plus embedding and head
  ``[V, d]``. Muon for the matrices and experts, AdamW for embedding, head and norms.
- :class:`DenseSpec`: per layer q, k, v, o ``[d, d]``, ``mlp_in [4d, d]``, ``mlp_out [d, 4d]``;
  every parameter is a 2-D matrix stepped by Muon (what ``torch.optim.Muon`` accepts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DenseSpec",
    "MoESpec",
    "build_dense",
    "build_moe",
    "deepspeed_groups",
    "describe",
    "expertopt_groups",
    "is_expert",
    "uses_muon",
]

# Same hyperparameters for every optimizer in a comparison (timings do not depend on them, but
# the FLOP counts and the parity of the work done do).
LR = 0.02
ADAMW_LR = 3e-4
WEIGHT_DECAY = 0.1
MOMENTUM = 0.95
BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """Sizes of the MoE-shaped model (fine-grained experts: d_ff < d, many experts)."""

    layers: int = 4
    d_model: int = 128
    num_experts: int = 32
    d_ff: int = 64
    vocab: int = 4096


@dataclass(frozen=True, kw_only=True)
class DenseSpec:
    """Sizes of the dense 2-D model (all Muon)."""

    layers: int = 8
    d_model: int = 128
    mlp_ratio: int = 4


def moe_shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    d, e, f, v = spec.d_model, spec.num_experts, spec.d_ff, spec.vocab
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, d)}
    for i in range(spec.layers):
        p = f"layers.{i}."
        shapes |= {p + "attn_norm.weight": (d,)}
        shapes |= {p + f"attn.{w}.weight": (d, d) for w in ("q", "k", "v", "o")}
        shapes |= {
            p + "moe_norm.weight": (d,),
            p + "moe.router.weight": (e, d),
            p + "moe.experts.w_in": (e, f, d),
            p + "moe.experts.w_out": (e, d, f),
        }
    shapes["head.weight"] = (v, d)
    return shapes


def dense_shapes(spec: DenseSpec) -> dict[str, tuple[int, ...]]:
    d, h = spec.d_model, spec.mlp_ratio * spec.d_model
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(spec.layers):
        p = f"layers.{i}."
        shapes |= {p + f"attn.{w}.weight": (d, d) for w in ("q", "k", "v", "o")}
        shapes |= {p + "mlp.w_in.weight": (h, d), p + "mlp.w_out.weight": (d, h)}
    return shapes


def _materialize(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, nn.Parameter]:
    """Parameters ~ N(0, 1/fan_in) and gradients ~ N(0, 1e-3^2), all from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    params: dict[str, nn.Parameter] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            param = nn.Parameter(torch.ones(shape))
        else:
            param = nn.Parameter(torch.randn(shape, generator=generator) / shape[-1] ** 0.5)
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params[name] = param
    return params


def build_moe(spec: MoESpec = MoESpec(), seed: int = 0) -> dict[str, nn.Parameter]:
    """The MoE-shaped model: ``{name: parameter with .grad}`` in layer order."""
    return _materialize(moe_shapes(spec), seed)


def build_dense(spec: DenseSpec = DenseSpec(), seed: int = 0) -> dict[str, nn.Parameter]:
    """The dense model: ``{name: 2-D parameter with .grad}`` in layer order."""
    return _materialize(dense_shapes(spec), seed)


def is_expert(name: str) -> bool:
    return ".experts." in name


def uses_muon(name: str, param: torch.Tensor) -> bool:
    """Muon for hidden matrices, the router and experts; AdamW for embedding, head and vectors."""
    return param.ndim >= 2 and not name.startswith(("embed.", "head."))


def _split(params: dict[str, nn.Parameter]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    kinds: dict[str, list[tuple[str, nn.Parameter]]] = {
        "muon": [],
        "expert_muon": [],
        "adamw": [],
        "adamw_no_decay": [],
    }
    for name, param in params.items():
        if uses_muon(name, param):
            kind = "expert_muon" if is_expert(name) else "muon"
        else:
            kind = "adamw" if param.ndim >= 2 else "adamw_no_decay"
        kinds[kind].append((name, param))
    return kinds


def expertopt_groups(params: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
    """Param groups for ``expertopt.Muon``: dense Muon, expert Muon (``expert=True``), AdamW, AdamW no decay.

    Each group steps with lr ``LR * lr_mult``; the AdamW groups carry ``ADAMW_LR / LR`` as their
    multiplier, as ``expertopt.build_param_groups`` does.
    """
    options = {
        "muon": {"use_muon": True, "expert": False, "weight_decay": WEIGHT_DECAY},
        "expert_muon": {"use_muon": True, "expert": True, "weight_decay": WEIGHT_DECAY},
        "adamw": {"use_muon": False, "lr_mult": ADAMW_LR / LR, "weight_decay": WEIGHT_DECAY},
        "adamw_no_decay": {"use_muon": False, "lr_mult": ADAMW_LR / LR, "weight_decay": 0.0},
    }
    groups = []
    for kind, named in _split(params).items():
        if named:
            names, tensors = zip(*named, strict=True)
            groups.append(
                {"name": kind, "params": list(tensors), "param_names": list(names), **options[kind]}
            )
    return groups


def deepspeed_groups(params: dict[str, nn.Parameter], ns_method: str) -> list[dict[str, Any]]:
    """The same split for DeepSpeed's ``SingleDeviceMuonWithAuxAdam``.

    ``p.is_expert_group`` is set on the expert stacks, DeepSpeed's documented way to mark them.
    In deepspeed 0.19.8 ``muon_update`` treats a 3-D tensor the same with or without the flag:
    both branches run its batched Newton-Schulz (one Frobenius norm per ``[m, n]`` matrix) and
    scale by ``sqrt(max(1, m/n))`` of the last two dims; only 4-D tensors are flattened, and only
    without it. So DeepSpeed does the same per-expert math as ``expertopt.Muon(expert=True)``.
    """
    kinds = _split(params)
    for _, param in kinds["expert_muon"]:
        param.is_expert_group = True
    muon = [p for kind in ("muon", "expert_muon") for _, p in kinds[kind]]
    common = {"betas": BETAS, "eps": ADAMW_EPS, "lr": ADAMW_LR}
    groups: list[dict[str, Any]] = [
        {
            "params": muon,
            "use_muon": True,
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "ns_method": ns_method,
        }
    ]
    if kinds["adamw"]:
        groups.append(
            {
                "params": [p for _, p in kinds["adamw"]],
                "use_muon": False,
                "weight_decay": WEIGHT_DECAY,
                **common,
            }
        )
    if kinds["adamw_no_decay"]:
        groups.append(
            {
                "params": [p for _, p in kinds["adamw_no_decay"]],
                "use_muon": False,
                "weight_decay": 0.0,
                **common,
            }
        )
    return groups


def describe(params: dict[str, nn.Parameter]) -> str:
    """One line per distinct (shape, optimizer kind): count and total elements, for the docs."""
    rows: dict[tuple[tuple[int, ...], str], int] = {}
    for kind, named in _split(params).items():
        for _, param in named:
            key = (tuple(param.shape), kind)
            rows[key] = rows.get(key, 0) + 1
    total = sum(p.numel() for p in params.values())
    lines = [f"{count} x {list(shape)} ({kind})" for (shape, kind), count in rows.items()]
    return "; ".join(lines) + f"; {total / 1e6:.2f}M parameters"

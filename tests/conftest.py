"""Shared fixtures: small models whose parameters cover every routing case."""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator at import; these machines have no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from torch import nn


class ToyMoE(nn.Module):
    """Embedding, attention projections, router, 3-D stacked experts, per-expert ModuleList experts,
    norm, biases and an untied head: every kind of parameter build_param_groups routes."""

    def __init__(self, vocab: int = 32, d: int = 16, n_experts: int = 4, d_ff: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=True)
        self.router = nn.Linear(d, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_ff, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(n_experts, d, d_ff) / d_ff**0.5)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n_experts))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.o_proj(torch.tanh(self.q_proj(self.norm(x))))
        gates = self.router(x).softmax(-1)  # [B, T, E]
        hidden = torch.einsum("btd,efd->btef", x, self.w_in).relu()
        stacked = torch.einsum("btef,edf->bted", hidden, self.w_out)
        listed = torch.stack([expert(x) for expert in self.experts], dim=-2)
        x = x + torch.einsum("bte,bted->btd", gates, stacked + listed)
        return self.lm_head(x)


def toy_loss(model: nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (4, 8), generator=generator)
    logits = model(tokens)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))


@pytest.fixture
def toy_moe() -> ToyMoE:
    torch.manual_seed(0)
    return ToyMoE()


# Attention-style heads for ToyMoE's two [16, 16] projections: q as 4 heads of [4, 16], o as 2 of
# [8, 16]. Across 2-4 ZeRO ranks some heads are cut at partition boundaries (they travel to their
# owners in pieces like any matrix), others land whole on one rank.
TOY_HEADS = {"q_proj.weight": 4, "o_proj.weight": 2}


def toy_head_groups(model: nn.Module) -> list[dict]:
    """``model_parameters`` for ``deepspeed.initialize`` as a user passes ``num_heads``: one group
    per headed weight, the rest in one group."""
    named = dict(model.named_parameters())
    heads = [{"params": [named[name]], "num_heads": count} for name, count in TOY_HEADS.items()]
    rest = [p for name, p in named.items() if name not in TOY_HEADS]
    return [*heads, {"params": rest}]


def toy_head_rules() -> list:
    """The same heads as router rules, for single-process references built with build_param_groups."""
    from expertopt.param_groups import Rule

    return [Rule(f"^{name}$".replace(".", r"\."), {"num_heads": count}) for name, count in TOY_HEADS.items()]


def assert_compiled_step_matches_eager(build) -> None:
    """Two optimizers from ``build()`` step once eagerly; then one steps through
    ``torch.compile(optimizer.step, fullgraph=True)`` (a graph break fails) and the other eagerly
    again: every parameter must come out bit-identical."""
    optimizer, twin = build(), build()
    optimizer.step()
    twin.step()
    torch._dynamo.reset()
    torch.compile(optimizer.step, fullgraph=True, backend="eager")()
    twin.step()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)

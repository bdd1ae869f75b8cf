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

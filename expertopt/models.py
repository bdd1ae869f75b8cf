"""A tiny MoE transformer and a synthetic task, for the demo, tests and benchmarks.

The model has one parameter of every kind :func:`expertopt.build_param_groups` routes: token and
position embeddings, q/k/v/o attention matrices, a router (``blocks.<i>.moe.router``), stacked
experts ``blocks.<i>.moe.experts.w_in [E, d_ff, d]`` / ``w_out [E, d, d_ff]``, RMSNorm weights and
an untied ``lm_head``. Experts run densely (every expert on every token, weighted by sparse top-k
gates): exact, differentiable and simple, and cheap enough at these sizes.

The task is a Fibonacci sequence modulo ``vocab``: two random tokens, then
``x[t] = (x[t-1] + x[t-2]) % vocab``. Everything after the first two tokens is predictable, so
the loss can fall from ``log(vocab)`` towards zero, but only through attention to earlier positions
(the two previous ones plus an addition table, or a copy from one Pisano period back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["IGNORE_INDEX", "TinyMoE", "TinyMoEConfig", "make_batch"]

# Targets that no rule determines (the two random seed tokens); cross_entropy skips them.
IGNORE_INDEX = -100


@dataclass(kw_only=True, slots=True)
class TinyMoEConfig:
    """Sizes of :class:`TinyMoE`; the defaults train in seconds on a laptop CPU."""

    vocab: int = 16
    """Vocabulary size, also the modulus of the synthetic task."""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 4
    d_ff: int = 64
    """Hidden width of each expert."""
    top_k: int = 2
    """Experts each token is routed to."""
    seq_len: int = 32
    """Input length; :func:`make_batch` generates ``seq_len + 1`` tokens per sequence."""

    def __post_init__(self) -> None:
        for key in ("vocab", "d_model", "n_layers", "n_heads", "n_experts", "d_ff", "top_k", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"TinyMoEConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.vocab < 2:
            raise ValueError(f"vocab={self.vocab} leaves nothing to predict; use vocab >= 2")


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/o projections (each its own matrix)."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, d = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.n_heads, d // self.n_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, d))


class Experts(nn.Module):
    """``E`` two-layer GELU MLPs stored as stacked 3-D tensors (one Muon matrix batch each)."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        e, d, d_ff = config.n_experts, config.d_model, config.d_ff
        self.w_in = nn.Parameter(torch.randn(e, d_ff, d) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(e, d, d_ff) / math.sqrt(d_ff))

    def forward(self, x: Tensor, gates: Tensor) -> Tensor:
        """``x [N, d]``, ``gates [N, E]`` (zero off the top-k) -> gate-weighted expert sum ``[N, d]``."""
        hidden = F.gelu(torch.einsum("nd,efd->nef", x, self.w_in))
        # Gating the hidden units first makes the output one contraction over (expert, unit).
        return torch.einsum("nef,edf->nd", hidden * gates.unsqueeze(-1), self.w_out)


class MoE(nn.Module):
    """Top-k router plus experts; gates are the softmax over each token's k largest logits."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        gates = route_top_k(self.router(tokens), self.top_k)
        return self.experts(tokens, gates).view_as(x)


def route_top_k(logits: Tensor, k: int) -> Tensor:
    """Dense ``[N, E]`` gates: softmax over the top-k logits, zero elsewhere (Mixtral's routing).

    The scatter is differentiable in the selected logits, so the router learns through the gates.
    """
    top_logits, top_ids = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top_ids, top_logits.softmax(dim=-1))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then the MoE feed-forward."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.moe_norm = nn.RMSNorm(config.d_model)
        self.moe = MoE(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.moe(self.moe_norm(x))


class TinyMoE(nn.Module):
    """Decoder-only MoE transformer: ``tokens [B, T] -> logits [B, T, vocab]``.

    Initialization draws only from torch's global generator, so ``torch.manual_seed`` fixes it.
    """

    def __init__(self, config: TinyMoEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TinyMoEConfig()
        self.tok_emb = nn.Embedding(config.vocab, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False)
        self._scale_residual_outputs()

    def _scale_residual_outputs(self) -> None:
        """Shrink the matrices that write into the residual stream by ``1/sqrt(2 * n_layers)``
        (GPT-2's rule), so the stream's scale does not grow with depth at init."""
        scale = 1.0 / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for block in self.blocks:
                block.attn.o_proj.weight.mul_(scale)
                block.moe.experts.w_out.mul_(scale)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[-1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds TinyMoEConfig.seq_len={self.config.seq_len}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the targets that are not :data:`IGNORE_INDEX`."""
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def make_batch(
    config: TinyMoEConfig, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, each ``[batch_size, seq_len]`` int64, of the Fibonacci-mod-vocab task.

    ``targets`` is ``inputs`` shifted by one; the target of position 0 (the random second seed
    token) is :data:`IGNORE_INDEX`, so a perfect model reaches zero loss.
    """
    length = config.seq_len + 1
    sequences = torch.empty(batch_size, length, dtype=torch.long)
    sequences[:, :2] = torch.randint(0, config.vocab, (batch_size, 2), generator=generator)
    for t in range(2, length):
        sequences[:, t] = (sequences[:, t - 1] + sequences[:, t - 2]) % config.vocab
    targets = sequences[:, 1:].clone()
    targets[:, 0] = IGNORE_INDEX
    return sequences[:, :-1], targets

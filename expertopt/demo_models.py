"""Tiny transformers MoE models for the demo, built from configs in code (no hub download).

Each entry names the transformers architecture and its DeepSpeed AutoEP preset, so the demo can
shard its experts with ``"expert_parallel": {"autoep_size": K, "preset_model": ...}``. The sizes
keep a step at a few tens of milliseconds per rank on one CPU thread while leaving every kind of
parameter in place: embeddings, attention matrices (GQA, so k/v are not square), router, fused
3-D experts ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, norms and an untied head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from expertopt.demo_data import VOCAB_SIZE

__all__ = ["DEMO_MODELS", "DemoModel", "build_model"]


@dataclass(frozen=True)
class DemoModel:
    """A transformers MoE architecture: config and model class names, sizes, AutoEP preset."""

    config_class: str
    model_class: str
    num_experts_key: str
    autoep_preset: str
    sizes: dict[str, Any]

    @property
    def num_experts(self) -> int:
        return int(self.sizes[self.num_experts_key])


_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

DEMO_MODELS = {
    "qwen3_moe": DemoModel(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts", "qwen3_moe",
        {**_COMMON, "num_experts": 8, "moe_intermediate_size": 64, "norm_topk_prob": True},
    ),
    "mixtral": DemoModel(
        "MixtralConfig", "MixtralForCausalLM", "num_local_experts", "mixtral",
        {**_COMMON, "num_local_experts": 8, "intermediate_size": 64},
    ),
}  # fmt: skip


def build_model(name: str, max_length: int) -> nn.Module:
    """A freshly initialized ``name`` model (draws from torch's global generator: seed it first)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; choose one of {sorted(DEMO_MODELS)}")
    import transformers

    spec = DEMO_MODELS[name]
    sizes = {**spec.sizes, "max_position_embeddings": max(spec.sizes["max_position_embeddings"], max_length)}
    config = getattr(transformers, spec.config_class)(**sizes)
    return getattr(transformers, spec.model_class)(config)

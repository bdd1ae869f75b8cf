"""Tiny transformers MoE models from configs in code (no hub), one per AutoEP preset we test."""

from __future__ import annotations

import torch

VOCAB = 64
HIDDEN = 16
EXPERTS = 4
EXPERT_HIDDEN = 8

__all__ = ["EXPERTS", "PRESETS", "VOCAB", "autoep_block", "tiny_moe"]

# AutoEP preset name -> the transformers model it converts.
PRESETS = ("qwen3_moe", "mixtral", "deepseek_v3")


def _config(preset: str):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_experts_per_tok=2,
    )
    if preset == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=32,
            moe_intermediate_size=EXPERT_HIDDEN,
            head_dim=8,
            num_experts=EXPERTS,
        )
    if preset == "mixtral":
        return transformers.MixtralConfig(
            **common, intermediate_size=EXPERT_HIDDEN, num_local_experts=EXPERTS
        )
    if preset == "deepseek_v3":
        # first_k_dense_replace=0: the one layer is an MoE layer; one shared expert; plain top-k
        # over one expert group.
        return transformers.DeepseekV3Config(
            **common,
            intermediate_size=32,
            moe_intermediate_size=EXPERT_HIDDEN,
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
    raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")


def tiny_moe(preset: str, seed: int = 0, router_logits: bool = False) -> torch.nn.Module:
    """A one-layer causal LM of the family AutoEP's ``preset`` converts, fp32, in train mode."""
    import transformers

    config = _config(preset)
    config.output_router_logits = router_logits
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def autoep_block(preset: str, autoep_size: int) -> dict:
    """The ``"expert_parallel"`` block of a DeepSpeed config for ``preset``."""
    return {"enabled": True, "autoep_size": autoep_size, "preset_model": preset}

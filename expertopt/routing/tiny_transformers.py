"""Tiny transformers MoE models built from their configs in code (no hub): what ``python -m
expertopt groups --model`` shows and what the per-architecture tests and docs table route.

Sizes are chosen so that every expert dimension differs: hidden 32, expert intermediate 48,
dense intermediate 64, 4 experts (top-2), 2 layers, vocab 128, 4 heads without grouping (MLA
models need as many key/value heads as query heads). A ``[E, 2I, H]`` stack then reads
``[4, 96, 32]`` and its ``[E, in, out]`` transpose ``[4, 32, 96]``, so a layout mistake cannot hide
behind a square shape. Imports transformers only when called.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["TINY", "build_tiny_model", "moe_model_types", "tiny_config"]

HIDDEN, EXPERT_INTERMEDIATE, INTERMEDIATE, EXPERTS = 32, 48, 64, 4
# Config fields (by the names transformers' configs use) set to small values where a config has them.
TINY: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": HIDDEN, "d_model": HIDDEN, "num_hidden_layers": 2,
    "num_layers": 2, "n_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
    "intermediate_size": INTERMEDIATE, "moe_intermediate_size": EXPERT_INTERMEDIATE,
    "expert_ffn_hidden_size": EXPERT_INTERMEDIATE, "ffn_hidden_size": INTERMEDIATE,
    "shared_expert_intermediate_size": INTERMEDIATE, "shared_intermediate_size": INTERMEDIATE,
    "moe_shared_expert_intermediate_size": INTERMEDIATE, "shared_experts_intermediate_size": INTERMEDIATE,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "top_k_experts": 2,
    "n_shared_experts": 1, "max_position_embeddings": 64, "kv_lora_rank": 16, "q_lora_rank": 16,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "linear_num_heads": 2, "linear_head_dim": 8, "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8, "zero_expert_num": 0, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_ffn_dim": INTERMEDIATE, "decoder_ffn_dim": INTERMEDIATE, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "d_ff": INTERMEDIATE, "d_kv": 8, "num_heads": 4, "num_decoder_layers": 2,
    "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "mamba_d_state": 8,
    "index_n_heads": 2, "index_head_dim": 8, "o_lora_rank": 8, "moe_latent_size": None,
    "router_hidden_size": 32, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_head_dim": 8,
    "moe_hidden_size": HIDDEN, "unpadded_vocab_size": 128, "d_rel": 8,
    "n_heads": 4,
}  # fmt: skip
# Nested or per-architecture settings the generic table cannot express.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": EXPERT_INTERMEDIATE, "moe_num_experts": EXPERTS, "moe_top_k": 2},
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    "zaya": {"num_experts_per_tok": 1},
    # Architectures whose default layer plan leaves two layers dense: ask for MoE layers.
    "doge": {"is_moe": True},
    "flint": {"decoder_sparse_step": 1},
    "gemma4_text": {"enable_moe_block": True},
    "nllb-moe": {"encoder_sparse_step": 1, "decoder_sparse_step": 1},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "step3p5": {"mlp_layer_types": ["sparse", "sparse"], "sliding_window": 8},
    "mimo_v2_flash": {"num_key_value_heads": 2},
    "longcat_flash": {"moe_topk": 2},
}
# Config fields that mark a mixture of experts.
EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose config declares routed experts.

    Config sources are scanned as text first, so only the few dozen candidate modules are
    imported (importing all ~450 config modules costs seconds); the signature then decides.
    """
    import importlib.util

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    pattern = re.compile(r"^\s+(" + "|".join(EXPERT_FIELDS) + r")\s*[:=]", re.MULTILINE)
    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.configuration_{module}")
        if spec is None or spec.origin is None or not pattern.search(Path(spec.origin).read_text()):
            continue
        fields = set(inspect.signature(CONFIG_MAPPING[model_type].__init__).parameters)
        if fields & set(EXPERT_FIELDS):
            found.append(model_type)
    return sorted(found)


def tiny_config(model_type: str) -> Any:
    """The config class of ``model_type`` with every :data:`TINY` field it accepts."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model type {model_type!r}; see transformers.CONFIG_MAPPING for the names")
    config_class = CONFIG_MAPPING[model_type]
    fields = inspect.signature(config_class.__init__).parameters
    kwargs = {key: value for key, value in TINY.items() if key in fields}
    kwargs.update(OVERRIDES.get(model_type, {}))
    return config_class(**kwargs)


def build_tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A freshly initialized tiny model of ``model_type``: the causal LM where transformers maps
    one, else the base model (multimodal text towers are found by their config class)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_config(config)
    if model_type in MODEL_MAPPING_NAMES:
        return AutoModel.from_config(config)
    return _model_class_of(config)(config)


def _model_class_of(config: Any) -> type[nn.Module]:
    from transformers import PreTrainedModel

    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, PreTrainedModel)
        and getattr(value, "config_class", None) is type(config)
    ]
    if not classes:
        raise ValueError(f"no model class in {module.__name__} takes a {type(config).__name__}")
    return min(classes, key=lambda c: ("CausalLM" not in c.__name__, c.__name__))

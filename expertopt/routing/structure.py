"""What a parameter *is*, read from the model's structure: the default routing.

Structural facts come first: module types (embeddings, norms, convolutions), what transformers
declares (``get_input_embeddings`` / ``get_output_embeddings``, expert modules and their
``is_transposed`` flag), DeepSpeed / AutoEP expert tags. Names are the fallback: router module
names (``router``, ``gate``, ``shared_expert_gate``), head names, SSM parameter names. Nothing here
depends on transformers being installed: classes are recognized by attributes and names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = [
    "HEAD_NAMES",
    "ROLES",
    "ROUTER_NAMES",
    "SSM_NAMES",
    "ModelFacts",
    "Route",
    "classify",
    "is_expert_param",
]

# Module-name components that mark an MoE router (Mixtral/Qwen/DeepSeek call it "gate"; JetMoE
# and DBRX "router.layer", Hunyuan "gate.wg", Gemma-4 "router.proj", LongCat "router.classifier",
# Doge "router_gate").
ROUTER_NAMES = ("router", "gate", "router_gate", "shared_expert_gate")
HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")
# State-space parameters (Mamba, gated delta nets): decay rates, skip and dt bias, AdamW without decay.
SSM_NAMES = ("A_log", "D", "dt_bias")
# Per-expert modules in a container named "experts": "...experts.3.w1.weight", "...experts.expert_0.wi.weight".
EXPERT_PATTERN = r"(^|\.)experts\.\d+\."
# transformers expert classes that store their matrices without declaring it (no is_transposed):
# class name -> {parameter: (matrix_layout, rows hold all experts: [E*I, H])}.
UNDECLARED_EXPERT_LAYOUTS: dict[str, dict[str, tuple[str, bool]]] = {
    "Llama4TextExperts": {"gate_up_proj": ("in_out", False), "down_proj": ("in_out", False)},
    # DBRX: x @ w1[e].T and x @ v1[e].T, then h @ w2[e] with w2[e] of shape [I, H]: input-major.
    "DbrxExpertGLU": {"w1": ("out_in", True), "v1": ("out_in", True), "w2": ("in_out", True)},
}
_EXPERT_COUNT_ATTRS = ("num_experts", "moe_num_experts", "num_local_experts", "num_routed_experts")

ROLES = {
    "embedding": "input embedding (incl. per-layer embeddings): AdamW",
    "head": "output embedding / head, tied or not: AdamW",
    "norm": "norm weight: AdamW, no decay",
    "bias": "bias (incl. expert biases [E, n]): AdamW, no decay",
    "vector": "other 1-D / scalar parameter: AdamW, no decay",
    "ssm": "state-space parameter (A_log, D, dt_bias): AdamW, no decay",
    "depthwise_conv": "depthwise convolution [C, 1, K]: AdamW",
    "conv": "convolution [out, in, *k], flattened to [out, in*k]: Muon",
    "router": "MoE router / gate: Muon, or AdamW with router='adamw'",
    "expert": "routed expert matrix (stacked, listed or DeepSpeed/AutoEP-tagged): Muon",
    "stack": "3-D+ stack of dense matrices (e.g. shared experts [S, I, H]): Muon per matrix",
    "matrix": "hidden matrix: Muon",
}


@dataclass(frozen=True, slots=True)
class Route:
    """Where one parameter goes by default, and why (``role``, a key of :data:`ROLES`)."""

    role: str
    use_muon: bool
    decay: bool
    expert: bool = False
    matrix_layout: str = "out_in"
    row_blocks: int | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What the model declares, gathered once: embedding and head weights (by id), whether it is a
    transformers model (which declares its experts, so stray 3-D tensors are not guessed to be)."""

    embedding_ids: frozenset[int]
    head_ids: frozenset[int]
    declares_experts: bool

    @classmethod
    def of(cls, model: nn.Module) -> ModelFacts:
        modules = list(model.modules())
        embeddings = {id(m.weight) for m in modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        heads: set[int] = set()
        for module in modules:
            for getter, ids in (("get_input_embeddings", embeddings), ("get_output_embeddings", heads)):
                found = _call_quietly(module, getter)
                if isinstance(getattr(found, "weight", None), Tensor):
                    ids.add(id(found.weight))
        transformers_model = any(c.__name__ == "PreTrainedModel" for m in modules for c in type(m).__mro__)
        return cls(frozenset(embeddings), frozenset(heads - embeddings), transformers_model)


def _call_quietly(module: nn.Module, getter: str) -> object:
    method = getattr(module, getter, None)
    if not callable(method):
        return None
    try:
        return method()
    except (NotImplementedError, AttributeError, TypeError):  # declared but not implemented
        return None


def _is_norm(module: nn.Module, module_path: str) -> bool:
    """Norm layers by type (torch's, transformers' ``*RMSNorm`` classes), else by module name."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.Linear, nn.modules.conv._ConvNd)):
        return False
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    named = "norm" in type(module).__name__.lower() or "norm" in module_path.rpartition(".")[2].lower()
    return isinstance(module, norms) or named


def _is_expert_container(module: nn.Module, module_path: str) -> bool:
    """A module holding stacked routed experts: transformers' ``*Experts`` classes and DBRX's
    ExpertGLU. Shared experts (``shared_experts``, ``shared_expert``: always active) are dense,
    told apart by their place, not their class (GraniteMoeShared's routed experts are
    ``GraniteMoeSharedExperts``)."""
    return "Expert" in type(module).__name__ and not module_path.rpartition(".")[2].startswith("shared")


def _expert_count(module: nn.Module) -> int | None:
    for attr in _EXPERT_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _stacked_expert_layout(module: nn.Module, attr: str, param: Tensor) -> tuple[str, int | None] | None:
    """(matrix_layout, row_blocks) of a tensor of an expert container; None if it is no expert tensor."""
    declared = UNDECLARED_EXPERT_LAYOUTS.get(type(module).__name__, {}).get(attr)
    if declared is not None:
        layout, rows_hold_experts = declared
        return layout, (_expert_count(module) if rows_hold_experts and param.ndim == 2 else None)
    layout = "in_out" if getattr(module, "is_transposed", False) is True else "out_in"
    count = _expert_count(module)
    if param.ndim >= 3 or (param.ndim >= 1 and count is not None and param.shape[0] == count):
        return layout, None
    return None


def _listed_expert(model: nn.Module, module_path: str) -> bool:
    """Inside one expert of a ModuleList/ModuleDict named ``experts`` (Switch, NLLB, older models)."""
    parts = module_path.split(".")
    for depth, part in enumerate(parts[:-1]):
        if part == "experts":
            container = model.get_submodule(".".join(parts[: depth + 1]))
            if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
                return True
    return False


def is_expert_param(name: str, param: Tensor, module: nn.Module | None = None) -> bool:
    """Whether a parameter belongs to routed experts, from its tags, its module and its name.

    Recognized: DeepSpeed MoE experts (``allreduce=False``), AutoEP-tagged tensors, tensors of
    expert classes (``*Experts``, not ``*SharedExperts``), per-expert modules in an ``experts``
    list, and (for models that declare nothing) stacked 3-D+ tensors that are not convolutions.
    """
    if getattr(param, "allreduce", True) is False:
        return True
    if getattr(param, "ds_zero_placement_family", None) == "autoep_expert" or getattr(
        param, "is_expert_group", False
    ):
        return True
    if module is not None and _is_expert_container(module, name.rpartition(".")[0]):
        return _stacked_expert_layout(module, name.rpartition(".")[2], param) is not None
    if param.ndim >= 3 and not isinstance(module, nn.modules.conv._ConvNd) and "shared" not in name:
        return True
    return re.search(EXPERT_PATTERN, name) is not None


def _expert_route(
    model: nn.Module, name: str, param: Tensor, module: nn.Module, facts: ModelFacts
) -> tuple[bool, str, int | None]:
    """(is expert, matrix_layout, row_blocks) for one parameter."""
    module_path, _, attr = name.rpartition(".")
    if _is_expert_container(module, module_path):
        layout = _stacked_expert_layout(module, attr, param)
        if layout is not None:
            return True, *layout
    tagged = (
        getattr(param, "allreduce", True) is False
        or getattr(param, "ds_zero_placement_family", None) == "autoep_expert"
        or getattr(param, "is_expert_group", False)
    )
    if tagged or _listed_expert(model, module_path) or re.search(EXPERT_PATTERN, name):
        return True, "out_in", None
    stray_stack = param.ndim >= 3 and not isinstance(module, nn.modules.conv._ConvNd)
    if stray_stack and not facts.declares_experts and "shared" not in name:
        return True, "out_in", None  # a plain torch model's [E, out, in] tensor (no declarations to read)
    return False, "out_in", None


def _is_router(model: nn.Module, module_path: str) -> bool:
    parts = module_path.split(".") if module_path else []
    if any(part in ROUTER_NAMES for part in parts):
        return True
    return any(
        "Router" in type(model.get_submodule(".".join(parts[: depth + 1]))).__name__
        for depth in range(len(parts))
    )


def classify(
    model: nn.Module,
    name: str,
    param: Tensor,
    facts: ModelFacts,
    *,
    router: str = "muon",
    head_names: Sequence[str] = HEAD_NAMES,
) -> Route:
    """The default :class:`Route` of parameter ``name``: structure first, names as fallback."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    expert, layout, row_blocks = _expert_route(model, name, param, module, facts)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or id(param) in facts.embedding_ids:
        return Route("embedding", use_muon=False, decay=True)
    if id(param) in facts.head_ids:
        return Route("head", use_muon=False, decay=True)
    if _is_norm(module, module_path):
        return Route("norm", use_muon=False, decay=False)
    if attr in SSM_NAMES or getattr(param, "_no_weight_decay", False):
        return Route("ssm", use_muon=False, decay=False, expert=expert)
    if attr.endswith("bias"):
        return Route("bias", use_muon=False, decay=False, expert=expert)
    per_expert_vectors = (
        expert and _is_expert_container(module, module_path) and param.ndim == 2 and row_blocks is None
    )
    if param.ndim < 2 or per_expert_vectors:  # e.g. per-expert scales [E, n]: no matrices to orthogonalize
        return Route("vector", use_muon=False, decay=False, expert=expert)
    if isinstance(module, nn.modules.conv._ConvNd):
        if param.shape[1] == 1:
            return Route("depthwise_conv", use_muon=False, decay=True, expert=expert)
        return Route("conv", use_muon=True, decay=True, expert=expert, matrix_layout="flatten")
    if _is_router(model, module_path):
        return Route("router", use_muon=router == "muon", decay=True)
    if module_path.rpartition(".")[2] in head_names and not expert:
        return Route("head", use_muon=False, decay=True)
    if expert:
        return Route(
            "expert", use_muon=True, decay=True, expert=True, matrix_layout=layout, row_blocks=row_blocks
        )
    return Route("stack" if param.ndim >= 3 else "matrix", use_muon=True, decay=True)

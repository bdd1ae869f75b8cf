"""Scheduler-ready param groups for MoE models: which parameters get Muon, which are experts.

Defaults follow the Moonlight / Kimi recipes: Muon for hidden matrices, the router and expert
tensors; AdamW for embeddings and the output head (tied or not); AdamW without weight decay for
norms, biases and scalars. Every group carries the same scheduled ``lr`` (the Muon lr) and keeps
its ratio in ``lr_mult`` so schedulers that write one scalar into every group keep the split (F2).

Ordered :class:`Rule` overrides work like torchtitan's ``ParamGroupConfig``: the first rule that
matches a parameter wins, a rule that matches nothing is an error, and every trainable parameter
lands in exactly one group (no silent misrouting of an embedding to Muon or an expert to AdamW).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

__all__ = ["Rule", "build_param_groups", "is_expert_param"]

# Module-name components that mark an MoE router (Mixtral/Qwen/DeepSeek call it "gate").
ROUTER_NAMES = ("router", "gate")
HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score")
# A per-expert ModuleList: "...experts.3.w1.weight".
EXPERT_PATTERN = r"(^|\.)experts\.\d+\."
RULE_KEYS = {"use_muon", "weight_decay", "lr_mult", "num_heads", "expert", "name"}


@dataclass(frozen=True)
class Rule:
    """Route the parameters ``match`` selects into a group of their own.

    ``match`` is a regex searched in the parameter's fully qualified name, or a predicate
    ``(name, param) -> bool``. ``options`` sets group keys: ``use_muon``, ``weight_decay``,
    ``lr_mult`` (relative to the scheduled lr), ``num_heads``, ``expert``, ``name``.
    """

    match: str | Callable[[str, Tensor], bool]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.options) - RULE_KEYS
        if unknown:
            raise ValueError(
                f"Rule({self.match!r}) has unknown options {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}"
            )

    def matches(self, name: str, param: Tensor) -> bool:
        if callable(self.match):
            return bool(self.match(name, param))
        return re.search(self.match, name) is not None


def is_expert_param(name: str, param: Tensor, module: nn.Module | None = None) -> bool:
    """Whether a parameter belongs to experts.

    Recognized: DeepSpeed MoE experts (``allreduce=False``), AutoEP-tagged tensors, stacked 3-D+
    tensors that are not convolution weights, and per-expert matrices in an ``experts`` ModuleList.
    """
    if getattr(param, "allreduce", True) is False:
        return True
    if getattr(param, "ds_zero_placement_family", None) == "autoep_expert" or getattr(
        param, "is_expert_group", False
    ):
        return True
    if param.ndim >= 3 and not isinstance(module, nn.modules.conv._ConvNd):
        return True
    return re.search(EXPERT_PATTERN, name) is not None


def _module_of(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    module_name = name.rpartition(".")[0]
    return module_name, model.get_submodule(module_name)


def _default_kind(
    model: nn.Module,
    name: str,
    param: Tensor,
    router: str,
    head_names: Sequence[str],
    embedding_ids: set[int],
) -> tuple[bool, str]:
    """(use_muon, weight-decay class 'decay' or 'no_decay') for a parameter no rule matched."""
    module_name, module = _module_of(model, name)
    last = module_name.rpartition(".")[2]
    if param.ndim < 2 or name.endswith("bias") or "norm" in type(module).__name__.lower():
        return False, "no_decay"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or id(param) in embedding_ids:
        return False, "decay"
    if last in head_names:
        return False, "decay"
    if last in ROUTER_NAMES:
        return router == "muon", "decay"
    return True, "decay"


def build_param_groups(
    model: nn.Module,
    *,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.1,
    adamw_weight_decay: float | None = None,
    expert_lr_mult: float = 1.0,
    router: Literal["muon", "adamw"] = "muon",
    head_names: Sequence[str] = HEAD_NAMES,
    rules: Sequence[Rule] = (),
) -> list[dict[str, Any]]:
    """Build named, linked param groups for ``expertopt.Muon`` / ``MoEOptimizer``.

    Every group gets ``lr=lr`` (what schedulers drive) and ``lr_mult``: 1 for Muon groups,
    ``adamw_lr / lr`` for AdamW groups, times ``expert_lr_mult`` for expert groups. Expert groups
    carry ``expert=True`` and ``link`` = the name of the dense group of the same kind.
    Groups: ``muon``, ``adamw``, ``adamw_no_decay``, ``expert_muon``, ``expert_adamw(_no_decay)``
    and one per rule (named by the rule's ``name`` or ``rule<i>``); empty ones are left out.
    """
    if router not in ("muon", "adamw"):
        raise ValueError(f"router={router!r}: use 'muon' or 'adamw'")
    if lr <= 0 or adamw_lr < 0 or expert_lr_mult < 0:
        raise ValueError(
            f"need lr > 0, adamw_lr >= 0, expert_lr_mult >= 0; got {lr}, {adamw_lr}, {expert_lr_mult}"
        )
    adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    groups: dict[str, dict[str, Any]] = {}
    rule_hits = [0] * len(rules)

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = _module_of(model, name)[1]
        expert = is_expert_param(name, param, module)
        use_muon, decay = _default_kind(model, name, param, router, head_names, embedding_ids)
        options: dict[str, Any] = {}
        for index, rule in enumerate(rules):
            if rule.matches(name, param):
                rule_hits[index] += 1
                options = {"name": f"rule{index}", **rule.options}
                break
        expert = options.get("expert", expert)
        use_muon = options.get("use_muon", use_muon)
        kind = "muon" if use_muon else ("adamw" if decay == "decay" else "adamw_no_decay")
        group_name = options.get("name") or (f"expert_{kind}" if expert else kind)
        group = groups.get(group_name)
        if group is None:
            base_mult = 1.0 if use_muon else adamw_lr / lr
            group = groups[group_name] = {
                "name": group_name,
                "params": [],
                "param_names": [],
                "use_muon": use_muon,
                "expert": expert,
                "link": kind if expert else None,
                "lr": lr,
                "lr_mult": options.get("lr_mult", base_mult * (expert_lr_mult if expert else 1.0)),
                "weight_decay": options.get(
                    "weight_decay",
                    0.0 if kind == "adamw_no_decay" else (weight_decay if use_muon else adamw_weight_decay),
                ),
            }
            if "num_heads" in options:
                group["num_heads"] = options["num_heads"]
        elif group["use_muon"] != use_muon or group["expert"] != expert:
            raise ValueError(
                f"group {group_name!r} would mix Muon/AdamW or expert/dense parameters (at {name!r})"
            )
        group["params"].append(param)
        group["param_names"].append(name)

    unused = [repr(rules[i].match) for i, hits in enumerate(rule_hits) if hits == 0]
    if unused:
        raise ValueError(f"rules matched no trainable parameter: {', '.join(unused)}; fix or remove them")
    dense_names = {g["name"] for g in groups.values() if not g["expert"]}
    for group in groups.values():
        if group["link"] not in dense_names:
            group["link"] = None  # no dense group of that kind to follow
    return list(groups.values())

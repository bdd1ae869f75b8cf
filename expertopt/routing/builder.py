"""Scheduler-ready param groups for MoE models: which parameters get Muon, which are experts,
and how each matrix is stored.

Defaults follow the Moonlight / Kimi recipes: Muon for hidden matrices, the router and expert
tensors; AdamW for embeddings and the output head (tied or not); AdamW without weight decay for
norms, biases, state-space parameters and scalars (see :mod:`expertopt.routing.structure`). Every
group carries the same scheduled ``lr`` (the Muon lr) and keeps its ratio in ``lr_mult`` so
schedulers that write one scalar into every group keep the split (F2).

Muon groups also carry their matrices' layout, ``matrix_layout`` and ``row_blocks``, so it
travels with the group through ``MoEOptimizer``, DeepSpeed (which keeps group keys and flattens
each group) and the ZeRO layout code: one group per distinct layout. The layout sets each
matrix's true fan-out / fan-in for the lr scale, and splits 2-D expert stacks into experts.

Ordered :class:`Rule` overrides work like torchtitan's ``ParamGroupConfig``: the first rule that
matches a parameter wins, a rule that matches nothing is an error, and every trainable parameter
lands in exactly one group (no silent misrouting of an embedding to Muon or an expert to AdamW).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from expertopt.routing.rules import Rule
from expertopt.routing.structure import HEAD_NAMES, ModelFacts, Route, classify
from expertopt.updates.muon import matrix_view

__all__ = ["RoutedParam", "build_param_groups", "route_model"]

_LAYOUT_KEYS = ("matrix_layout", "row_blocks")


@dataclass(frozen=True, slots=True)
class RoutedParam:
    """One trainable parameter, its route (rules applied) and the rule that matched (if any)."""

    name: str
    param: Tensor
    route: Route
    rule: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """Optimizer family: "muon", "adamw" or "adamw_no_decay"."""
        if self.route.use_muon:
            return "muon"
        return "adamw" if self.route.decay else "adamw_no_decay"


def route_model(
    model: nn.Module,
    *,
    router: Literal["muon", "adamw"] = "muon",
    head_names: Sequence[str] = HEAD_NAMES,
    rules: Sequence[Rule] = (),
) -> list[RoutedParam]:
    """Route every trainable parameter: structural default, then the first matching rule."""
    if router not in ("muon", "adamw"):
        raise ValueError(f"router={router!r}: use 'muon' or 'adamw'")
    facts = ModelFacts.of(model)
    rule_hits = [0] * len(rules)
    routed = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        route = classify(model, name, param, facts, router=router, head_names=head_names)
        index = next((i for i, rule in enumerate(rules) if rule.matches(name, param)), None)
        options: dict[str, Any] = {}
        if index is not None:
            rule_hits[index] += 1
            options = rules[index].options
            route = _apply_rule(route, options)
        _check_layout(name, param, route, options)
        routed.append(RoutedParam(name, param, route, index, options))
    unused = [repr(rules[i].match) for i, hits in enumerate(rule_hits) if hits == 0]
    if unused:
        raise ValueError(f"rules matched no trainable parameter: {', '.join(unused)}; fix or remove them")
    return routed


def _apply_rule(route: Route, options: dict[str, Any]) -> Route:
    use_muon = options.get("use_muon", route.use_muon)
    changes = {key: options[key] for key in ("expert", *_LAYOUT_KEYS) if key in options}
    if use_muon and not route.use_muon and "matrix_layout" not in options:
        changes["matrix_layout"] = "out_in"  # e.g. a depthwise conv moved to Muon keeps no AdamW default
    return dataclasses.replace(route, role="rule", use_muon=use_muon, **changes)


def _check_layout(name: str, param: Tensor, route: Route, options: dict[str, Any]) -> None:
    """A layout must describe its tensor: raise naming the parameter and the fix."""
    declared = [key for key in (*_LAYOUT_KEYS, "num_heads") if options.get(key) is not None]
    if not route.use_muon:
        if declared:
            raise ValueError(
                f"parameter {name!r} (shape {tuple(param.shape)}) goes to AdamW, but its rule sets "
                f"{declared}: a matrix layout only applies to Muon parameters; drop {declared} from "
                "the rule or add use_muon=True to it (only for matrices)"
            )
        return
    try:
        matrix_view(
            torch.empty(param.shape, device="meta"),
            is_expert=route.expert,
            num_heads=options.get("num_heads"),
            matrix_layout=route.matrix_layout,
            row_blocks=route.row_blocks,
        )
    except ValueError as error:
        raise ValueError(
            f"parameter {name!r} (shape {tuple(param.shape)}) cannot take the layout its route gives it: "
            f"{error}. Fix the Rule that matches it (matrix_layout, row_blocks, num_heads, use_muon)"
        ) from None


def _group_name(routed: RoutedParam) -> str:
    if routed.options.get("name"):
        return routed.options["name"]
    if routed.rule is not None:
        return f"rule{routed.rule}"
    name = ("expert_" if routed.route.expert else "") + routed.kind
    if routed.route.use_muon:
        if routed.route.row_blocks is not None:
            name += f"_rows{routed.route.row_blocks}"
        if routed.route.matrix_layout != "out_in":
            name += f"_{routed.route.matrix_layout}"
    return name


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
    Groups: ``muon``, ``adamw``, ``adamw_no_decay``, ``expert_muon``, ``expert_adamw(_no_decay)``,
    Muon groups of other layouts suffixed ``_in_out`` / ``_flatten`` / ``_rows<E>``
    (e.g. ``expert_muon_in_out`` for gpt-oss experts), and one per rule (named by the rule's
    ``name`` or ``rule<i>``); empty ones are left out. See ``docs/routing.md``.
    """
    if lr <= 0 or adamw_lr < 0 or expert_lr_mult < 0:
        raise ValueError(
            f"need lr > 0, adamw_lr >= 0, expert_lr_mult >= 0; got {lr}, {adamw_lr}, {expert_lr_mult}"
        )
    adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    groups: dict[str, dict[str, Any]] = {}
    for routed in route_model(model, router=router, head_names=head_names, rules=rules):
        route, name = routed.route, _group_name(routed)
        group = groups.get(name)
        if group is None:
            base_mult = 1.0 if route.use_muon else adamw_lr / lr
            default_decay = weight_decay if route.use_muon else adamw_weight_decay
            group = groups[name] = {
                "name": name,
                "params": [],
                "param_names": [],
                "use_muon": route.use_muon,
                "expert": route.expert,
                "link": routed.kind if route.expert else None,
                "lr": lr,
                "lr_mult": routed.options.get(
                    "lr_mult", base_mult * (expert_lr_mult if route.expert else 1.0)
                ),
                "weight_decay": routed.options.get("weight_decay", default_decay if route.decay else 0.0),
            }
            if route.use_muon:
                group.update(matrix_layout=route.matrix_layout, row_blocks=route.row_blocks)
            if "num_heads" in routed.options:
                group["num_heads"] = routed.options["num_heads"]
        _check_same_group(group, routed)
        group["params"].append(routed.param)
        group["param_names"].append(routed.name)
    dense_names = {g["name"] for g in groups.values() if not g["expert"]}
    for group in groups.values():
        if group["link"] not in dense_names:
            group["link"] = None  # no dense group of that kind to follow
    return list(groups.values())


def _check_same_group(group: dict[str, Any], routed: RoutedParam) -> None:
    route = routed.route
    if group["use_muon"] != route.use_muon or group["expert"] != route.expert:
        raise ValueError(
            f"group {group['name']!r} would mix Muon/AdamW or expert/dense parameters (at {routed.name!r}); "
            "split the rule that names it, or set use_muon / expert in it"
        )
    if route.use_muon and (group["matrix_layout"], group["row_blocks"]) != (
        route.matrix_layout,
        route.row_blocks,
    ):
        raise ValueError(
            f"group {group['name']!r} would mix matrix layouts: {routed.name!r} is "
            f"{route.matrix_layout!r} with row_blocks={route.row_blocks}, the group "
            f"{group['matrix_layout']!r} with row_blocks={group['row_blocks']}; set matrix_layout / "
            "row_blocks in the rule, or split it so each group holds one layout"
        )

"""``model_parameters`` as ``deepspeed.initialize`` takes it, routed into Muon and AdamW groups.

DeepSpeed accepts ``None`` (the whole model), an iterable of parameters (``model.parameters()``
in every tutorial) or torch-style group dicts, and its own ``"type": "Muon"`` splits each group
into a Muon half and an AdamW half that keep the group's keys. expertopt does the same with its
router (:func:`expertopt.build_param_groups`): each incoming group is split along the router's
groups (Muon, AdamW, AdamW without decay, and their expert counterparts), every half keeps the
router's ``lr_mult`` and the incoming group's own keys win (``lr`` becomes the half's scheduled
lr, so the AdamW half steps at ``lr * lr_mult``), and a group with ``use_muon`` forces its
family. Parameters left out are not trained.

With AutoEP the modules are replaced inside ``deepspeed.initialize``, after the caller built
``model_parameters``. DeepSpeed 0.19.8 itself maps lists (and groups whose ``params`` are
lists) onto the replacements, each replacement joining the group of its sources, and reads a
lazy iterable such as ``model.parameters()`` only after the replacement. :func:`normalize`
puts every form into one of those two shapes before DeepSpeed sees it; anything that still
names a parameter the model no longer has is an error, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from expertopt.param_groups import Rule, build_param_groups, is_expert_param

__all__ = ["normalize", "route_model_parameters"]

# Keys the router decides; a group that sets them would contradict the split.
_ROUTER_KEYS = ("expert", "link", "param_names")


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def normalize(model_parameters: Any) -> Any:
    """What to hand ``deepspeed.initialize`` so it maps the parameters onto AutoEP replacements.

    A lazy iterator stays lazy (DeepSpeed reads it after the replacement); everything else
    becomes a fresh list of parameters or a fresh list of group dicts whose ``params`` are
    lists (DeepSpeed remaps those, in place, so the caller's own lists are left alone).
    """
    if model_parameters is None or isinstance(model_parameters, Iterator):
        return model_parameters
    items = [model_parameters] if isinstance(model_parameters, (Tensor, dict)) else list(model_parameters)
    groups = [{**item, "params": _as_list(item["params"])} for item in items if isinstance(item, dict)]
    loose = [item for item in items if not isinstance(item, dict)]
    if not groups:
        return loose
    return groups + ([{"params": loose}] if loose else [])


def _user_groups(model_parameters: Iterable[Any]) -> list[dict[str, Any]]:
    """DeepSpeed's list (parameters, group dicts, or both) as group dicts; loose parameters form
    one group, as in DeepSpeed's own Muon."""
    items = list(model_parameters)
    groups = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        if "params" not in item:
            raise ValueError(
                f'model_parameters group #{index} has no "params"; give each group its parameters'
            )
        clash = [key for key in _ROUTER_KEYS if key in item]
        if clash:
            raise ValueError(
                f"model_parameters group #{index} sets {clash}, which expertopt's router decides; remove "
                'them (force Muon or AdamW with "use_muon": true / false)'
            )
        groups.append({**item, "params": _as_list(item["params"])})
    loose = [item for item in items if not isinstance(item, dict)]
    if loose or not groups:
        groups.append({"params": loose})
    return groups


def _check_in_model(groups: list[dict[str, Any]], names: dict[int, str]) -> None:
    foreign = [p for g in groups for p in g["params"] if id(p) not in names]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:4])
        raise ValueError(
            f"model_parameters holds {len(foreign)} tensor(s) that are not parameters of the model "
            f"(shapes {shapes}{', ...' if len(foreign) > 4 else ''}); expertopt routes parameters by their "
            "names in the model. With AutoEP, modules are replaced inside deepspeed.initialize: pass "
            "model.parameters() (read after the replacement), a list, or groups whose params are lists "
            "(DeepSpeed maps those onto the replacements); otherwise pass only the model's parameters"
        )


def _forcing_rules(model: nn.Module, groups: list[dict[str, Any]], names: dict[int, str]) -> list[Rule]:
    """One rule per (forced group, expert or dense): the router then applies its lr ratio and
    weight decay for the forced family (a rule group may not mix experts and dense)."""
    rules = []
    for index, group in enumerate(groups):
        if "use_muon" not in group:
            continue
        for expert in (False, True):
            ids = {
                id(p)
                for p in group["params"]
                if p.requires_grad
                and is_expert_param(names[id(p)], p, model.get_submodule(names[id(p)].rpartition(".")[0]))
                == expert
            }
            if ids:
                label = (
                    f"forced{index}-{'expert-' if expert else ''}{'muon' if group['use_muon'] else 'adamw'}"
                )
                options = {"use_muon": bool(group["use_muon"]), "name": label}
                rules.append(Rule(lambda _name, p, ids=ids: id(p) in ids, options))
    return rules


def _halves(
    group: dict[str, Any], routed: list[dict[str, Any]], routed_of: dict[int, int], prefix: str | None
):
    """Split one incoming group along the router's groups; the group's own keys win."""
    overrides = {k: v for k, v in group.items() if k not in ("params", "use_muon", "name")}
    halves = []
    for position, template in enumerate(routed):
        params = [p for p in group["params"] if routed_of.get(id(p)) == position]
        if not params:
            continue
        half = {k: v for k, v in template.items() if k not in ("params", "param_names")}
        half.update(overrides)
        names = dict(zip(map(id, template["params"]), template["param_names"], strict=True))
        half.update(params=params, param_names=[names[id(p)] for p in params])
        if prefix is not None:
            half["name"] = f"{prefix}-{template['name']}"
        halves.append(half)
    # An expert half follows the dense half of its kind within this incoming group (renamed
    # with it), or nothing when that dense half is not there.
    dense_names = {h["name"] for h in halves if not h["expert"]}
    for half in halves:
        link = half["link"] if prefix is None or half["link"] is None else f"{prefix}-{half['link']}"
        half["link"] = link if link in dense_names else None
    return halves


def route_model_parameters(
    model: nn.Module, model_parameters: Iterable[Any], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Route exactly the parameters in ``model_parameters`` (DeepSpeed's list, read after AutoEP)
    into expertopt groups; ``options`` are :func:`build_param_groups`'s. Frozen parameters are
    left out, as DeepSpeed's own Muon leaves them out."""
    groups = _user_groups(model_parameters)
    names = {id(p): n for n, p in model.named_parameters()}
    _check_in_model(groups, names)
    rules = _forcing_rules(model, groups, names)
    options = dict(options)
    rules = [*options.pop("rules", ()), *rules]
    routed = build_param_groups(model, **options, rules=rules)
    routed_of = {id(p): position for position, g in enumerate(routed) for p in g["params"]}
    single = len(groups) == 1
    halves = []
    for index, group in enumerate(groups):
        prefix = None if single else str(group.get("name") or f"group{index}")
        halves.extend(_halves(group, routed, routed_of, prefix))
    return halves

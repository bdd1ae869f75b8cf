"""``expertopt.AdamW``: torch's AdamW with expertopt's group machinery.

For users who keep AdamW but want the expert-aware glue: expert groups, links to dense groups,
``lr_mult`` multipliers that survive single-scalar schedulers (F2), eager state (F11) and the
non-finite guard (F10). The math is torch's fused/foreach kernel (``expertopt.updates.adamw``).

The two helpers below are also the AdamW half of :class:`expertopt.Muon`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from expertopt.optim._base import (
    DeviceGuard,
    GroupedOptimizer,
    check_betas,
    check_lr,
    check_nonnegative,
    effective_lr,
    step_lr,
)
from expertopt.updates.adamw import adamw_step, choose_adamw_impl

__all__ = ["AdamW", "adamw_group_is_fused", "init_adamw_state", "step_adamw_group"]


def init_adamw_state(state: dict[str, Any], param: Tensor, amsgrad: bool) -> None:
    """Create AdamW state for one parameter unless present (torch's keys, so checkpoints interchange)."""
    if "step" not in state:
        # On the parameter's device: torch's fused kernel requires it, the others accept it.
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if amsgrad and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def adamw_group_is_fused(group: dict[str, Any]) -> bool:
    """Whether ``group`` steps with torch's fused kernel, the one that takes a device ``found_inf``."""
    return choose_adamw_impl(group["params"], group.get("fused"), group.get("foreach"))[0]


def step_adamw_group(
    optimizer: GroupedOptimizer, group: dict[str, Any], guard: DeviceGuard | None = None
) -> None:
    """One AdamW step over the parameters of ``group`` that have gradients.

    With ``guard`` (fused kernel only) the kernel itself skips a non-finite step: torch's fused
    AdamW leaves parameters, moments and step counts untouched where ``found_inf`` is 1.
    """
    params, grads = optimizer._grads_of(group)
    states = [optimizer.state[p] for p in params]
    amsgrad = group.get("amsgrad", False)
    adamw_step(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
        [s["step"] for s in states],
        lr=step_lr(group) if guard is not None else effective_lr(group),
        betas=tuple(group["betas"]),
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=amsgrad,
        maximize=group.get("maximize", False),
        fused=group.get("fused"),
        foreach=group.get("foreach"),
        found_inf=guard.found_inf if guard is not None else None,
    )


class AdamW(GroupedOptimizer):
    """AdamW (decoupled weight decay) with per-group ``lr_mult``, expert groups and eager state.

    Arguments and defaults as ``torch.optim.AdamW``; ``fused=None`` picks torch's fused kernel where
    every parameter supports it. Group keys beyond torch's: ``expert``, ``lr_mult``, ``name``,
    ``link`` (see :class:`expertopt.MoEOptimizer`).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        skip_nonfinite: bool = True,
        capturable: bool = False,
    ) -> None:
        check_lr(lr, "AdamW")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "expert": False,
            "lr_mult": 1.0,
        }
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite, capturable=capturable)

    def _complete_group(self, group: dict[str, Any], where: str) -> None:
        if group.get("use_muon"):
            raise ValueError(
                f"{where} sets use_muon=True, but expertopt.AdamW steps every group with AdamW: "
                "use expertopt.Muon for Muon groups, or drop the key"
            )
        check_lr(group["lr"], where)
        for key in ("weight_decay", "lr_mult", "eps"):
            check_nonnegative(group, key, where)
        check_betas(group["betas"], where)

    def _init_state(self, group: dict[str, Any], param: Tensor, position: int) -> None:
        init_adamw_state(self.state[param], param, group["amsgrad"])

    def _guard_on_device(self) -> bool:
        return super()._guard_on_device() and all(adamw_group_is_fused(g) for g in self.param_groups)

    def _step_group(self, group: dict[str, Any], guard: DeviceGuard | None) -> None:
        step_adamw_group(self, group, guard)

"""AdamW update rule: torch's own fused / foreach kernels, never a hand-written loop."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.optimizer import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

__all__ = ["adamw_step", "choose_adamw_impl"]


def choose_adamw_impl(params: list[Tensor], fused: bool | None, foreach: bool | None) -> tuple[bool, bool]:
    """Pick torch's AdamW implementation: fused where every tensor supports it, else foreach.

    torch itself defaults to foreach (and to the per-tensor loop on CPU); its fused kernel is the
    fastest on both CPU and CUDA, so expertopt prefers it when the user left both unset.
    """
    if fused is not None or foreach is not None:
        return bool(fused), bool(foreach)
    fused_devices = _get_fused_kernels_supported_devices()
    if params and all(p.device.type in fused_devices and torch.is_floating_point(p) for p in params):
        return True, False
    foreach_devices = _get_foreach_kernels_supported_devices()
    return False, all(p.device.type in foreach_devices for p in params)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    fused: bool | None = None,
    foreach: bool | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW step (decoupled weight decay) through ``torch.optim.adamw.adamw``.

    ``found_inf`` (0-dim float, 1.0 = skip this step) is decided on the device and honoured by
    torch's fused kernel only: the other implementations would need a host sync to skip.
    """
    if not params:
        return
    use_fused, use_foreach = choose_adamw_impl(params, fused, foreach)
    if found_inf is not None and not use_fused:
        raise ValueError(
            "found_inf needs torch's fused AdamW (fused=True, or both fused and foreach left None "
            "on a device with fused kernels); decide a non-finite step on the host otherwise"
        )
    _torch_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=use_foreach,
        fused=use_fused,
        amsgrad=amsgrad,
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        found_inf=found_inf,
    )

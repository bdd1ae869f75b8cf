"""Muon update rule, written once for every front end.

The rule follows ``torch.optim.Muon`` (torch 2.13) exactly for 2-D matrices, and generalizes it
the way Keller Jordan's and dion's Muon do: the last two dims of a tensor are the matrix and every
leading dim is a batch of independent matrices (stacked experts ``[E, out, in]``). Each matrix is
normalized and lr-scaled by its own shape (F8).

Single process, :func:`muon_step`: a fixed number of ops per bucket of same-shape matrices,
whatever the number of matrices (issue 12): the momentum is kept stacked per bucket and every
view is planned once (:mod:`expertopt.updates.muon_buckets`), the step takes a tensor lr and a
device-side non-finite flag, so it needs no host sync and compiles without graph breaks.
Sharded (ZeRO partitions), the same pieces split where communication must happen:
:func:`blend_momentum` on each rank's slice, :func:`orthogonalize_updates` on the owner's whole
matrices, and the shape-scaled step on the slice again (``expertopt.distributed``).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from expertopt.kernels import orthogonalize, resolve_ns_method
from expertopt.updates.muon_buckets import MatrixGeometry, MuonBucket, MuonPlan, plan_buckets

__all__ = [
    "ADJUST_LR_FNS",
    "MATRIX_LAYOUTS",
    "MuonHyperparams",
    "adjusted_lr",
    "blend_momentum",
    "matrix_geometry",
    "matrix_view",
    "matrix_view_options",
    "muon_step",
    "orthogonalize_updates",
    "plan_muon_step",
]

# None means "original", as in torch.optim.Muon.
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
# How a parameter's matrices are stored (group key ``matrix_layout``): "out_in" as nn.Linear,
# "in_out" as gpt-oss / Llama4 experts ``[E, in, out]``, "flatten" as convolutions.
MATRIX_LAYOUTS = ("out_in", "in_out", "flatten")


@dataclass(frozen=True, slots=True)
class MuonHyperparams:
    """One Muon group's hyperparameters for one step, as a single value every step function takes.

    ``lr`` is the effective lr (the scheduled lr times the group's ``lr_mult``; a 0-dim tensor
    where the group's lr is one, so the single-process step needs no host sync); the rest are the
    group's keys of the same names. Built once per group and step by :meth:`from_group`.
    """

    lr: float | Tensor
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_method: str
    ns_steps: int
    ns_coefficients: tuple[float, float, float]
    ns_dtype: str | torch.dtype
    eps: float
    adjust_lr_fn: str | None

    @classmethod
    def from_group(cls, group: dict[str, Any], lr: float | Tensor) -> MuonHyperparams:
        return cls(
            lr=lr,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_method=group["ns_method"],
            ns_steps=group["ns_steps"],
            ns_coefficients=tuple(group["ns_coefficients"]),
            ns_dtype=group["ns_dtype"],
            eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"],
        )


def adjusted_lr(
    lr: float, adjust_lr_fn: str | None, matrix_shape: Sequence[int], matrix_layout: str = "out_in"
) -> float:
    """Scale ``lr`` by one matrix's shape ``[..., A, B]`` as the layer computes with it.

    ``matrix_layout="out_in"`` (``nn.Linear``): rows A are fan-out, cols B fan-in; ``"in_out"``
    (gpt-oss, Llama4 experts ``[E, in, out]``): rows are fan-in. "original" (torch's rule) steps
    ``lr * sqrt(max(1, fan_out / fan_in))``, so reading the storage the wrong way round inverts
    the ratio (issue 8). torch's ``_adjust_lr`` reads ``shape[:2]``; reading ``shape[-2:]`` gives
    the same answer on 2-D weights and the per-expert answer on ``[E, A, B]`` stacks (STYLE 3).
    """
    rows, cols = matrix_shape[-2], matrix_shape[-1]
    if matrix_layout not in MATRIX_LAYOUTS:
        raise ValueError(f"matrix_layout={matrix_layout!r} is unknown; use one of {MATRIX_LAYOUTS}")
    fan_out, fan_in = (cols, rows) if matrix_layout == "in_out" else (rows, cols)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, fan_out / fan_in))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not supported; use one of {ADJUST_LR_FNS}")


def blend_momentum(
    grads: list[Tensor], momentum_buffers: list[Tensor], *, momentum: float, nesterov: bool
) -> list[Tensor]:
    """Update the momentum buffers in place and return the update directions.

    Same arithmetic as torch.optim.Muon: ``B <- lerp(B, g, 1 - mu)`` and, with Nesterov,
    ``U = lerp(g, B, mu)``; without it the buffer itself is the direction.
    """
    if not grads:
        return []
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
    if nesterov:
        return list(torch._foreach_lerp(grads, momentum_buffers, momentum))
    return list(momentum_buffers)


def matrix_view_options(group: dict[str, Any]) -> dict[str, Any]:
    """A Muon group's keys that decide how its tensors are viewed as matrices, as the keyword
    arguments of :func:`matrix_view` (and of every function that forwards them)."""
    return {
        "is_expert": group["expert"],
        "num_heads": group["num_heads"],
        "matrix_layout": group["matrix_layout"],
        "row_blocks": group["row_blocks"],
    }


def matrix_view(
    update: Tensor,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> Tensor:
    """View an update as a batch of matrices ``[..., m, n]`` for Newton-Schulz.

    - 2-D: the matrix itself; with ``num_heads`` (attention heads) or ``row_blocks`` (a 2-D
      expert stack such as DBRX's ``[E*I, H]``) the rows split into blocks ``[blocks, rows/blocks, n]``
      so each head or expert is orthogonalized on its own.
    - 3-D and more: leading dims are independent matrices (stacked experts ``[E, out, in]``).
    - ``matrix_layout="flatten"`` (convolutions ``[out, in, *kernel]``, any rank): one matrix
      ``[out, in*prod(kernel)]`` as Keller Jordan's Muon does; a 4-D tensor not tagged expert is
      flattened the same way in any layout (the behaviour before layouts existed).

    ``matrix_layout="in_out"`` changes no view: the polar factor of X^T is the transpose of X's,
    so only the lr scale (:func:`adjusted_lr`) reads it.
    """
    if update.ndim < 2:
        raise ValueError(f"Muon needs matrices, got a {update.ndim}-D tensor of shape {tuple(update.shape)}")
    if matrix_layout not in MATRIX_LAYOUTS:
        raise ValueError(f"matrix_layout={matrix_layout!r} is unknown; use one of {MATRIX_LAYOUTS}")
    blocks, key = (num_heads, "num_heads") if num_heads is not None else (row_blocks, "row_blocks")
    if num_heads is not None and row_blocks is not None:
        raise ValueError(f"num_heads={num_heads} and row_blocks={row_blocks} both split rows; set one")
    if blocks is not None:
        if update.ndim != 2 or update.shape[0] % blocks:
            raise ValueError(
                f"{key}={blocks} needs a 2-D weight whose rows split evenly into "
                f"{'heads' if key == 'num_heads' else 'expert matrices'}; "
                f"got shape {tuple(update.shape)}"
            )
        return rearrange(update, "(h d) n -> h d n", h=blocks)
    if matrix_layout == "flatten" or (update.ndim == 4 and not is_expert):
        return update.reshape(update.shape[0], -1)
    return update


def orthogonalize_updates(
    updates: list[Tensor],
    *,
    method: str,
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float,
    dtype: str | torch.dtype,
) -> list[Tensor]:
    """Orthogonalize every matrix of every update with one batched call per bucket.

    Matrices are bucketed by (m, n, dtype, device, resolved method); a bucket is concatenated
    along a single batch dim, so 3-D expert stacks and same-shape 2-D weights share one call.
    Returns new tensors shaped like the inputs.
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for index, update in enumerate(updates):
        m, n = update.shape[-2:]
        resolved = resolve_ns_method(method, update.shape, update.device)
        buckets[(m, n, update.dtype, update.device, resolved)].append(index)

    results: list[Tensor | None] = [None] * len(updates)
    for (m, n, _, _, resolved), indices in buckets.items():
        stacked = torch.cat([updates[i].reshape(-1, m, n) for i in indices])
        ortho = orthogonalize(
            stacked, method=resolved, steps=steps, coefficients=coefficients, eps=eps, dtype=dtype
        )
        sizes = [updates[i].reshape(-1, m, n).shape[0] for i in indices]
        for i, chunk in zip(indices, ortho.split(sizes), strict=True):
            results[i] = chunk.view(updates[i].shape)
    return results  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def matrix_geometry(
    shape: tuple[int, ...],
    device_type: str,
    *,
    method: str,
    adjust_lr_fn: str | None,
    is_expert: bool,
    num_heads: int | None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> MatrixGeometry:
    """How a parameter of ``shape`` enters Newton-Schulz, from :func:`matrix_view` and :func:`adjusted_lr`.

    Called once per distinct shape (cached): both functions run on a meta tensor, so whatever
    layout rule they encode (heads, convolutions, expert stacks) reaches the stacked step as is.
    """
    view = matrix_view(
        torch.empty(shape, device="meta"),
        is_expert=is_expert,
        num_heads=num_heads,
        matrix_layout=matrix_layout,
        row_blocks=row_blocks,
    )
    if view.is_contiguous():
        transposed = False
    elif view.mT.is_contiguous() and view.ndim == len(shape):
        transposed = True
    else:
        raise ValueError(
            f"matrix_view of shape {shape} is neither a reshape nor a transpose of the stored "
            "tensor; the stacked Muon step cannot lay it out"
        )
    m, n = view.shape[-2:]
    return MatrixGeometry(
        matrix_shape=(m, n),
        transposed=transposed,
        lr_scale=adjusted_lr(1.0, adjust_lr_fn, view.shape, matrix_layout),
        method=resolve_ns_method(method, view.shape, torch.device(device_type)),
    )


def plan_muon_step(
    params: list[Tensor],
    momentum_buffers: list[Tensor],
    hyper: MuonHyperparams,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> MuonPlan:
    """Plan :func:`muon_step` for ``params`` once; see :mod:`expertopt.updates.muon_buckets`.

    The plan adopts the values of ``momentum_buffers``; a caller that keeps the plan across steps
    must use ``plan.momentum_views`` as its momentum state from then on.
    """
    layouts = [
        matrix_geometry(
            tuple(p.shape),
            p.device.type,
            method=hyper.ns_method,
            adjust_lr_fn=hyper.adjust_lr_fn,
            is_expert=is_expert,
            num_heads=num_heads,
            matrix_layout=matrix_layout,
            row_blocks=row_blocks,
        )
        for p in params
    ]
    return plan_buckets(params, momentum_buffers, layouts, hyper.ns_dtype)


def _negated(value: float | Tensor, finite: Tensor | None) -> float | Tensor:
    """``-value``, or 0 where the step is skipped: masks the update without a host sync."""
    if finite is None:
        return -value
    return torch.where(finite, -value, 0.0)


def _decay_factor(hyper: MuonHyperparams, finite: Tensor | None) -> float | Tensor:
    """``1 - lr * weight_decay`` (torch.optim.Muon: the unadjusted lr), or 1 where the step is skipped."""
    factor = 1 - hyper.lr * hyper.weight_decay
    if finite is None:
        return factor
    return torch.where(finite, factor, 1.0)


def _step_bucket(
    bucket: MuonBucket, grads: list[Tensor], hyper: MuonHyperparams, skipped: Tensor | None
) -> None:
    """Momentum, Nesterov, Newton-Schulz and update for one bucket: a fixed number of ops.

    ``work`` holds the gradients (one ``_foreach_copy_``), then the Nesterov direction, then
    ``-lr * AdjustLR * NS(direction)`` in the parameter dtype (written by ``orthogonalize``: in
    fp32 its first product reads ``work`` itself, in half precision its normalization is the one
    cast into the Newton-Schulz dtype). A skipped step (``skipped`` 1)
    replaces the gradients by the momentum, so momentum keeps its value exactly (lerp towards
    itself), and its update scale is 0.
    """
    work, momentum = bucket.work, bucket.momentum
    torch._foreach_copy_(bucket.work_views, [grads[i] for i in bucket.indices])
    if skipped is not None:
        # work <- momentum where the step is skipped, as two vectorized passes: torch.where's CPU
        # kernel is scalar (7x a copy; 2.6 ms of a 100 ms MoE bench step). lerp with weight 0 or
        # 1 returns ``work`` or ``momentum`` exactly, once inf/NaN (0 * inf is NaN) are zeroed.
        work.nan_to_num_(0.0, 0.0, 0.0)
        work.lerp_(momentum, skipped)
    momentum.lerp_(work, 1 - hyper.momentum)
    # Nesterov: the direction overwrites the gradients in place; without it, it is the momentum.
    direction = work.lerp_(momentum, hyper.momentum) if hyper.nesterov else momentum
    orthogonalize(
        direction,
        method=bucket.method,
        steps=hyper.ns_steps,
        coefficients=hyper.ns_coefficients,
        eps=hyper.eps,
        dtype=hyper.ns_dtype,
        out=work,
        out_scale=bucket.step_scale,
        workspace=bucket.ns_workspace,
    )
    torch._foreach_add_(bucket.params, bucket.work_views)


def muon_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    hyper: MuonHyperparams,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
    plan: MuonPlan | None = None,
    finite: Tensor | None = None,
) -> None:
    """One Muon step on whole (unsharded) parameters: the functional API of :class:`expertopt.Muon`.

    The op count depends on the number of distinct matrix shapes, not on the number of matrices
    (issue 12): per bucket of same-shape matrices, one gradient copy, two lerps on the stacked
    momentum, one Newton-Schulz call and one ``_foreach_add_``; weight decay is one
    ``_foreach_mul_`` and the lr scales one op. No host sync: ``hyper.lr`` may be a tensor, and
    ``finite`` (a 0-dim bool tensor, e.g. from :func:`expertopt.optim._base.finite_on_device`)
    turns the step into an exact no-op on parameters and momentum when it is false.

    ``plan`` (from :func:`plan_muon_step`, whose ``momentum_views`` must then be the momentum
    state) is what an optimizer passes to skip the planning; without it the step plans, copies
    ``momentum_buffers`` in and writes them back, which costs two copies.
    """
    if not params:
        return
    own_plan = plan is None
    if own_plan:
        plan = plan_muon_step(
            params,
            momentum_buffers,
            hyper,
            is_expert=is_expert,
            num_heads=num_heads,
            matrix_layout=matrix_layout,
            row_blocks=row_blocks,
        )
    elif len(plan.params) != len(params):
        raise ValueError(f"plan covers {len(plan.params)} parameters but {len(params)} were given; re-plan")
    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, _decay_factor(hyper, finite))
    negated_lr = _negated(hyper.lr, finite)
    skipped = None if finite is None else torch.where(finite, 0.0, 1.0)
    for partition in plan.partitions:
        torch.mul(partition.unit_scales, negated_lr, out=partition.step_scales)
        for bucket in partition.buckets:
            _step_bucket(bucket, grads, hyper, skipped)
    if own_plan:
        torch._foreach_copy_(list(momentum_buffers), plan.momentum_views)

"""Muon on whole parameters replicated over a process group (ZeRO-0): each matrix orthogonalized
by one owner, results all-gathered.

Without ZeRO every rank of a data-parallel group holds the same averaged gradients and the same
momentum, so running Newton-Schulz on every rank repeats the same work N times. Here each matrix
(each expert of a stack, each head with ``num_heads``) gets one owner, balanced by Newton-Schulz
FLOPs; owners orthogonalize their matrices in batched calls and one ``all_gather_into_tensor``
hands every rank every result, in the Newton-Schulz compute dtype when it is narrower than the
parameters (bf16 output carried exactly). All ranks then apply the same bits, so replicas cannot
drift apart. Momentum, weight decay and the lr scaling are the single-process rule's
(``expertopt.updates.muon``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import balance_owners
from expertopt.distributed._runtime import exact_wire_dtype
from expertopt.kernels import ns_flops, resolve_ns_method
from expertopt.updates.muon import (
    MuonHyperparams,
    adjusted_lr,
    blend_momentum,
    matrix_view,
    orthogonalize_updates,
)

__all__ = ["ReplicaGroup", "replicated_muon_step"]


@dataclass(frozen=True, eq=False)
class ReplicaGroup:
    """The ranks that hold identical copies of some parameters: its process group (None = world)."""

    group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(group=self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(group=self.group)


def replicated_muon_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    replicas: ReplicaGroup,
    hyper: MuonHyperparams,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> None:
    """One Muon step on parameters replicated over ``replicas``; every matrix orthogonalized once."""
    if not params:
        return
    directions = blend_momentum(grads, momentum_buffers, momentum=hyper.momentum, nesterov=hyper.nesterov)
    # Every matrix of every parameter, in a fixed order: (parameter, matrix index inside it).
    views = [
        matrix_view(
            d, is_expert=is_expert, num_heads=num_heads, matrix_layout=matrix_layout, row_blocks=row_blocks
        )
        for d in directions
    ]
    stacks = [v.reshape(-1, *v.shape[-2:]) for v in views]
    device = params[0].device
    matrices, owners, width = _plan(
        tuple(s.shape for s in stacks), replicas.size, hyper.ns_method, hyper.ns_steps, device
    )
    rank = replicas.rank

    mine = [m for m, owner in zip(matrices, owners, strict=True) if owner == rank]
    results = orthogonalize_updates(
        [stacks[p][i] for p, i in mine],
        method=hyper.ns_method, steps=hyper.ns_steps, coefficients=hyper.ns_coefficients,
        eps=hyper.eps, dtype=hyper.ns_dtype,
    )  # fmt: skip

    wire = exact_wire_dtype(hyper.ns_method, hyper.ns_dtype, (s.shape for s in stacks), params[0])
    send = torch.zeros(width, dtype=wire, device=device)
    if results:
        packed = torch.cat([r.reshape(-1) for r in results])
        send[: packed.numel()] = packed
    gathered = torch.empty(replicas.size * width, dtype=wire, device=device)
    dist.all_gather_into_tensor(gathered, send, group=replicas.group)

    updates = [torch.empty_like(stack) for stack in stacks]
    position = [r * width for r in range(replicas.size)]
    for (p, i), owner in zip(matrices, owners, strict=True):
        numel = updates[p][i].numel()
        updates[p][i].copy_(gathered[position[owner] : position[owner] + numel].view(updates[p][i].shape))
        position[owner] += numel

    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, 1 - hyper.lr * hyper.weight_decay)  # torch.optim.Muon: unadjusted lr
    for param, update, stack in zip(params, updates, stacks, strict=True):
        param.add_(
            update.view(param.shape),
            alpha=-adjusted_lr(hyper.lr, hyper.adjust_lr_fn, stack.shape[-2:], matrix_layout),
        )


@functools.lru_cache(maxsize=64)
def _plan(
    shapes: tuple[torch.Size, ...], world_size: int, ns_method: str, ns_steps: int, device: torch.device
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...], int]:
    """Every matrix as (parameter, index in its stack), its owner, and the all-gather width (the
    busiest owner's elements). Pure function of the shapes: every rank computes the same."""
    matrices = tuple((p, i) for p, shape in enumerate(shapes) for i in range(shape[0]))
    costs = [
        ns_flops(shapes[p][-2:], method=resolve_ns_method(ns_method, shapes[p], device), steps=ns_steps)
        for p, _ in matrices
    ]
    owners = balance_owners(costs, world_size)
    sizes = [0] * world_size
    for (p, _), owner in zip(matrices, owners, strict=True):
        sizes[owner] += shapes[p][-2] * shapes[p][-1]
    return matrices, owners, max(sizes)

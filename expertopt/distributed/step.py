"""Muon on flat ZeRO partitions: elementwise work on the local slice, Newton-Schulz on owners.

A :class:`ShardedMatrices` is built once per flat group (by an engine adapter) and holds the
layout, the owner plan and the process group; :func:`sharded_muon_step` is the whole per-step
algorithm. The math is the single-process rule's (``expertopt.updates.muon``): momentum and
Nesterov blend on the slice, each matrix orthogonalized once by its owner with the same batched
kernel, then decoupled weight decay and the per-matrix adjusted lr on the slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import ExchangePlan, assign_owners, plan_exchange
from expertopt.distributed._runtime import exact_wire_dtype, exchange_orthogonalize
from expertopt.distributed.layout import FlatLayout
from expertopt.updates.muon import MuonHyperparams, adjusted_lr, blend_momentum, orthogonalize_updates

__all__ = ["ShardedMatrices", "sharded_muon_step"]


@dataclass(eq=False)
class ShardedMatrices:
    """One flat Muon group as this rank sees it: layout, owners, exchange plan, process group."""

    layout: FlatLayout
    rank: int
    group: dist.ProcessGroup | None = None
    owners: tuple[int, ...] = ()
    plan: ExchangePlan | None = None
    _scales: dict[str | None, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.owners:
            self.owners = assign_owners(self.layout)
        self.plan = plan_exchange(self.layout, self.owners, self.rank)

    @property
    def owned_matrices(self) -> int:
        return len(self.plan.owned)

    def reply_dtype(self, ns_method: str, ns_dtype: str | torch.dtype, like: Tensor) -> torch.dtype:
        """The dtype orthogonalized pieces travel back in (see ``exact_wire_dtype``)."""
        return exact_wire_dtype(ns_method, ns_dtype, ((m.rows, m.cols) for m in self.layout.matrices), like)

    def lr_scales(self, adjust_lr_fn: str | None, like: Tensor) -> Tensor:
        """Per-element AdjustLR factor of this rank's slice (0 at padding), cached per rule."""
        if adjust_lr_fn not in self._scales:
            scales = torch.zeros(self.layout.partition_size, dtype=like.dtype, device=like.device)
            offset = self.rank * self.layout.partition_size
            for index, matrix in enumerate(self.layout.matrices):
                lo, hi = self.layout.piece(index, self.rank)
                if hi > lo:
                    scales[lo - offset : hi - offset] = adjusted_lr(
                        1.0, adjust_lr_fn, (matrix.rows, matrix.cols), matrix.layout
                    )
            self._scales[adjust_lr_fn] = scales
        return self._scales[adjust_lr_fn]


def sharded_muon_step(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    shard: ShardedMatrices,
    hyper: MuonHyperparams,
) -> None:
    """One Muon step on this rank's flat slice ``param`` (1-D) of a sharded group."""
    (direction,) = blend_momentum([grad], [momentum_buffer], momentum=hyper.momentum, nesterov=hyper.nesterov)

    def orthogonalize_owned(matrices: list[Tensor]) -> list[Tensor]:
        return orthogonalize_updates(
            matrices,
            method=hyper.ns_method,
            steps=hyper.ns_steps,
            coefficients=hyper.ns_coefficients,
            eps=hyper.eps,
            dtype=hyper.ns_dtype,
        )

    reply_dtype = shard.reply_dtype(hyper.ns_method, hyper.ns_dtype, param)
    update = exchange_orthogonalize(
        direction, shard.layout, shard.plan, orthogonalize_owned, shard.group, reply_dtype
    )
    if hyper.weight_decay != 0:
        param.mul_(1 - hyper.lr * hyper.weight_decay)
    param.addcmul_(update, shard.lr_scales(hyper.adjust_lr_fn, param), value=-hyper.lr)

"""Muon on sharded or replicated matrices: elementwise work on the local buffers, Newton-Schulz
on owners. One step for ZeRO-0, 1, 2 and 3.

A :class:`ShardedMatrices` is built once per *unit* (what one optimizer call steps together:
a ZeRO-1/2 group's flat partition, a ZeRO-3 sub-group's flat partition, a ZeRO-0 group's whole
parameters) by an engine adapter, and holds the layout, the owner plan and the process group.
:func:`place` ties it to the tensors the engine hands the optimizer, so the data says where it
lives (:func:`shards_of`), and :func:`check_agreement` makes the ranks prove, before any
exchange, that they hold the same description. :func:`sharded_muon_step` is the whole per-step
algorithm; the math is the single-process rule's (``expertopt.updates.muon``): momentum and
Nesterov blend on the local buffers, each matrix orthogonalized once by its owner with the same
batched kernel, then decoupled weight decay and the per-matrix adjusted lr on the buffers.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import ExchangePlan, assign_owners, matrix_costs, plan_exchange
from expertopt.distributed._runtime import exact_wire_dtype, exchange_orthogonalize, owned_views, send_back
from expertopt.distributed.layout import ShardLayout
from expertopt.kernels import DEFAULT_NS_STEPS
from expertopt.updates.muon import MuonHyperparams, adjusted_lr, blend_momentum, orthogonalize_updates

__all__ = ["ShardedMatrices", "check_agreement", "owner_muon_step", "place", "sharded_muon_step", "shards_of"]

_ATTRIBUTE = "expertopt_shards"


@dataclass(eq=False)
class ShardedMatrices:
    """One unit as this rank sees it: layout, owners (costed by the group's Newton-Schulz method
    and step count), exchange plan, process group.

    ``gradients_at_owner``: the engine reduces each matrix's gradient straight to its owner, into
    :attr:`owned_gradient` (fp32, ``plan.owned_numel`` elements laid out as ``plan.owned_offsets``),
    instead of handing every rank a reduced partition; momentum then lives at the owner too
    (:meth:`new_momentum`) and the step is :func:`owner_muon_step`. The engine adapter fills the
    buffer during backward and zeroes it after every engine step.
    """

    layout: ShardLayout
    rank: int
    group: dist.ProcessGroup | None = None
    ns_method: str = "standard"
    ns_steps: int = DEFAULT_NS_STEPS
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owners: tuple[int, ...] = ()
    plan: ExchangePlan | None = None
    gradients_at_owner: bool = False
    owned_gradient: Tensor | None = field(default=None, repr=False)
    _scales: dict[str | None, list[tuple[int, int, str] | Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.owners:
            costs = matrix_costs(self.layout, self.ns_method, self.ns_steps, self.device)
            self.owners = assign_owners(self.layout, costs)
        self.plan = plan_exchange(self.layout, self.owners, self.rank)
        if self.gradients_at_owner:
            self.owned_gradient = torch.zeros(self.plan.owned_numel, dtype=torch.float32, device=self.device)

    @property
    def owned_matrices(self) -> int:
        return len(self.plan.owned)

    def __reduce__(self) -> tuple:
        # A unit describes this process's run (it holds a process group): engines that save
        # the tensors it is placed on (DeepSpeed's fp32 flat groups) save them without it.
        return (_unplaced, ())

    def fingerprint(self) -> bytes:
        described = self.layout.fingerprint() + repr((self.owners, self.gradients_at_owner)).encode()
        return hashlib.sha256(described).digest()

    def new_momentum(self, buffer: Tensor) -> Tensor:
        """A zero momentum buffer for ``buffer``: like it, or the owned matrices' flat buffer
        when gradients arrive at the owner."""
        if self.gradients_at_owner:
            return torch.zeros(self.plan.owned_numel, dtype=buffer.dtype, device=buffer.device)
        return torch.zeros_like(buffer, memory_format=torch.preserve_format)

    def reply_dtype(self, ns_method: str, ns_dtype: str | torch.dtype, like: Tensor) -> torch.dtype:
        """The dtype orthogonalized pieces travel back in (see ``exact_wire_dtype``)."""
        return exact_wire_dtype(ns_method, ns_dtype, ((m.rows, m.cols) for m in self.layout.matrices), like)

    def lr_scales(self, adjust_lr_fn: str | None, like: Tensor) -> list[tuple[int, int, str] | Tensor]:
        """Per local buffer, how its elements scale the lr: the one matrix shape all of them
        share (ZeRO-0 parameters), else a tensor of AdjustLR factors (0 at padding); cached."""
        if adjust_lr_fn not in self._scales:
            by_buffer: list[dict[tuple[int, int, str], list[tuple[int, int]]]] = [
                {} for _ in self.layout.buffer_numels
            ]
            for matrix in self.layout.matrices:
                for piece in matrix.pieces:
                    if piece.rank == self.rank:
                        key = (matrix.rows, matrix.cols, matrix.layout)
                        spans = by_buffer[piece.buffer].setdefault(key, [])
                        spans.append((piece.offset, piece.numel))
            scales: list[tuple[int, int, str] | Tensor] = []
            for numel, runs in zip(self.layout.buffer_numels, by_buffer, strict=True):
                covered = sum(n for spans in runs.values() for _, n in spans)
                if len(runs) == 1 and covered == numel:
                    scales.append(next(iter(runs)))
                    continue
                tensor = torch.zeros(numel, dtype=like.dtype, device=like.device)
                for (rows, cols, layout), spans in runs.items():
                    for offset, n in spans:
                        tensor[offset : offset + n] = adjusted_lr(1.0, adjust_lr_fn, (rows, cols), layout)
                scales.append(tensor)
            self._scales[adjust_lr_fn] = scales
        return self._scales[adjust_lr_fn]


def _unplaced() -> None:
    return None


def place(tensor: Tensor, shards: ShardedMatrices) -> None:
    """Record on ``tensor`` (a local buffer an engine hands the optimizer) the unit it belongs to."""
    setattr(tensor, _ATTRIBUTE, shards)


def shards_of(tensor: Tensor) -> ShardedMatrices | None:
    """The unit ``tensor`` belongs to, or None for a whole, unshared parameter."""
    return getattr(tensor, _ATTRIBUTE, None)


def check_agreement(units: Iterable[ShardedMatrices]) -> None:
    """Raise on every rank, with the cause, unless all ranks of each process group hold the same
    descriptions and owners. One ``all_gather`` per process group, at attach time: a rank that
    disagreed would otherwise wait forever in an exchange of another shape."""
    by_group: dict[int, tuple[dist.ProcessGroup | None, list[bytes]]] = {}
    for unit in units:
        by_group.setdefault(id(unit.group), (unit.group, []))[1].append(unit.fingerprint())
    for group, prints in by_group.values():
        digest = hashlib.sha256(b"".join(prints)).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True), len(prints)], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(gathered, mine, group=group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            counts = [int(g[1]) for g in gathered]
            raise ValueError(
                "ranks disagree on where the Muon matrices live (shard descriptions or owners differ; "
                f"units per rank: {counts}): every rank must build its optimizer from the same model, "
                "param groups and engine configuration"
            )


def _orthogonalizer(hyper: MuonHyperparams) -> Callable[[list[Tensor]], list[Tensor]]:
    def orthogonalize_owned(matrices: list[Tensor]) -> list[Tensor]:
        return orthogonalize_updates(
            matrices,
            method=hyper.ns_method,
            steps=hyper.ns_steps,
            coefficients=hyper.ns_coefficients,
            eps=hyper.eps,
            dtype=hyper.ns_dtype,
        )

    return orthogonalize_owned


def sharded_muon_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    shards: ShardedMatrices,
    hyper: MuonHyperparams,
) -> None:
    """One Muon step on this rank's local buffers ``params`` of a unit, in layout order."""
    directions = blend_momentum(grads, momentum_buffers, momentum=hyper.momentum, nesterov=hyper.nesterov)
    reply_dtype = shards.reply_dtype(hyper.ns_method, hyper.ns_dtype, params[0])
    updates = exchange_orthogonalize(
        [d.reshape(-1) for d in directions], shards.layout, shards.plan, _orthogonalizer(hyper), shards.group,
        reply_dtype,
    )  # fmt: skip
    _apply_updates(params, updates, shards, hyper)


def owner_muon_step(
    params: list[Tensor], momentum: Tensor, shards: ShardedMatrices, hyper: MuonHyperparams
) -> None:
    """One Muon step of a unit whose gradients were reduced to their owners
    (``shards.gradients_at_owner``): momentum, Nesterov and Newton-Schulz on the owned matrices,
    whose pieces go back to every holder's ``params`` (local buffers, layout order)."""
    (direction,) = blend_momentum(
        [shards.owned_gradient.to(momentum.dtype)],
        [momentum],
        momentum=hyper.momentum,
        nesterov=hyper.nesterov,
    )
    views = owned_views(direction, shards.layout, shards.plan)
    results = _orthogonalizer(hyper)(views) if views else []
    reply_dtype = shards.reply_dtype(hyper.ns_method, hyper.ns_dtype, params[0])
    updates = send_back(results, [p.view(-1) for p in params], shards.plan, shards.group, reply_dtype)
    _apply_updates(params, updates, shards, hyper)


def _apply_updates(
    params: list[Tensor], updates: list[Tensor], shards: ShardedMatrices, hyper: MuonHyperparams
) -> None:
    """Decoupled weight decay, then each buffer's orthogonalized pieces at the adjusted lr."""
    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, 1 - hyper.lr * hyper.weight_decay)  # torch.optim.Muon: unadjusted lr
    # The same arithmetic as the single-process step, so replicas (ZeRO-0) land on its bits:
    # buffers whose matrices share one shape take one foreach add per shape at the adjusted lr;
    # mixed buffers (ZeRO partitions) one addcmul with the per-element factor.
    by_shape: dict[tuple[int, int, str], list[int]] = defaultdict(list)
    for index, scale in enumerate(shards.lr_scales(hyper.adjust_lr_fn, params[0])):
        if isinstance(scale, Tensor):
            params[index].view(-1).addcmul_(updates[index], scale, value=-hyper.lr)
        else:
            by_shape[scale].append(index)
    for (rows, cols, layout), indices in by_shape.items():
        # muon_step's arithmetic: an fp32 unit scale times -lr, multiplied into the update, added.
        unit = torch.tensor(
            [adjusted_lr(1.0, hyper.adjust_lr_fn, (rows, cols), layout)],
            dtype=torch.float32,
            device=params[0].device,
        )
        step_scale = torch.mul(unit, -hyper.lr)  # 1-D, so bf16 updates are scaled in fp32 as there
        scaled = torch._foreach_mul([updates[i] for i in indices], [step_scale] * len(indices))
        torch._foreach_add_([params[i].view(-1) for i in indices], scaled)

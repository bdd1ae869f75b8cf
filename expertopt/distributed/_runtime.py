"""The only collectives of distributed Muon: gather each matrix to its owner and scatter back.

Two ``all_to_all_single`` calls per flat group and step (none when every matrix lies wholly
with its owner): every rank sends the pieces of the
momentum-blended update it holds to the matrices' owners, owners orthogonalize their matrices
in batched calls, and send each rank back exactly the pieces it holds. Bytes per rank: twice
its partition of Muon matrices (minus what stays home), independent of the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import ExchangePlan
from expertopt.distributed.layout import FlatLayout
from expertopt.kernels import resolve_ns_dtype, resolve_ns_method

__all__ = ["exact_wire_dtype", "exchange_orthogonalize"]


def exact_wire_dtype(
    ns_method: str, ns_dtype: str | torch.dtype, shapes: Iterable[tuple[int, ...]], like: Tensor
) -> torch.dtype:
    """The dtype Newton-Schulz output travels in: the compute dtype when every matrix shares one
    narrower than ``like``'s (its output is exact in it, at fewer bytes), else ``like.dtype``."""
    dtypes = {
        resolve_ns_dtype(ns_dtype, like.device, resolve_ns_method(ns_method, shape, like.device))
        for shape in shapes
    }
    dtype = dtypes.pop() if len(dtypes) == 1 else like.dtype
    return dtype if dtype.itemsize < like.dtype.itemsize else like.dtype


def exchange_orthogonalize(
    local: Tensor,
    layout: FlatLayout,
    plan: ExchangePlan,
    orthogonalize_fn: Callable[[list[Tensor]], list[Tensor]],
    group: dist.ProcessGroup | None = None,
    reply_dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthogonalize every matrix of ``layout`` once; return this rank's slice of the result.

    ``local`` is this rank's flat partition of the update; the result has its shape, with the
    orthogonalized values at matrix elements and zeros at padding. ``reply_dtype``: the dtype of
    the return trip; the Newton-Schulz compute dtype (bf16) carries its output exactly at half
    the bytes of fp32.
    """
    reply_dtype = reply_dtype or local.dtype
    send = _gather_pieces(local, plan.send_pieces)
    if plan.local_only:  # every rank keeps what it holds: no collective at all
        received = send
    else:
        received = local.new_empty(sum(plan.recv_sizes))
        dist.all_to_all_single(received, send, list(plan.recv_sizes), list(plan.send_sizes), group=group)

    matrices = [layout.matrices[index] for index in plan.owned]
    owned = [local.new_empty(m.numel) for m in matrices]
    position = 0
    for slot, lo, hi in plan.recv_pieces:
        owned[slot][lo:hi] = received[position : position + hi - lo]
        position += hi - lo
    results = orthogonalize_fn([flat.view(m.rows, m.cols) for flat, m in zip(owned, matrices, strict=True)])

    pieces = [results[slot].reshape(-1)[lo:hi] for slot, lo, hi in plan.recv_pieces]
    reply = torch.cat(pieces).to(reply_dtype) if pieces else local.new_empty(0, dtype=reply_dtype)
    if plan.local_only:
        returned = reply
    else:
        returned = local.new_empty(sum(plan.send_sizes), dtype=reply_dtype)
        dist.all_to_all_single(returned, reply, list(plan.send_sizes), list(plan.recv_sizes), group=group)

    out = torch.zeros_like(local)
    position = 0
    for lo, hi in plan.send_pieces:
        out[lo:hi] = returned[position : position + hi - lo]
        position += hi - lo
    return out


def _gather_pieces(local: Tensor, pieces: tuple[tuple[int, int], ...]) -> Tensor:
    if not pieces:
        return local.new_empty(0)
    return torch.cat([local[lo:hi] for lo, hi in pieces])

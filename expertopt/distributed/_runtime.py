"""The only collectives of distributed Muon: gather each matrix to its owner and send it back.

Two ``all_to_all_single`` calls per unit and step (none when every matrix lies wholly with its
owner): every rank sends the pieces of the momentum-blended update it holds to the matrices'
owners (a replicated matrix is read from the owner's own copy and moves nothing), owners
orthogonalize their matrices in batched calls, and send every holder back its pieces, in the
Newton-Schulz dtype when that is narrower (its output is exact in it). Partitioned matrices
(ZeRO-1/2/3): each rank moves about its partition of Muon matrices each way. Replicated
matrices (ZeRO-0): the return trip is an all-gather of the results, carried by the same call.

Where an engine lets the optimizer own the gradient reduction (DeepSpeed ZeRO-3, see
``expertopt.integrations.deepspeed_zero3_owners``), the gather is replaced by
:func:`reduce_to_owners`: each matrix's raw gradient is summed straight at its owner, so only the
return trip remains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import ExchangePlan, Run
from expertopt.distributed.layout import ShardLayout
from expertopt.kernels import resolve_ns_dtype, resolve_ns_method

__all__ = [
    "exact_wire_dtype",
    "exchange_orthogonalize",
    "owned_matrices",
    "owned_views",
    "reduce_to_owners",
    "send_back",
]


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


def _read(buffers: list[Tensor], runs: tuple[Run, ...], like: Tensor) -> Tensor:
    """Concatenate the runs into one stream: one kernel."""
    if not runs:
        return like.new_empty(0)
    return torch.cat([buffers[b][o : o + n] for b, o, n in runs])


def _write(buffers: list[Tensor], runs: tuple[Run, ...], stream: Tensor) -> None:
    """Scatter consecutive runs of ``stream`` to their places: one foreach copy, whatever the
    number of runs (views are free; kernels are not)."""
    if runs:
        targets = [buffers[b][o : o + n] for b, o, n in runs]
        torch._foreach_copy_(targets, list(stream.split([n for _, _, n in runs])))


def _all_to_all(send: Tensor, recv_sizes: tuple[int, ...], send_sizes: tuple[int, ...], group) -> Tensor:
    received = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(received, send, list(recv_sizes), list(send_sizes), group=group)
    return received


def owned_matrices(
    buffers: list[Tensor], layout: ShardLayout, plan: ExchangePlan, group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """Gather the pieces of the matrices this rank owns from every holder's ``buffers`` (local
    1-D views, in layout order): one ``all_to_all_single``. Returns them as ``[rows, cols]``
    views of one flat buffer laid out as ``plan.owned_offsets``."""
    like = buffers[0]
    send = _read(buffers, plan.send_runs, like)
    received = send if plan.local_only else _all_to_all(send, plan.recv_sizes, plan.send_sizes, group)
    owned = like.new_empty(plan.owned_numel)
    _write([owned], plan.recv_runs, received)
    return owned_views(owned, layout, plan)


def owned_views(owned: Tensor, layout: ShardLayout, plan: ExchangePlan) -> list[Tensor]:
    """The owned matrices as ``[rows, cols]`` views of their flat buffer ``owned``."""
    matrices = [layout.matrices[index] for index in plan.owned]
    return [
        owned[start : start + m.numel].view(m.rows, m.cols)
        for start, m in zip(plan.owned_offsets, matrices, strict=True)
    ]


def send_back(
    results: list[Tensor],
    buffers: list[Tensor],
    plan: ExchangePlan,
    group: dist.ProcessGroup | None = None,
    reply_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Send every holder its pieces of the owned ``results``: one ``all_to_all_single`` in
    ``reply_dtype``. Returns this rank's pieces shaped like ``buffers``, zeros at padding."""
    like = buffers[0]
    reply_dtype = reply_dtype or like.dtype
    # The owner keeps the bits it sends, so every holder of a replicated matrix applies the same.
    if results:
        flat = torch.cat([r.reshape(-1) for r in results]).to(reply_dtype)
    else:
        flat = like.new_empty(0, dtype=reply_dtype)
    reply = _read([flat], plan.reply_runs, flat)
    returned = reply if plan.local_only else _all_to_all(reply, plan.update_sizes, plan.reply_sizes, group)
    out = [torch.zeros_like(b) for b in buffers]
    _write(out, plan.update_runs, returned)
    return out


def exchange_orthogonalize(
    buffers: list[Tensor],
    layout: ShardLayout,
    plan: ExchangePlan,
    orthogonalize_fn: Callable[[list[Tensor]], list[Tensor]],
    group: dist.ProcessGroup | None = None,
    reply_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Orthogonalize every matrix of ``layout`` once; return this rank's buffers of the result.

    ``buffers``: this rank's local buffers (1-D views) of the update, in layout order. Each result
    has its buffer's shape, with the orthogonalized values at matrix elements and zeros
    elsewhere (padding). ``reply_dtype``: the dtype of the return trip.
    """
    views = owned_matrices(buffers, layout, plan, group)
    results = orthogonalize_fn(views) if views else []
    return send_back(results, buffers, plan, group, reply_dtype)


def reduce_to_owners(sends: dict[int, list[Tensor]], group: dist.ProcessGroup | None = None) -> Tensor | None:
    """Average every rank's ``sends[owner]`` (the same sizes on every rank) at ``owner`` (a rank
    of ``group``): one coalesced ``dist.reduce`` per owner present in ``sends`` (per call:
    DeepSpeed's glue calls it once per gradient bucket), in owner order on every rank. Each rank's
    share is divided by the group size first, as DeepSpeed's reduce-scatter does. Returns the
    flat average this rank owns (None if it owns nothing here)."""
    world = dist.get_world_size(group=group)
    me = dist.get_rank(group=group)
    mine = None
    for owner in sorted(sends):
        flat = torch.cat([t.reshape(-1) for t in sends[owner]]).div_(world)
        dist.reduce(flat, dst=dist.get_global_rank(group or dist.group.WORLD, owner), group=group)
        if owner == me:
            mine = flat
    return mine

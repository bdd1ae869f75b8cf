"""The only collectives of distributed Muon: gather each matrix to its owner and send it back.

Two ``all_to_all_single`` calls per unit and step (none when every matrix lies wholly with its
owner): every rank sends the pieces of the momentum-blended update it holds to the matrices'
owners (a replicated matrix is read from the owner's own copy and moves nothing), owners
orthogonalize their matrices in batched calls, and send every holder back its pieces, in the
Newton-Schulz dtype when that is narrower (its output is exact in it). Partitioned matrices
(ZeRO-1/2/3): each rank moves about its partition of Muon matrices each way. Replicated
matrices (ZeRO-0): the return trip is an all-gather of the results, carried by the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._plan import ExchangePlan, Run
from expertopt.distributed.layout import ShardLayout
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
    like = buffers[0]
    reply_dtype = reply_dtype or like.dtype
    send = _read(buffers, plan.send_runs, like)
    received = send if plan.local_only else _all_to_all(send, plan.recv_sizes, plan.send_sizes, group)

    owned = like.new_empty(plan.owned_numel)
    _write([owned], plan.recv_runs, received)
    matrices = [layout.matrices[index] for index in plan.owned]
    views = [
        owned[start : start + m.numel].view(m.rows, m.cols)
        for start, m in zip(plan.owned_offsets, matrices, strict=True)
    ]
    results = orthogonalize_fn(views) if views else []
    # The owner keeps the bits it sends, so every holder of a replicated matrix applies the same.
    flat = torch.cat([r.reshape(-1) for r in results]).to(reply_dtype) if results else owned.to(reply_dtype)
    reply = _read([flat], plan.reply_runs, flat)
    returned = reply if plan.local_only else _all_to_all(reply, plan.update_sizes, plan.reply_sizes, group)

    out = [torch.zeros_like(b) for b in buffers]
    _write(out, plan.update_runs, returned)
    return out

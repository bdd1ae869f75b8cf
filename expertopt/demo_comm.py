"""Bytes each rank sends in collectives, counted by wrapping ``deepspeed.comm`` and ``torch.distributed``.

Every DeepSpeed runtime call site (ZeRO's gradient reduce and parameter all-gather, AutoEP's
token all-to-all) does ``import deepspeed.comm as dist; dist.X(...)``, and expertopt calls
``torch.distributed`` directly, so replacing those module attributes sees every collective. Only
the outermost call counts: a ``deepspeed.comm`` function that ends in a ``torch.distributed``
one counts once.

The unit is bytes *sent by this rank* under the bandwidth-optimal algorithm (the convention of
NCCL's bus bandwidth and of ``bench/zero_harness.py``), with ``g`` the group size and ``S`` the
full buffer: all-reduce ``2(g-1)/g * S``; reduce, broadcast, reduce-scatter, all-gather
``(g-1)/g * S``; all-to-all exactly the rows sent to other ranks. A size-1 group sends nothing.
Bytes are exact, not noisy: the same settings give the same count.
"""

from __future__ import annotations

import collections
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEEPSPEED_OPS",
    "TORCH_OPS",
    "CollectiveBytes",
    "buffer_dtype",
    "payload_bytes",
    "sent_bytes",
    "signature_of",
]

# Collective name -> (argument holding the buffer, sizing rule); ``bench/zero_harness.py`` counts
# with the same tables and rules. "none": a synchronization that moves no data (barrier).
DEEPSPEED_OPS: dict[str, tuple[str | None, str]] = {
    "all_reduce": ("tensor", "allreduce"),
    "all_reduce_coalesced": ("tensors", "allreduce"),
    "inference_all_reduce": ("tensor", "allreduce"),
    "reduce": ("tensor", "rooted"),
    "broadcast": ("tensor", "rooted"),
    "all_gather": ("tensor", "gather_input"),
    "all_gather_into_tensor": ("output_tensor", "gather_output"),
    "allgather_fn": ("output_tensor", "gather_output"),
    "reduce_scatter": ("input_list", "scatter_input"),
    "reduce_scatter_tensor": ("tensor", "scatter_input"),
    "reduce_scatter_fn": ("tensor", "scatter_input"),
    "all_to_all_single": ("tensor", "alltoall"),
    "all_gather_coalesced": ("input_tensors", "gather_input"),
    "barrier": (None, "none"),
}
TORCH_OPS: dict[str, tuple[str | None, str]] = {
    "all_reduce": ("tensor", "allreduce"),
    "reduce": ("tensor", "rooted"),
    "broadcast": ("tensor", "rooted"),
    "all_gather": ("tensor", "gather_input"),
    "all_gather_into_tensor": ("output_tensor", "gather_output"),
    "reduce_scatter_tensor": ("input", "scatter_input"),
    "all_to_all_single": ("input", "alltoall"),
}


def signature_of(fn: Callable) -> inspect.Signature:
    """The real signature; ``deepspeed.comm``'s ``timed_op`` wraps without ``functools.wraps``:
    the wrapped function is the closure cell of the same name, else the first function there."""
    signature = inspect.signature(fn)
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        cells = [cell.cell_contents for cell in fn.__closure__ or ()]
        for inner in cells:
            if callable(inner) and getattr(inner, "__name__", None) == fn.__name__:
                return inspect.signature(inner)
        for inner in cells:
            if inspect.isfunction(inner):
                return inspect.signature(inner)
    return signature


def payload_bytes(x: Any) -> int:
    """Bytes of a collective's buffer (a tensor or a list of them)."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(payload_bytes(t) for t in x)
    return 0


def buffer_dtype(x: Any) -> str:
    """The buffer's dtype name ("" for none)."""
    if torch.is_tensor(x):
        return str(x.dtype).removeprefix("torch.")
    if isinstance(x, (list, tuple)) and x:
        return buffer_dtype(x[0])
    return ""


def sent_bytes(kind: str, bound: dict[str, Any], buffer: Any, size: int) -> float:
    """Bytes this rank sends for one collective of ``kind`` over a group of ``size`` ranks."""
    payload = payload_bytes(buffer)
    if size <= 1 or kind == "none":
        return 0.0
    if kind == "allreduce":
        return 2 * (size - 1) / size * payload
    if kind in ("rooted", "gather_output", "scatter_input"):
        return (size - 1) / size * payload
    if kind == "gather_input":
        return float((size - 1) * payload)
    splits = bound.get("input_split_sizes")  # all-to-all: the rows that leave this rank
    if splits:
        row_bytes = payload // max(buffer.shape[0], 1)
        return float((sum(splits) - splits[dist.get_rank(group=bound.get("group"))]) * row_bytes)
    return (size - 1) / size * payload


class CollectiveBytes:
    """Sums the bytes this rank sends per ``"source.op"`` while :meth:`counting` is active."""

    def __init__(self) -> None:
        self.bytes_by_op: dict[str, float] = collections.defaultdict(float)
        self.calls_by_op: dict[str, int] = collections.defaultdict(int)
        self._active = False
        self._local = threading.local()
        self._originals: list[tuple[Any, str, Callable]] = []

    @property
    def total(self) -> float:
        return sum(self.bytes_by_op.values())

    def reset(self) -> None:
        self.bytes_by_op.clear()
        self.calls_by_op.clear()

    @contextmanager
    def counting(self) -> Iterator[None]:
        previous, self._active = self._active, True
        try:
            yield
        finally:
            self._active = previous

    def install(self) -> CollectiveBytes:
        """Wrap the collectives (idempotent); :meth:`uninstall` puts the originals back."""
        if self._originals:
            return self
        import deepspeed.comm as ds_dist

        for module, source, ops in ((ds_dist, "deepspeed", DEEPSPEED_OPS), (dist, "torch", TORCH_OPS)):
            for name, rule in ops.items():
                if hasattr(module, name) and rule[1] != "none":  # counts bytes: a barrier moves none
                    original = getattr(module, name)
                    self._originals.append((module, name, original))
                    setattr(module, name, self._wrap(original, f"{source}.{name}", rule))
        return self

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _wrap(self, original: Callable, key: str, rule: tuple[str | None, str]) -> Callable:
        signature = signature_of(original)
        argument, kind = rule

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0 and self._active:
                bound = signature.bind_partial(*args, **kwargs).arguments
                size = dist.get_world_size(group=bound.get("group"))
                buffer = bound.get(argument) if argument else None
                self.bytes_by_op[key] += sent_bytes(kind, bound, buffer, size)
                self.calls_by_op[key] += 1
            self._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth

        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapped

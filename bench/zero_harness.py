"""Multi-rank plumbing for the ZeRO communication benchmark: spawn, collective counting.

:func:`spawn` runs ``fn(rank, world_size, *args)`` on N gloo ranks (127.0.0.1, one torch thread
each, DeepSpeed's CPU accelerator) and returns the per-rank results in rank order.

:class:`CommCounter` wraps the module-level functions of ``deepspeed.comm`` (every DeepSpeed
runtime call site does ``from deepspeed import comm as dist; dist.X(...)``) and the collectives
of ``torch.distributed`` (expertopt calls ``torch.distributed.all_to_all_single`` directly).
Only the outermost call is counted: a ``deepspeed.comm`` function that ends in a
``torch.distributed`` one (or in another ``deepspeed.comm`` one, e.g. ``allgather_fn``) counts
once, under its ``deepspeed.comm`` name.

Two sizes are recorded per call:

- ``payload``: bytes of the buffer handed to the collective (what DeepSpeed's comms logger
  reports; for gathers and all-to-all, this rank's input);
- ``wire``: bytes this rank *sends* under the bandwidth-optimal algorithm of the collective,
  with ``g`` the process group size and ``S`` the full buffer: all-reduce ``2(g-1)/g * S``
  (ring: reduce-scatter then all-gather); reduce, broadcast, reduce-scatter and all-gather
  ``(g-1)/g * S`` (for reduce and broadcast averaged over roots: a pipelined reduce makes every
  non-root send ``S``, the root nothing); all-to-all: exactly the elements sent to other ranks
  (the chunk to itself stays home). A size-1 group sends nothing. This is the convention of
  NCCL's "bus bandwidth", under which an all-reduce costs twice a reduce-scatter.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["CommCounter", "spawn"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank (module-level ``fn``); per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]


# Collectives and how to size them: (buffer argument, wire-bytes rule).
_DS_OPS = {
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
_TORCH_OPS = {
    "all_reduce": ("tensor", "allreduce"),
    "reduce": ("tensor", "rooted"),
    "broadcast": ("tensor", "rooted"),
    "all_gather": ("tensor", "gather_input"),
    "all_gather_into_tensor": ("output_tensor", "gather_output"),
    "reduce_scatter_tensor": ("input", "scatter_input"),
    "all_to_all_single": ("input", "alltoall"),
}


def _signature(fn: Callable) -> inspect.Signature:
    """The real signature; ``deepspeed.comm``'s ``timed_op`` wraps without ``functools.wraps``."""
    signature = inspect.signature(fn)
    if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        for cell in fn.__closure__ or ():
            inner = cell.cell_contents
            if callable(inner) and getattr(inner, "__name__", None) == fn.__name__:
                return inspect.signature(inner)
        for cell in fn.__closure__ or ():
            if inspect.isfunction(cell.cell_contents):
                return inspect.signature(cell.cell_contents)
    return signature


def _nbytes(x: Any) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _dtype(x: Any) -> str:
    if torch.is_tensor(x):
        return str(x.dtype).removeprefix("torch.")
    if isinstance(x, (list, tuple)) and x:
        return _dtype(x[0])
    return ""


class CommCounter:
    """Counts collectives per ``(phase, source, op, group size, dtype)`` while ``phase`` is set.

    ``records[key] = [calls, payload_bytes, wire_bytes]``. Set ``counter.phase`` (any string)
    to count, ``None`` to stop; :meth:`during` does both. Set ``counter.seconds`` to a dict to
    also accumulate the wall time spent inside each collective (waiting for slower ranks
    included) under ``"source.op"``.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str, int, str], list[float]] = collections.defaultdict(
            lambda: [0, 0, 0.0]
        )
        self.phase: str | None = None
        # When a dict: seconds spent inside each collective (outermost calls), counted or not.
        self.seconds: dict[str, float] | None = None
        self._local = threading.local()
        self._installed = False

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def reset(self) -> None:
        self.records.clear()

    def install(self) -> CommCounter:
        if self._installed:
            return self
        import deepspeed.comm as ds_dist

        for name, rule in _DS_OPS.items():
            if hasattr(ds_dist, name):
                setattr(ds_dist, name, self._wrap(getattr(ds_dist, name), name, rule, "deepspeed"))
        for name, rule in _TORCH_OPS.items():
            setattr(dist, name, self._wrap(getattr(dist, name), name, rule, "torch"))
        self._installed = True
        return self

    def _wrap(self, original: Callable, name: str, rule: tuple[str | None, str], source: str) -> Callable:
        signature = _signature(original)
        argument, kind = rule

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0 and self.phase is not None:
                self._record(signature, args, kwargs, name, argument, kind, source)
            self._local.depth = depth + 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth
                if depth == 0 and self.seconds is not None:
                    key = f"{source}.{name}"
                    self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapped

    def _record(self, signature, args, kwargs, name, argument, kind, source) -> None:
        bound = signature.bind_partial(*args, **kwargs).arguments
        group = bound.get("group")
        size = dist.get_world_size(group=group)
        buffer = bound.get(argument) if argument else None
        payload = _nbytes(buffer)
        if size <= 1 or kind == "none":
            wire = 0.0
        elif kind == "allreduce":
            wire = 2 * (size - 1) / size * payload
        elif kind in ("rooted", "gather_output", "scatter_input"):
            wire = (size - 1) / size * payload
        elif kind == "gather_input":
            wire = (size - 1) * payload
        else:  # alltoall: exact elements sent to the other ranks
            splits = bound.get("input_split_sizes")
            if splits:
                per_row = buffer.numel() // max(buffer.shape[0], 1) * buffer.element_size()
                me = dist.get_rank(group=group)
                wire = float((sum(splits) - splits[me]) * per_row)
            else:
                wire = (size - 1) / size * payload
        record = self.records[(self.phase, source, name, size, _dtype(buffer))]
        record[0] += 1
        record[1] += payload
        record[2] += wire

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

The collectives, their buffers and the ``wire`` rule are the package's own
(``expertopt.demo_comm``, which the demo counts with): one definition of a byte.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from expertopt.demo_comm import (
    DEEPSPEED_OPS,
    TORCH_OPS,
    buffer_dtype,
    payload_bytes,
    sent_bytes,
    signature_of,
)
from expertopt.local_ranks import run_local_ranks

__all__ = ["CommCounter", "spawn"]


def spawn(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank (module-level ``fn``), joined through
    ``deepspeed.init_distributed``; per-rank results (:func:`expertopt.local_ranks.run_local_ranks`)."""
    return run_local_ranks(fn, world_size, *args, deepspeed=True)


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

        for name, rule in DEEPSPEED_OPS.items():
            if hasattr(ds_dist, name):
                setattr(ds_dist, name, self._wrap(getattr(ds_dist, name), name, rule, "deepspeed"))
        for name, rule in TORCH_OPS.items():
            setattr(dist, name, self._wrap(getattr(dist, name), name, rule, "torch"))
        self._installed = True
        return self

    def _wrap(self, original: Callable, name: str, rule: tuple[str | None, str], source: str) -> Callable:
        signature = signature_of(original)
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
        payload = payload_bytes(buffer)
        wire = sent_bytes(kind, bound, buffer, size)
        record = self.records[(self.phase, source, name, size, buffer_dtype(buffer))]
        record[0] += 1
        record[1] += payload
        record[2] += wire

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
import faulthandler
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

from expertopt.demo_comm import (
    DEEPSPEED_OPS,
    TORCH_OPS,
    buffer_dtype,
    payload_bytes,
    sent_bytes,
    signature_of,
)

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
        DS_ACCELERATOR="cpu",
    )  # no LOCAL_SIZE: DeepSpeed would leave a 69 MB /dev/shm buffer per rank behind (demo.py)
    faulthandler.enable()  # a rank that dies on a signal prints its Python stack
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while a peer's last collective is in flight
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

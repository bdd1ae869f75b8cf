"""Run a function on N gloo ranks (127.0.0.1, free port, one thread each) and collect results."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
    )
    faulthandler.enable()  # a rank that dies on a signal prints its Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears gloo down while a peer's last collective may still be in flight on its
        # sockets (a torn-down pair aborted a rank in CI: "terminate called without an active
        # exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank; returns the per-rank results in rank order.

    ``fn`` must be importable (module level) so spawn can pickle it.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]


@contextlib.contextmanager
def counting_newton_schulz() -> Iterator[dict[str, int]]:
    """Count the matrices this rank orthogonalizes in the distributed step (``counter["matrices"]``),
    by wrapping its one kernel call for the duration of the block."""
    import expertopt.distributed.step as step

    kernel = step.orthogonalize_updates
    counter = {"matrices": 0}

    def counted(matrices, **kwargs):
        counter["matrices"] += sum(m.reshape(-1, *m.shape[-2:]).shape[0] for m in matrices)
        return kernel(matrices, **kwargs)

    step.orthogonalize_updates = counted
    try:
        yield counter
    finally:
        step.orthogonalize_updates = kernel

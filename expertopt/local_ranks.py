"""Run a function on N local CPU ranks: gloo on 127.0.0.1, a free port, one torch thread each.

The one rank start-up the demo, the distributed tests and the benchmarks share. Each spawned
process sets the ``torch.distributed`` environment (``DS_ACCELERATOR=cpu``; no ``LOCAL_SIZE``:
with it DeepSpeed's CPU accelerator maps a 69 MB shared-memory all-reduce buffer per rank, used
only by its inference all-reduce, and never unlinks it, so every run would leave ``world`` x 69
MB in ``/dev/shm`` behind), joins the process group (through ``deepspeed.init_distributed`` when
asked, so DeepSpeed's communication layer is set up too), runs ``fn(rank, world_size, *args)``
and saves its result. A barrier precedes teardown: no rank closes its gloo pairs while a peer's
last collective may still be in flight on them (a torn-down pair aborted a rank in CI with
"terminate called without an active exception"). deepspeed is imported only inside the ranks
that ask for it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, deepspeed: bool
) -> None:
    os.environ.pop("LOCAL_SIZE", None)  # see the module docstring
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )
    faulthandler.enable()  # a rank that dies on a signal prints its Python stack
    torch.set_num_threads(1)  # small matrices: intra-op threads cost more than they save
    if deepspeed:
        import deepspeed as ds
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        ds.init_distributed(dist_backend="gloo", verbose=False)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except Exception:
        traceback.print_exc()  # the rank's own stack, before spawn reports the first failure
        raise
    finally:
        dist.destroy_process_group()


def run_local_ranks(fn: Callable, world_size: int, *args: Any, deepspeed: bool = False) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; their results in rank order.

    ``fn`` must be importable (module level) so spawn can pickle it; its results go through
    ``torch.save``. ``deepspeed``: join through ``deepspeed.init_distributed`` (gloo).
    """
    previous = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # children inherit it before they unpickle fn (and its imports)
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(
                _rank,
                args=(world_size, free_port(), out_dir, fn, args, deepspeed),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
            return [
                torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)
            ]
    finally:
        if previous is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = previous

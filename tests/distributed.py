"""Run a function on N gloo ranks (``expertopt.local_ranks``) and count Newton-Schulz calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from expertopt.local_ranks import run_local_ranks


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each rank (a module-level ``fn``, so spawn can pickle
    it); the per-rank results in rank order. Tests that use DeepSpeed call
    ``deepspeed.init_distributed`` inside ``fn``, which joins the group already up."""
    return run_local_ranks(fn, world_size, *args)


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

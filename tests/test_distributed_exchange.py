"""Gather-to-owner Newton-Schulz on flat partitions: every matrix once, results equal to the
single-process kernel (fp32: 1e-6, batched vs per-matrix differences only)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks

from expertopt.distributed._plan import assign_owners, plan_exchange
from expertopt.distributed._runtime import exchange_orthogonalize
from expertopt.distributed.layout import FlatLayout, matrices_of
from expertopt.kernels import orthogonalize

SHAPES = [torch.Size(s) for s in [(6, 10), (3, 4, 8), (12, 5), (2, 2, 7, 3), (9, 9)]]


def _layout(world_size: int, padding: int = 3) -> FlatLayout:
    starts, position = [], 0
    for shape in SHAPES:
        starts.append(position)
        position += shape.numel() + padding  # padding between parameters, as alignment adds
    partition = -(-position // world_size)
    return FlatLayout(matrices_of(SHAPES, starts, is_expert=True), partition, world_size)


def _flat_update(layout: FlatLayout) -> torch.Tensor:
    return torch.randn(layout.partition_size * layout.world_size, generator=torch.Generator().manual_seed(0))


def _exchange_on_rank(rank: int, world_size: int) -> tuple[torch.Tensor, int]:
    layout = _layout(world_size)
    owners = assign_owners(layout)
    plan = plan_exchange(layout, owners, rank)
    full = _flat_update(layout)
    local = full[rank * layout.partition_size : (rank + 1) * layout.partition_size].clone()
    count = 0

    def ortho(matrices):
        nonlocal count
        count += len(matrices)
        return [orthogonalize(m, dtype=torch.float32) for m in matrices]

    return exchange_orthogonalize(local, layout, plan, ortho), count


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_matrix_orthogonalized_once_and_correct(world_size):
    results = run_ranks(_exchange_on_rank, world_size)
    layout = _layout(world_size)
    full = _flat_update(layout)
    got = torch.cat([out for out, _ in results])
    expected = torch.zeros_like(full)
    for m in layout.matrices:
        expected[m.start : m.end] = orthogonalize(
            full[m.start : m.end].view(m.rows, m.cols), dtype=torch.float32
        ).reshape(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert sum(count for _, count in results) == len(layout.matrices)


def test_owners_are_balanced_and_prefer_holders():
    layout = _layout(4)
    owners = assign_owners(layout)
    assert set(owners) == {0, 1, 2, 3}
    # A matrix wholly inside one partition, with every rank equally loaded, stays home.
    single = FlatLayout(matrices_of([torch.Size((4, 4))] * 2, [0, 16]), 16, 2)
    assert assign_owners(single) == (0, 1)


def test_layout_rejects_overlaps():
    with pytest.raises(ValueError, match="overlaps another or runs past the flat buffer"):
        FlatLayout(matrices_of([torch.Size((4, 4))] * 2, [0, 10]), 16, 2)


def _sharded_muon_with_nan_on_rank0(rank: int, world_size: int) -> dict:
    import warnings

    import expertopt
    from expertopt.distributed.step import ShardedMatrices

    layout = _layout(world_size)
    flat = torch.nn.Parameter(
        _flat_update(layout)[rank * layout.partition_size : (rank + 1) * layout.partition_size]
    )
    optimizer = expertopt.Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "expert": True}])
    optimizer.param_groups[0]["params"] = [flat]  # as ZeRO does after building the optimizer
    optimizer.attach_shards({id(flat): ShardedMatrices(layout, rank)})
    optimizer.skip_agreement = True
    flat.grad = torch.randn(flat.shape)
    if rank == 0:
        flat.grad[0] = float("nan")
    before = flat.detach().clone()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        optimizer.step()  # without agreement rank 1 would wait in all_to_all for rank 0 forever
    flat.grad = torch.randn(flat.shape)
    return {"skipped": optimizer.nonfinite_steps, "unchanged": torch.equal(before, flat.detach())}


def test_ranks_agree_to_skip_a_nonfinite_step():
    results = run_ranks(_sharded_muon_with_nan_on_rank0, 2)
    assert results == [{"skipped": 1, "unchanged": True}] * 2

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
    from expertopt.optim._base import finite_flag

    def _agreed_finite(grads: list[torch.Tensor]) -> bool:  # what an engine adapter provides
        finite = finite_flag(grads)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    layout = _layout(world_size)
    flat = torch.nn.Parameter(
        _flat_update(layout)[rank * layout.partition_size : (rank + 1) * layout.partition_size]
    )
    optimizer = expertopt.Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "expert": True}])
    optimizer.param_groups[0]["params"] = [flat]  # as ZeRO does after building the optimizer
    optimizer.attach_shards({id(flat): ShardedMatrices(layout, rank)})
    optimizer.shared_finite_check = lambda grads: (_agreed_finite(grads), None)
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


def test_whole_matrices_stay_home_within_the_balance_budget():
    # 8 equal matrices, 2 whole ones in each of 4 partitions: nothing needs to travel.
    shapes = [torch.Size((4, 4))] * 8
    layout = FlatLayout(matrices_of(shapes, [16 * i for i in range(8)]), 32, 4)
    assert assign_owners(layout) == (0, 0, 1, 1, 2, 2, 3, 3)
    for rank in range(4):
        plan = plan_exchange(layout, assign_owners(layout), rank)
        assert plan.send_sizes[rank] == sum(plan.send_sizes) == 32  # every piece goes to itself
        assert plan.local_only


def test_local_only_plans_run_without_collectives():
    # No process group exists here: any collective would raise. Each "rank" orthogonalizes its
    # own two whole matrices, and the result equals the single-process kernel.
    shapes = [torch.Size((4, 4))] * 8
    layout = FlatLayout(matrices_of(shapes, [16 * i for i in range(8)]), 32, 4)
    full = _flat_update(layout)
    owners = assign_owners(layout)
    for rank in range(4):
        local = full[rank * 32 : (rank + 1) * 32].clone()
        out = exchange_orthogonalize(
            local, layout, plan_exchange(layout, owners, rank), lambda ms: [orthogonalize(m) for m in ms]
        )
        for m in layout.matrices[2 * rank : 2 * rank + 2]:
            expected = orthogonalize(full[m.start : m.end].view(m.rows, m.cols)).reshape(-1)
            assert torch.equal(out[m.start - rank * 32 : m.end - rank * 32], expected)
    # One straddling matrix anywhere makes every rank exchange.
    straddling = FlatLayout(matrices_of([torch.Size((4, 6))] * 2, [0, 24]), 16, 3)
    assert not any(plan_exchange(straddling, assign_owners(straddling), r).local_only for r in range(3))


def test_idle_ranks_take_matrices_past_the_budget():
    # Four equal matrices all held by ranks 0 and 1 (ranks 2 and 3 hold padding only): keeping
    # them home would double those ranks' Newton-Schulz work, past the 1.15x budget.
    layout = FlatLayout(matrices_of([torch.Size((8, 8))] * 4, [0, 64, 128, 192]), 128, 4)
    owners = assign_owners(layout)
    assert sorted(owners) == [0, 1, 2, 3]
    assert owners[0] in (0, 2, 3) and owners[2] in (1, 2, 3)


def test_reply_travels_in_the_newton_schulz_dtype():
    from expertopt.distributed.step import ShardedMatrices

    shard = ShardedMatrices(_layout(2), 0)
    like = torch.zeros(1)
    assert shard.reply_dtype("standard", "auto", like) == torch.bfloat16  # bf16 on CPU: exact, half the bytes
    assert shard.reply_dtype("standard", "float32", like) == torch.float32
    assert shard.reply_dtype("gram", "auto", like) == torch.float32  # gram runs in fp32 on CPU


def _replicated_vs_local(rank: int, world_size: int) -> dict:
    from expertopt.distributed.replicated import ReplicaGroup, replicated_muon_step
    from expertopt.updates.muon import MuonHyperparams, muon_step

    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 6, 4), (8, 8)]  # a 2-D weight, 3 stacked experts, a square weight
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    hyper = MuonHyperparams(
        lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_method="standard", ns_steps=5,
        ns_coefficients=(3.4445, -4.775, 2.0315), ns_dtype=torch.float32, eps=1e-7, adjust_lr_fn=None,
    )  # fmt: skip
    local = [p.clone() for p in params]
    muon_step(local, grads, [torch.zeros_like(g) for g in grads], hyper, is_expert=True)
    replicated_muon_step(
        params, grads, [torch.zeros_like(g) for g in grads], ReplicaGroup(), hyper, is_expert=True
    )
    return {
        "params": params,
        "error": max((a - b).abs().max().item() for a, b in zip(params, local, strict=True)),
    }


@pytest.mark.parametrize("world_size", [1, 3])
def test_replicated_step_equals_local_step_on_every_rank(world_size):
    results = run_ranks(_replicated_vs_local, world_size)
    assert max(r["error"] for r in results) < 1e-6  # fp32: batching differences only
    for other in results[1:]:  # every rank applies the same gathered bits
        assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], other["params"], strict=True))

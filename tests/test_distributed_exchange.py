"""Gather-to-owner Newton-Schulz on every shard description (ZeRO-1/2 flat partitions, ZeRO-3
per-parameter partitions, ZeRO-0 replicas): every matrix once, results equal to the
single-process kernel (fp32: 1e-6, batched vs per-matrix differences only)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks

from expertopt.distributed._plan import assign_owners, matrix_costs, plan_exchange
from expertopt.distributed._runtime import exchange_orthogonalize
from expertopt.distributed.layout import (
    Piece,
    ShardLayout,
    ShardMatrix,
    flat_partition_layout,
    param_partition_layout,
    replicated_layout,
)
from expertopt.kernels import orthogonalize

SHAPES = [torch.Size(s) for s in [(6, 10), (3, 4, 8), (12, 5), (2, 2, 7, 3), (9, 9)]]


def _flat_layout(world_size: int, padding: int = 3) -> ShardLayout:
    starts, position = [], 0
    for shape in SHAPES:
        starts.append(position)
        position += shape.numel() + padding  # padding between parameters, as alignment adds
    partition = -(-position // world_size)
    return flat_partition_layout(SHAPES, starts, partition, world_size, is_expert=True)


def _zero3_layout(world_size: int) -> ShardLayout:
    return param_partition_layout(
        SHAPES, [-(-s.numel() // world_size) for s in SHAPES], world_size, is_expert=True
    )


def _replicated_layout(world_size: int) -> ShardLayout:
    return replicated_layout(SHAPES, world_size, is_expert=True)


LAYOUTS = {"zero12": _flat_layout, "zero3": _zero3_layout, "replicated": _replicated_layout}


def _full_matrices(layout: ShardLayout) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(m.rows, m.cols, generator=generator) for m in layout.matrices]


def _local_buffers(layout: ShardLayout, rank: int, full: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``rank`` holds: its pieces at their offsets, NaN elsewhere (padding must not leak)."""
    buffers = [torch.full((n,), float("nan")) for n in layout.buffer_numels]
    for matrix, values in zip(layout.matrices, full, strict=True):
        for p in matrix.pieces:
            if p.rank == rank:
                buffers[p.buffer][p.offset : p.offset + p.numel] = values.reshape(-1)[
                    p.start : p.start + p.numel
                ]
    return buffers


def _exchange_on_rank(rank: int, world_size: int) -> dict[str, tuple[list[torch.Tensor], int]]:
    results = {}
    for kind, build in LAYOUTS.items():  # one launch for every description: spawns cost seconds
        layout = build(world_size)
        plan = plan_exchange(layout, assign_owners(layout), rank)
        count = 0

        def ortho(matrices):
            nonlocal count
            count += len(matrices)
            assert all(torch.isfinite(m).all() for m in matrices)  # padding never reaches a matrix
            return [orthogonalize(m, dtype=torch.float32) for m in matrices]

        buffers = _local_buffers(layout, rank, _full_matrices(layout))
        results[kind] = (exchange_orthogonalize(buffers, layout, plan, ortho), count)
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_matrix_orthogonalized_once_and_correct(world_size):
    per_rank = run_ranks(_exchange_on_rank, world_size)
    for kind, build in LAYOUTS.items():
        results = [r[kind] for r in per_rank]
        layout = build(world_size)
        expected = [orthogonalize(m, dtype=torch.float32).reshape(-1) for m in _full_matrices(layout)]
        for rank, (outs, _) in enumerate(results):
            for matrix, want in zip(layout.matrices, expected, strict=True):
                for p in matrix.pieces:
                    if p.rank == rank:
                        got = outs[p.buffer][p.offset : p.offset + p.numel]
                        torch.testing.assert_close(got, want[p.start : p.start + p.numel], atol=1e-6, rtol=0)
        assert sum(count for _, count in results) == len(layout.matrices), kind
        if kind == "replicated":  # every replica applies the very same bits
            assert all(
                torch.equal(a, b) for r in results[1:] for a, b in zip(r[0], results[0][0], strict=True)
            )


def test_layouts_place_pieces_where_the_engines_put_them():
    # ZeRO-3: a 4x4 matrix over 3 ranks is cut in chunks of 6 (the last padded), and each
    # rank's buffer is its chunk of each parameter back to back.
    layout = param_partition_layout([torch.Size((4, 4)), torch.Size((2, 3))], [6, 2], 3)
    assert layout.buffer_numels == (8,)
    assert layout.matrices[0].pieces == (Piece(0, 0, 0, 0, 6), Piece(1, 0, 0, 6, 6), Piece(2, 0, 0, 12, 4))
    assert layout.matrices[1].pieces == (Piece(0, 0, 6, 0, 2), Piece(1, 0, 6, 2, 2), Piece(2, 0, 6, 4, 2))
    # ZeRO-1/2: the global slice [r * P, (r + 1) * P) of one flat buffer.
    flat = flat_partition_layout([torch.Size((4, 4))], [5], 8, 3)
    assert flat.matrices[0].pieces == (Piece(0, 0, 5, 0, 3), Piece(1, 0, 0, 3, 8), Piece(2, 0, 0, 11, 5))
    assert replicated_layout([torch.Size((2, 3, 4))], 2, is_expert=True).matrices[1].pieces == (
        Piece(0, 0, 12, 0, 12),
        Piece(1, 0, 12, 0, 12),
    )


def test_layout_rejects_overlaps_and_gaps():
    with pytest.raises(ValueError, match="runs past the flat buffer"):
        flat_partition_layout([torch.Size((4, 4))] * 2, [0, 24], 16, 2)
    with pytest.raises(ValueError, match="overlap in buffer 0 of rank 0"):
        flat_partition_layout([torch.Size((4, 4))] * 2, [0, 10], 16, 2)
    with pytest.raises(ValueError, match="must tile it exactly once"):
        ShardLayout((ShardMatrix(2, 2, (Piece(0, 0, 0, 0, 2), Piece(1, 0, 0, 3, 1)), 0),), 2, (4,))


def test_owners_are_balanced_and_prefer_holders():
    layout = _flat_layout(4)
    owners = assign_owners(layout)
    assert set(owners) == {0, 1, 2, 3}
    # A matrix wholly inside one partition, with every rank equally loaded, stays home.
    single = flat_partition_layout([torch.Size((4, 4))] * 2, [0, 16], 16, 2)
    assert assign_owners(single) == (0, 1)
    # Replicated matrices: no locality, plain longest-processing-time balance.
    assert sorted(assign_owners(replicated_layout([torch.Size((4, 4, 4))], 4, is_expert=True))) == [
        0,
        1,
        2,
        3,
    ]


def test_owners_are_costed_by_the_groups_method_and_steps():
    layout = replicated_layout([torch.Size((64, 8)), torch.Size((16, 16))], 2)
    standard, gram = matrix_costs(layout, "standard", 5), matrix_costs(layout, "gram", 5)
    assert gram[0] < standard[0] and gram[1] == standard[1]  # Gram saves on the tall matrix only
    assert matrix_costs(layout, "standard", 10) == [2 * c for c in standard]


def test_whole_matrices_stay_home_within_the_balance_budget():
    # 8 equal matrices, 2 whole ones in each of 4 partitions: nothing needs to travel.
    layout = flat_partition_layout([torch.Size((4, 4))] * 8, [16 * i for i in range(8)], 32, 4)
    assert assign_owners(layout) == (0, 0, 1, 1, 2, 2, 3, 3)
    for rank in range(4):
        plan = plan_exchange(layout, assign_owners(layout), rank)
        assert plan.send_sizes[rank] == sum(plan.send_sizes) == 32  # every piece goes to itself
        assert plan.send_runs == ((0, 0, 32),)  # adjacent matrices move as one slice
        assert plan.local_only


def test_local_only_plans_run_without_collectives():
    # No process group exists here: any collective would raise. Each "rank" orthogonalizes its
    # own two whole matrices, and the result equals the single-process kernel.
    layout = flat_partition_layout([torch.Size((4, 4))] * 8, [16 * i for i in range(8)], 32, 4)
    full = _full_matrices(layout)
    owners = assign_owners(layout)
    for rank in range(4):
        (out,) = exchange_orthogonalize(
            _local_buffers(layout, rank, full), layout, plan_exchange(layout, owners, rank),
            lambda ms: [orthogonalize(m) for m in ms],
        )  # fmt: skip
        for k in range(2):
            expected = orthogonalize(full[2 * rank + k]).reshape(-1)
            assert torch.equal(out[16 * k : 16 * (k + 1)], expected)
    # One straddling matrix anywhere makes every rank exchange; so does any replica.
    straddling = flat_partition_layout([torch.Size((4, 6))] * 2, [0, 24], 16, 3)
    assert not any(plan_exchange(straddling, assign_owners(straddling), r).local_only for r in range(3))
    replicas = _replicated_layout(2)
    assert not plan_exchange(replicas, assign_owners(replicas), 0).local_only


def test_idle_ranks_take_matrices_past_the_budget():
    # Four equal matrices all held by ranks 0 and 1 (ranks 2 and 3 hold padding only): keeping
    # them home would double those ranks' Newton-Schulz work, past the 1.15x budget.
    layout = flat_partition_layout([torch.Size((8, 8))] * 4, [0, 64, 128, 192], 128, 4)
    owners = assign_owners(layout)
    assert sorted(owners) == [0, 1, 2, 3]
    assert owners[0] in (0, 2, 3) and owners[2] in (1, 2, 3)


def test_reply_travels_in_the_newton_schulz_dtype(monkeypatch):
    from expertopt.distributed.step import ShardedMatrices
    from expertopt.kernels import newton_schulz

    shard = ShardedMatrices(_flat_layout(2), 0)
    like = torch.zeros(1)
    monkeypatch.setattr(newton_schulz, "_CPU_BF16_MATMUL_IS_FAST", True)
    assert shard.reply_dtype("standard", "auto", like) == torch.bfloat16  # bf16: exact, half the bytes
    assert shard.reply_dtype("standard", "bfloat16", like) == torch.bfloat16
    monkeypatch.setattr(newton_schulz, "_CPU_BF16_MATMUL_IS_FAST", False)
    assert shard.reply_dtype("standard", "auto", like) == torch.float32  # auto runs fp32 on this CPU
    assert shard.reply_dtype("standard", "float32", like) == torch.float32
    assert shard.reply_dtype("gram", "auto", like) == torch.float32  # gram runs in fp32 on CPU


def _sharded_muon_with_nan_on_rank0(rank: int, world_size: int) -> dict:
    import warnings

    import expertopt
    from expertopt.distributed.step import ShardedMatrices
    from expertopt.optim._base import finite_flag

    def _agreed_finite(grads: list[torch.Tensor]) -> bool:  # what an engine adapter provides
        finite = finite_flag(grads)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    layout = _flat_layout(world_size)
    flat = torch.nn.Parameter(torch.nan_to_num(_local_buffers(layout, rank, _full_matrices(layout))[0]))
    optimizer = expertopt.Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "expert": True}])
    optimizer.param_groups[0]["params"] = [flat]  # as ZeRO does after building the optimizer
    optimizer.place_shards([(flat, ShardedMatrices(layout, rank))])
    optimizer.shared_finite_check = lambda grads: (_agreed_finite(grads), None)
    flat.grad = torch.randn(flat.shape)
    if rank == 0:
        flat.grad[0] = float("nan")
    before = flat.detach().clone()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        optimizer.step()  # without agreement rank 1 would wait in all_to_all for rank 0 forever
    return {"skipped": optimizer.nonfinite_steps, "unchanged": torch.equal(before, flat.detach())}


def test_ranks_agree_to_skip_a_nonfinite_step():
    results = run_ranks(_sharded_muon_with_nan_on_rank0, 2)
    assert results == [{"skipped": 1, "unchanged": True}] * 2


def _disagreeing_descriptions(rank: int, world_size: int) -> str:
    import expertopt
    from expertopt.distributed.step import ShardedMatrices

    # Rank 1 believes in another partition size: its exchange would have another shape.
    layout = flat_partition_layout([torch.Size((4, 4))] * 2, [0, 16], 16 + 8 * rank, world_size)
    flat = torch.nn.Parameter(torch.zeros(layout.buffer_numels[0]))
    optimizer = expertopt.Muon([torch.nn.Parameter(torch.randn(4, 4))])
    optimizer.param_groups[0]["params"] = [flat]
    try:
        optimizer.place_shards([(flat, ShardedMatrices(layout, rank))])
    except ValueError as error:
        return str(error)
    return "no error"


def test_ranks_that_disagree_on_the_description_all_raise():
    messages = run_ranks(_disagreeing_descriptions, 2)
    assert all("ranks disagree on where the Muon matrices live" in m for m in messages), messages


def _replicated_vs_local(rank: int, world_size: int) -> dict:
    from expertopt.distributed.step import ShardedMatrices, sharded_muon_step
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
    unit = ShardedMatrices(
        replicated_layout([torch.Size(s) for s in shapes], world_size, is_expert=True), rank
    )
    sharded_muon_step(params, grads, [torch.zeros_like(g) for g in grads], unit, hyper)
    return {
        "params": params,
        "error": max((a - b).abs().max().item() for a, b in zip(params, local, strict=True)),
        "owned": unit.owned_matrices,
    }


@pytest.mark.parametrize("world_size", [1, 3])
def test_replicated_step_equals_local_step_on_every_rank(world_size):
    results = run_ranks(_replicated_vs_local, world_size)
    # The same arithmetic as the single-process step (foreach add at the adjusted lr per shape):
    # the same bits, so owners vs every-rank Newton-Schulz cannot drift apart over a run.
    assert max(r["error"] for r in results) == 0.0
    assert sum(r["owned"] for r in results) == 1 + 3 + 1
    for other in results[1:]:  # every rank applies the same gathered bits
        assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], other["params"], strict=True))

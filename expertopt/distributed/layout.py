"""Where each matrix of a flat, partitioned parameter group lives: the shard description.

ZeRO-1/2 flattens a param group into one buffer (parameters at known offsets, padding allowed)
and gives rank ``r`` of the partitioning group the slice ``[r * P, (r + 1) * P)``. Elementwise
work (momentum, AdamW) runs on that slice as it is; Newton-Schulz needs whole matrices. A
:class:`FlatLayout` lists the *matrices* (not parameters: a stacked ``[E, m, n]`` expert tensor
is E matrices, an attention weight with ``num_heads`` is one matrix per head), each a
contiguous ``m * n`` run of the flat buffer, so ownership can be balanced per matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertopt.updates.muon import matrix_view

__all__ = ["FlatLayout", "FlatMatrix", "matrices_of"]


@dataclass(frozen=True, slots=True)
class FlatMatrix:
    """One matrix: ``rows * cols`` contiguous elements from ``start`` of the flat buffer."""

    start: int
    rows: int
    cols: int
    param: int  # index of the parameter it belongs to, for error messages
    layout: str = "out_in"  # storage orientation, for the lr scale (see adjusted_lr)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def end(self) -> int:
        return self.start + self.numel


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """The matrices of one flat group and its equal partitions over ``world_size`` ranks."""

    matrices: tuple[FlatMatrix, ...]
    partition_size: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.partition_size < 0:
            raise ValueError(
                f"bad partitioning: world_size={self.world_size}, partition_size={self.partition_size}"
            )
        total = self.partition_size * self.world_size
        previous_end = 0
        for matrix in self.matrices:
            if matrix.start < previous_end or matrix.end > total:
                raise ValueError(
                    f"matrix of parameter {matrix.param} at [{matrix.start}, {matrix.end}) overlaps another "
                    f"or runs past the flat buffer of {total} elements"
                )
            previous_end = matrix.end

    def piece(self, index: int, rank: int) -> tuple[int, int]:
        """Flat ``[lo, hi)`` of matrix ``index`` held by ``rank`` (``lo == hi`` when none)."""
        matrix = self.matrices[index]
        lo = max(matrix.start, rank * self.partition_size)
        hi = min(matrix.end, (rank + 1) * self.partition_size)
        return (lo, hi) if lo < hi else (lo, lo)

    def holders(self, index: int) -> list[int]:
        """Ranks holding part of matrix ``index``."""
        matrix = self.matrices[index]
        first = matrix.start // self.partition_size if self.partition_size else 0
        last = (matrix.end - 1) // self.partition_size if self.partition_size else 0
        return list(range(first, min(last, self.world_size - 1) + 1))


def matrices_of(
    shapes: list[torch.Size],
    starts: list[int],
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> tuple[FlatMatrix, ...]:
    """Split parameters (shape, flat start) into their matrices, in flat order.

    Uses :func:`expertopt.updates.muon.matrix_view`, the same view the single-process step
    orthogonalizes, so sharded and unsharded Muon see the same matrices.
    """
    matrices = []
    for index, (shape, start) in enumerate(zip(shapes, starts, strict=True)):
        view = matrix_view(
            torch.empty(shape, device="meta"),
            is_expert=is_expert, num_heads=num_heads, matrix_layout=matrix_layout, row_blocks=row_blocks,
        )  # fmt: skip
        rows, cols = view.shape[-2:]
        count = math.prod(view.shape[:-2])
        matrices.extend(
            FlatMatrix(start + k * rows * cols, rows, cols, index, matrix_layout) for k in range(count)
        )
    return tuple(matrices)

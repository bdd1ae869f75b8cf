"""Where each matrix lives: the shard description every distributed Muon step runs on.

An engine keeps each rank's share of a param group in local buffers: ZeRO-1/2 one flat
partition (the global slice ``[r * P, (r + 1) * P)`` of the group's flat buffer), ZeRO-3 one flat
partition per sub-group (this rank's chunk of *each* of the sub-group's parameters, back to
back), ZeRO-0 the whole parameters on every rank. A :class:`ShardLayout` says, for every matrix
(not parameter: a stacked ``[E, m, n]`` expert tensor is E matrices, a weight with ``num_heads``
one matrix per head), which :class:`Piece` of it lives on which rank, in which local buffer, at
which offset. Elementwise work (momentum, AdamW) runs on the buffers as they are; Newton-Schulz
needs whole matrices, which the plan (``_plan``) and the runtime (``_runtime``) assemble from
the pieces. The builders below translate each stage's partitioning; an FSDP2 adapter would only
add one more.

A matrix is either *partitioned* (its pieces tile it, each element on exactly one rank) or
*replicated* (every piece is the whole matrix, one per holding rank).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertopt.updates.muon import matrix_view

__all__ = [
    "FlatMatrix",
    "Piece",
    "ShardLayout",
    "ShardMatrix",
    "flat_partition_layout",
    "matrices_of",
    "param_partition_layout",
    "replicated_layout",
]


@dataclass(frozen=True, slots=True)
class FlatMatrix:
    """One matrix: ``rows * cols`` contiguous elements from ``start`` of a flat buffer."""

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
class Piece:
    """``numel`` elements of a matrix from row-major position ``start``, held by ``rank`` at
    ``offset`` of its local buffer number ``buffer``."""

    rank: int
    buffer: int
    offset: int
    start: int
    numel: int


@dataclass(frozen=True, slots=True)
class ShardMatrix:
    """One matrix and the pieces it is held in."""

    rows: int
    cols: int
    pieces: tuple[Piece, ...]
    param: int  # index of its parameter in the unit, for error messages
    layout: str = "out_in"  # storage orientation, for the lr scale (see adjusted_lr)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def replicated(self) -> bool:
        return all(p.start == 0 and p.numel == self.numel for p in self.pieces)

    def held(self, rank: int) -> int:
        """Elements of this matrix ``rank`` holds."""
        return sum(p.numel for p in self.pieces if p.rank == rank)


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """Every matrix of one unit (what one optimizer call steps together) over ``world_size``
    ranks; every rank holds ``len(buffer_numels)`` local buffers of those sizes."""

    matrices: tuple[ShardMatrix, ...]
    world_size: int
    buffer_numels: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        runs: list[tuple[int, int, int, int, int]] = []
        for index, matrix in enumerate(self.matrices):
            self._check_pieces(index, matrix)
            runs.extend((p.rank, p.buffer, p.offset, p.offset + p.numel, index) for p in matrix.pieces)
        runs.sort()
        for (rank, buffer, _, end, index), (rank2, buffer2, lo, _, other) in itertools.pairwise(runs):
            if (rank, buffer) == (rank2, buffer2) and lo < end:
                raise ValueError(
                    f"matrices {index} and {other} overlap in buffer {buffer} of rank {rank}: "
                    "each local element belongs to at most one matrix"
                )

    def _check_pieces(self, index: int, matrix: ShardMatrix) -> None:
        for p in matrix.pieces:
            if not (0 <= p.rank < self.world_size and 0 <= p.buffer < len(self.buffer_numels)):
                raise ValueError(f"matrix {index}: piece {p} names a rank or buffer that does not exist")
            if p.offset < 0 or p.offset + p.numel > self.buffer_numels[p.buffer] or p.numel <= 0:
                raise ValueError(
                    f"matrix {index} (parameter {matrix.param}): piece {p} runs past its buffer of "
                    f"{self.buffer_numels[p.buffer]} elements"
                )
        if matrix.replicated:
            ranks = [p.rank for p in matrix.pieces]
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"matrix {index}: a replicated matrix is held twice by one rank")
            return
        position = 0
        for p in sorted(matrix.pieces, key=lambda p: p.start):
            if p.start != position:
                raise ValueError(
                    f"matrix {index} (parameter {matrix.param}): its pieces must tile it exactly once, "
                    f"found a gap or overlap at element {position}"
                )
            position += p.numel
        if position != matrix.numel:
            raise ValueError(f"matrix {index}: its pieces cover {position} of {matrix.numel} elements")

    def fingerprint(self) -> bytes:
        """A digest of the description, equal on ranks that agree on it (checked at attach time)."""
        text = repr((self.world_size, self.buffer_numels, self.matrices))
        return hashlib.sha256(text.encode()).digest()


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


def _cut(matrix: FlatMatrix, chunk: int, base: int = 0) -> tuple[Piece, ...]:
    """Pieces of a matrix in a flat space cut into ``chunk``-sized rank slices; each rank's
    slice sits at ``base`` of its single local buffer."""
    pieces = []
    position = matrix.start
    while position < matrix.end:
        rank = position // chunk
        hi = min(matrix.end, (rank + 1) * chunk)
        pieces.append(Piece(rank, 0, base + position - rank * chunk, position - matrix.start, hi - position))
        position = hi
    return tuple(pieces)


def flat_partition_layout(
    shapes: Sequence[torch.Size],
    starts: Sequence[int],
    partition_size: int,
    world_size: int,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> ShardLayout:
    """ZeRO-1/2: parameters at ``starts`` of one flat buffer, rank ``r`` holding the global
    slice ``[r * partition_size, (r + 1) * partition_size)`` as its single local buffer."""
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size}")
    matrices = []
    for flat in matrices_of(
        list(shapes),
        list(starts),
        is_expert=is_expert,
        num_heads=num_heads,
        matrix_layout=matrix_layout,
        row_blocks=row_blocks,
    ):
        if flat.start < 0 or flat.end > partition_size * world_size:
            raise ValueError(
                f"matrix of parameter {flat.param} at [{flat.start}, {flat.end}) runs past the flat buffer "
                f"of {partition_size * world_size} elements"
            )
        pieces = _cut(flat, partition_size)
        matrices.append(ShardMatrix(flat.rows, flat.cols, pieces, flat.param, flat.layout))
    return ShardLayout(tuple(matrices), world_size, (partition_size,))


def param_partition_layout(
    shapes: Sequence[torch.Size],
    partition_numels: Sequence[int],
    world_size: int,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> ShardLayout:
    """ZeRO-3: each parameter cut into ``world_size`` chunks of ``partition_numels[i]`` elements
    (the last padded); rank ``r``'s single local buffer is its chunk of every parameter, in order."""
    matrices = []
    offset = 0
    for index, (shape, chunk) in enumerate(zip(shapes, partition_numels, strict=True)):
        numel = math.prod(shape)
        if chunk * world_size < numel:
            raise ValueError(f"parameter {index}: {world_size} partitions of {chunk} cannot hold {numel}")
        for flat in matrices_of(
            [torch.Size(shape)],
            [0],
            is_expert=is_expert,
            num_heads=num_heads,
            matrix_layout=matrix_layout,
            row_blocks=row_blocks,
        ):
            matrices.append(ShardMatrix(flat.rows, flat.cols, _cut(flat, chunk, offset), index, flat.layout))
        offset += chunk
    return ShardLayout(tuple(matrices), world_size, (offset,))


def replicated_layout(
    shapes: Sequence[torch.Size],
    world_size: int,
    *,
    is_expert: bool = False,
    num_heads: int | None = None,
    matrix_layout: str = "out_in",
    row_blocks: int | None = None,
) -> ShardLayout:
    """ZeRO-0: every rank holds every parameter whole; parameter ``i`` is local buffer ``i``."""
    matrices = []
    for index, shape in enumerate(shapes):
        for flat in matrices_of(
            [torch.Size(shape)],
            [0],
            is_expert=is_expert,
            num_heads=num_heads,
            matrix_layout=matrix_layout,
            row_blocks=row_blocks,
        ):
            pieces = tuple(Piece(rank, index, flat.start, 0, flat.numel) for rank in range(world_size))
            matrices.append(ShardMatrix(flat.rows, flat.cols, pieces, index, flat.layout))
    return ShardLayout(tuple(matrices), world_size, tuple(math.prod(s) for s in shapes))

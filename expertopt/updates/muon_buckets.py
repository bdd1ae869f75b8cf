"""Same-shape Muon matrices laid out once, so a step costs a fixed number of ops per shape (issue 12).

A Muon step on N matrices of K distinct shapes should launch O(K) kernels, not O(N): on a GPU
every op is a launch, and fine-grained MoE models carry hundreds of small expert matrices per
layer. :func:`plan_buckets` decides, once per parameter list, where every matrix lives:

- the **momentum** of each bucket of same-shape matrices is one contiguous ``[B, m, n]`` block of
  a flat buffer; each parameter's ``momentum_buffer`` (what ``state_dict`` saves, torch's key) is
  a view of its slice, so checkpoints keep torch's per-parameter layout;
- one **workspace** ``[B, m, n]`` per bucket, all sharing one flat buffer the size of the largest
  bucket (buckets run one after another): gradients are copied in with one ``_foreach_copy_``,
  the Nesterov blend and Newton-Schulz run on it stacked, and the scaled result is written back
  into it and added to the parameters with one ``_foreach_add_``;
- the per-bucket lr scales (``AdjustLR`` of the bucket's shape) sit in one small tensor, so a
  tensor lr scales every bucket with one op and no host sync;
- on CPU, one Newton-Schulz **workspace** (:class:`expertopt.kernels.Workspace`) per compute
  dtype, the size of the largest bucket's (a CPU chunk at most), also shared: glibc hands large
  freed blocks back to the OS, so buffers allocated per step are page-faulted in again every step
  (about 10% of the MoE bench step, docs/benchmarks.md). Accelerators allocate per call: their
  caching allocators reuse blocks, and a buffer held across steps would add to the memory peak
  of forward and backward.

Every view is built here, at plan time: views are ops too (``aten::view``), and building them per
step would bring back the per-matrix loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from expertopt.kernels import Workspace, resolve_ns_dtype, workspace_shape

__all__ = ["MatrixGeometry", "MuonBucket", "MuonPartition", "MuonPlan", "plan_buckets"]


@dataclass(frozen=True, slots=True)
class MatrixGeometry:
    """How one parameter enters Newton-Schulz: decided once per distinct shape by the update rule."""

    matrix_shape: tuple[int, int]
    """``(m, n)`` of each matrix, as Newton-Schulz sees it."""
    transposed: bool
    """The matrices are the transposes of the parameter's last two dims (input-major storage)."""
    lr_scale: float
    """``AdjustLR`` of the matrix shape at lr 1."""
    method: str
    """Resolved Newton-Schulz method."""


@dataclass(frozen=True, eq=False, slots=True)
class MuonBucket:
    """Matrices of one shape, scale and method (and one dtype and device): one Newton-Schulz call."""

    indices: tuple[int, ...]
    """Positions of the bucket's parameters in the planned list."""
    params: list[Tensor]
    method: str
    momentum: Tensor
    """``[B, m, n]``: the bucket's momentum, stacked."""
    work: Tensor
    """``[B, m, n]``: gradient, then direction, then scaled update (shared storage, see module doc)."""
    work_views: list[Tensor]
    """Parameter-shaped views of ``work``, in ``indices`` order."""
    step_scale: Tensor
    """``[1, 1, 1]`` view of the partition's ``step_scales``: ``-lr * AdjustLR`` this step."""
    ns_workspace: Workspace | None
    """Newton-Schulz buffers for this bucket (CPU), views of the partition's shared ones."""


@dataclass(frozen=True, eq=False, slots=True)
class MuonPartition:
    """The buckets of one (dtype, device): they share a momentum buffer, a workspace and the scales."""

    buckets: list[MuonBucket]
    unit_scales: Tensor
    """``[K, 1, 1, 1]`` fp32: ``AdjustLR`` at lr 1 of each bucket."""
    step_scales: Tensor
    """``[K, 1, 1, 1]`` fp32, rewritten every step."""


@dataclass(frozen=True, eq=False, slots=True)
class MuonPlan:
    """Where every matrix of a parameter list lives during a step; see the module docstring."""

    params: list[Tensor]
    momentum_views: list[Tensor]
    """Parameter-shaped views of the stacked momentum, in parameter order: the optimizer's state."""
    partitions: list[MuonPartition]


def _param_view(flat: Tensor, offset: int, shape: torch.Size, layout: MatrixGeometry) -> Tensor:
    """The slice of a stacked ``[B, m, n]`` buffer that holds one parameter, viewed in its own shape."""
    m, n = layout.matrix_shape
    chunk = flat[offset : offset + shape.numel()].view(-1, m, n)
    if layout.transposed:
        chunk = chunk.mT  # [count, n, m] = the stored [..., in, out] with leading dims merged
    return chunk.view(shape)


def _bucket_keys(params: Sequence[Tensor], layouts: Sequence[MatrixGeometry]) -> dict[tuple, list[int]]:
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for index, (param, layout) in enumerate(zip(params, layouts, strict=True)):
        key = (param.dtype, param.device, layout.matrix_shape, layout.lr_scale, layout.method)
        buckets[key].append(index)
    return buckets


def _ns_workspaces(
    buckets: list[tuple[tuple, list[int]]], sizes: list[int], ns_dtype: str | torch.dtype
) -> list[Workspace | None]:
    """Each bucket's Newton-Schulz workspace, cut from one pair of buffers per compute dtype (CPU only)."""
    device = buckets[0][0][1]
    if device.type != "cpu":
        return [None] * len(buckets)
    shapes = []
    for ((_, _, (m, n), _, method), _), size in zip(buckets, sizes, strict=True):
        compute = resolve_ns_dtype(ns_dtype, device, method)
        shapes.append((compute, workspace_shape((size // (m * n), m, n), compute, device, method)))
    numels: dict[torch.dtype, tuple[int, int]] = {}
    for compute, (batch, rows, cols) in shapes:
        iterates, squares = numels.get(compute, (0, 0))
        short = min(rows, cols)
        numels[compute] = (max(iterates, 2 * batch * rows * cols), max(squares, 2 * batch * short * short))
    buffers = {
        compute: (torch.empty(i, dtype=compute, device=device), torch.empty(q, dtype=compute, device=device))
        for compute, (i, q) in numels.items()
    }
    return [Workspace.inside(*buffers[compute], shape) for compute, shape in shapes]


def _plan_partition(
    params: Sequence[Tensor],
    layouts: Sequence[MatrixGeometry],
    buckets: list[tuple[tuple, list[int]]],
    ns_dtype: str | torch.dtype,
) -> tuple[MuonPartition, dict[int, Tensor]]:
    """Allocate one partition's momentum, workspaces and scales, and cut every view out of them."""
    dtype, device = buckets[0][0][:2]
    sizes = [sum(params[i].numel() for i in indices) for _, indices in buckets]
    ns_workspaces = _ns_workspaces(buckets, sizes, ns_dtype)
    momentum = torch.zeros(sum(sizes), dtype=dtype, device=device)
    work = torch.empty(max(sizes), dtype=dtype, device=device)
    unit_scales = torch.tensor([key[3] for key, _ in buckets], dtype=torch.float32, device=device)
    unit_scales = unit_scales.view(-1, 1, 1, 1)
    step_scales = torch.empty_like(unit_scales)
    momentum_by_index: dict[int, Tensor] = {}
    planned, start = [], 0
    for slot, ((_, _, (m, n), _, method), indices) in enumerate(buckets):
        offset, work_views = 0, []
        for i in indices:
            momentum_by_index[i] = _param_view(momentum, start + offset, params[i].shape, layouts[i])
            work_views.append(_param_view(work, offset, params[i].shape, layouts[i]))
            offset += params[i].numel()
        planned.append(
            MuonBucket(
                indices=tuple(indices),
                params=[params[i] for i in indices],
                method=method,
                momentum=momentum[start : start + offset].view(-1, m, n),
                work=work[:offset].view(-1, m, n),
                work_views=work_views,
                step_scale=step_scales[slot],
                ns_workspace=ns_workspaces[slot],
            )
        )
        start += offset
    return MuonPartition(planned, unit_scales, step_scales), momentum_by_index


@torch.no_grad()
def plan_buckets(
    params: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    layouts: Sequence[MatrixGeometry],
    ns_dtype: str | torch.dtype = "auto",
) -> MuonPlan:
    """Stack ``params``' matrices by bucket, adopting the values of ``momentum_buffers``;
    Newton-Schulz workspaces are sized for ``ns_dtype`` (a step in another dtype is refused).

    The caller replaces its momentum state with ``plan.momentum_views`` (or, for the functional
    API, copies them back after the step). The plan holds the parameters, so their ids stay valid
    as a cache key while it lives.
    """
    by_partition: dict[tuple, list[tuple[tuple, list[int]]]] = defaultdict(list)
    for key, indices in _bucket_keys(params, layouts).items():
        by_partition[key[:2]].append((key, indices))
    partitions, momentum_by_index = [], {}
    for buckets in by_partition.values():
        partition, views = _plan_partition(params, layouts, buckets, ns_dtype)
        partitions.append(partition)
        momentum_by_index |= views
    momentum_views = [momentum_by_index[i] for i in range(len(params))]
    if momentum_buffers:
        torch._foreach_copy_(momentum_views, list(momentum_buffers))
    return MuonPlan(list(params), momentum_views, partitions)

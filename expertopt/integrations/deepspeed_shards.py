"""Translate DeepSpeed's ZeRO-0/1/2 partitioning into expertopt's shard description.

Each builder returns ``(tensor, ShardedMatrices)`` pairs for :meth:`expertopt.Muon.place_shards`:

- ZeRO-1/2 (:func:`zero12_placements`): one unit per Muon group, the group's flat fp32 partition
  (``single_partition_of_fp32_groups``), matrices at ``round_robin_bit16_offsets`` of the flat
  buffer, partitioned over the group's (DP or EDP) process group;
- DeepSpeed's ``BF16_Optimizer`` (bf16 with ZeRO-1 and fp32 gradient accumulation,
  :func:`bf16_optimizer_placements`): one unit per Muon group, its flat fp32 partition
  (``fp32_groups_flat_partition``); the group's parameters lie back to back in its flat buffer,
  partitioned exactly as at ZeRO-1/2;
- ZeRO-0 (:func:`zero0_placements`): one unit per Muon group and replica process group (the
  data-parallel group for dense parameters, each expert group's EDP group), its parameters
  replicated whole on every rank.

ZeRO-3 lives in :mod:`expertopt.integrations.deepspeed_zero3`.
"""

from __future__ import annotations

import itertools
from typing import Any

import deepspeed.comm as ds_dist
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from torch import Tensor

from expertopt.distributed.layout import flat_partition_layout, replicated_layout
from expertopt.distributed.step import ShardedMatrices
from expertopt.optim.muon import Muon
from expertopt.updates.muon import matrix_view_options

__all__ = [
    "bf16_optimizer_placements",
    "check_offloaded_exchange",
    "shard_unit",
    "zero0_placements",
    "zero12_placements",
]

Placements = list[tuple[Tensor, ShardedMatrices]]


def shard_unit(
    layout, group: dict[str, Any], process_group: Any, like: Tensor, gradients_at_owner: bool = False
) -> ShardedMatrices:
    """The unit stepping ``layout`` over ``process_group``, costed by the group's Newton-Schulz
    method and steps, on ``like``'s device (every DeepSpeed stage builds its units here)."""
    return ShardedMatrices(
        layout,
        dist.get_rank(group=process_group),
        process_group,
        ns_method=group["ns_method"],
        ns_steps=group["ns_steps"],
        device=like.device,
        gradients_at_owner=gradients_at_owner,
    )


def check_offloaded_exchange(placements: list) -> None:
    """With ``offload_optimizer`` (any ZeRO stage) the partitions, and so the owners' exchange,
    are CPU tensors: refuse, with the fix, a process group that cannot carry them (NCCL) instead
    of failing in the first step. Tested on gloo only (no GPU yet)."""
    for flat, unit in placements:
        if flat.device.type == "cpu" and not unit.plan.local_only:
            backend = str(dist.get_backend(unit.group))
            if "gloo" not in backend:
                raise ValueError(
                    f'"offload_optimizer" keeps the Muon partitions on the CPU, and their owners\' exchange runs '
                    f"on a {backend!r} process group that cannot carry CPU tensors: remove "
                    '"offload_optimizer" for Muon (AdamW needs no exchange)'
                )


def zero12_placements(optimizer: Muon, zero: Any) -> Placements:
    """Every Muon group's flat ZeRO-1/2 partition with its unit."""
    placements = []
    for index, group in enumerate(optimizer.param_groups):
        if not group["use_muon"]:
            continue
        process_group = zero.real_dp_process_group[index]
        params = zero.round_robin_bit16_groups[index]
        layout = flat_partition_layout(
            [p.shape for p in params],
            list(zero.round_robin_bit16_offsets[index]),
            int(zero.partition_size[index]),
            ds_dist.get_world_size(group=process_group),
            **matrix_view_options(group),
        )
        flat = zero.single_partition_of_fp32_groups[index]
        placements.append((flat, shard_unit(layout, group, process_group, flat)))
    return placements


def bf16_optimizer_placements(optimizer: Muon, bf16: Any) -> Placements:
    """Every Muon group's flat fp32 partition under DeepSpeed 0.19.8's ``BF16_Optimizer``.

    It flattens each group's parameters back to back (``align_dense_tensors`` pads only the end
    of the buffer), gives rank ``r`` the slice ``[r * P, (r + 1) * P)`` with ``P`` the padded
    buffer over the group's DP (or EDP) size, and steps the client optimizer once for all groups
    with ``params = [fp32_groups_flat_partition[i]]``: the ZeRO-1/2 description, with the
    offsets computed rather than read from ``round_robin_bit16_offsets``.
    """
    placements = []
    for index, group in enumerate(optimizer.param_groups):
        if not group["use_muon"]:
            continue
        process_group = bf16.real_dp_process_group[index]
        world_size = ds_dist.get_world_size(group=process_group)
        params = bf16.bf16_groups[index]
        layout = flat_partition_layout(
            [p.shape for p in params],
            list(itertools.accumulate((p.numel() for p in params[:-1]), initial=0)),
            bf16.bf16_groups_flat[index].numel() // world_size,
            world_size,
            **matrix_view_options(group),
        )
        flat = bf16.fp32_groups_flat_partition[index]
        if flat.numel() != layout.buffer_numels[0]:
            raise RuntimeError(
                f"BF16_Optimizer group {index}: flat partition of {flat.numel()} elements, expected "
                f"{layout.buffer_numels[0]} (DeepSpeed layout changed?)"
            )
        placements.append((flat, shard_unit(layout, group, process_group, flat)))
    return placements


def _model_params_of_masters(wrapper: Any) -> dict[int, Tensor]:
    """The model parameter behind each fp32 master of DeepSpeed's ``FP16_UnfusedOptimizer``
    (ZeRO-0 with bf16 or fp16), by ``id`` of the master; empty for an unwrapped optimizer. The
    masters are plain clones: expert tags (``allreduce``, ``group_name``) stay on the model's."""
    pairs = zip(getattr(wrapper, "fp32_groups", ()), getattr(wrapper, "fp16_groups", ()), strict=True)
    return {id(high): low for highs, lows in pairs for high, low in zip(highs, lows, strict=True)}


def zero0_placements(engine: Any, optimizer: Muon) -> Placements:
    """Every Muon group's parameters, by the process group the engine all-reduces them over:
    each of their matrices orthogonalized by one owner there and the results all-gathered."""
    from deepspeed.utils import groups

    if engine.mpu is not None:
        dense = engine.mpu.get_data_parallel_group()
    else:
        dense = groups._get_sequence_data_parallel_group()  # what the engine reduces over
    model_param = _model_params_of_masters(engine.optimizer)
    placements = []
    for group in optimizer.param_groups:
        if not group["use_muon"]:
            continue
        by_group: dict[str, tuple[Any, list[Tensor]]] = {}
        for param in group["params"]:
            source = model_param.get(id(param), param)  # experts are tagged on the model's tensor
            if is_moe_param(source):
                name = source.group_name
                process_group = groups._get_expert_data_parallel_group(name)
            else:
                name, process_group = "", dense
            by_group.setdefault(name, (process_group, []))[1].append(param)
        for process_group, params in by_group.values():
            layout = replicated_layout(
                [p.shape for p in params],
                ds_dist.get_world_size(group=process_group),
                **matrix_view_options(group),
            )
            unit = shard_unit(layout, group, process_group, params[0])
            placements.extend((param, unit) for param in params)
    return placements

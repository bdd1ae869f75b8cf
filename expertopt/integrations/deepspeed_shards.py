"""Translate DeepSpeed's ZeRO-0/1/2 partitioning into expertopt's shard description.

Each builder returns ``(tensor, ShardedMatrices)`` pairs for :meth:`expertopt.Muon.place_shards`:

- ZeRO-1/2 (:func:`zero12_placements`): one unit per Muon group, the group's flat fp32 partition
  (``single_partition_of_fp32_groups``), matrices at ``round_robin_bit16_offsets`` of the flat
  buffer, partitioned over the group's (DP or EDP) process group;
- ZeRO-0 (:func:`zero0_placements`): one unit per Muon group and replica process group (the
  data-parallel group for dense parameters, each expert group's EDP group), its parameters
  replicated whole on every rank.

ZeRO-3 lives in :mod:`expertopt.integrations.deepspeed_zero3`.
"""

from __future__ import annotations

from typing import Any

import deepspeed.comm as ds_dist
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from torch import Tensor

from expertopt.distributed.layout import flat_partition_layout, replicated_layout
from expertopt.distributed.step import ShardedMatrices
from expertopt.optim.muon import Muon
from expertopt.updates.muon import matrix_view_options

__all__ = ["zero0_placements", "zero12_placements"]

Placements = list[tuple[Tensor, ShardedMatrices]]


def _unit(layout, group: dict[str, Any], process_group: Any, like: Tensor) -> ShardedMatrices:
    return ShardedMatrices(
        layout,
        dist.get_rank(group=process_group),
        process_group,
        ns_method=group["ns_method"],
        ns_steps=group["ns_steps"],
        device=like.device,
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
        placements.append((flat, _unit(layout, group, process_group, flat)))
    return placements


def zero0_placements(engine: Any, optimizer: Muon) -> Placements:
    """Every Muon group's parameters, by the process group the engine all-reduces them over:
    each of their matrices orthogonalized by one owner there and the results all-gathered."""
    from deepspeed.utils import groups

    if engine.mpu is not None:
        dense = engine.mpu.get_data_parallel_group()
    else:
        dense = groups._get_sequence_data_parallel_group()  # what the engine reduces over
    placements = []
    for group in optimizer.param_groups:
        if not group["use_muon"]:
            continue
        by_group: dict[str, tuple[Any, list[Tensor]]] = {}
        for param in group["params"]:
            if is_moe_param(param):
                name = param.group_name
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
            unit = _unit(layout, group, process_group, params[0])
            placements.extend((param, unit) for param in params)
    return placements

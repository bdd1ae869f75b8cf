"""DeepSpeed ZeRO-3 glue: expertopt's Muon / AdamW as the client optimizer of stage 3.

What DeepSpeed 0.19.8 does at stage 3 with a client optimizer (``stage3.py``), and we rely on:
gradients are reduce-scattered over each parameter's partition group (``"reduce_scatter"``
stays true: only DeepSpeed's own Muon forces an all-reduce, F12), averaged over micro-batches,
unscaled and clipped with the global norm of the *raw* gradients (``unscale_and_clip_grads``,
before the client step, F5); a non-finite norm skips the step before the client sees it. Then
for each sub-group ``i`` in order, on every rank, it sets ``param_groups[g]["params"] =
[fp32_partitioned_groups_flat[i]]`` (this rank's chunk of each of the sub-group's parameters,
back to back), calls ``step()``, and empties the group again.

So each Muon sub-group is one unit of the shard description
(:func:`expertopt.distributed.layout.param_partition_layout`): momentum lives on the rank's
chunk only, every matrix is gathered to one owner (chosen by Newton-Schulz cost), orthogonalized
once there in batched calls, and its pieces sent back in the Newton-Schulz dtype. Checkpoints:
DeepSpeed fills the groups with every sub-group's flat partition around ``state_dict`` and
``load_state_dict``, so state is keyed by those tensors (:func:`attach_zero3` rebinds it).

AutoEP experts come in two placements (``"expert_placement"`` in the optimizer block). Both keep
the fp32 masters, the gradients and the optimizer state partitioned over the expert-data-parallel
(EDP) group, reduce expert gradients only inside EDP, and orthogonalize each expert matrix once
(by the EDP rank whose chunk holds it). They differ in where the bf16/fp32 *compute* weights
live. "sharded" is AutoEP's own ZeRO-3 partitioning: every forward and every backward gathers
the experts from their EDP partitions. "replicated" keeps them whole on every EDP rank as ZeRO-3
*persistent* parameters (:func:`keep_experts_whole`): the parameter coordinator never releases a
``ds_persist`` parameter once its trace is recorded (``partitioned_param_coordinator.py``
``__params_to_release``), and ``DeepSpeedZeroOptimizer_Stage3._post_step`` all-gathers the
persistent parameters once per step, each over its own partition group (``_all_gather`` groups
them by ``ds_process_group``): that gather is the all-gather of the orthogonalized results.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from deepspeed.runtime.utils import is_invalid_grad_norm

from expertopt.distributed.layout import param_partition_layout
from expertopt.integrations.deepspeed_shards import check_offloaded_exchange, shard_unit
from expertopt.integrations.deepspeed_zero3_owners import (
    DEFAULT_ZERO3_MUON_GRADIENTS,
    GradientsToOwners,
    check_supported,
)
from expertopt.optim.adamw import AdamW
from expertopt.optim.muon import Muon
from expertopt.updates.muon import matrix_view_options

__all__ = [
    "DEFAULT_EXPERT_PLACEMENT",
    "EXPERT_PLACEMENTS",
    "attach_zero3",
    "autoep_experts",
    "check_zero3_config",
    "keep_experts_whole",
    "zero3_placements",
]

# Where AutoEP expert weights live between steps at ZeRO-3 (see the module docstring).
EXPERT_PLACEMENTS = ("replicated", "sharded")
# Measured 0.771x the bytes per rank per step of "sharded" at GAS 1, 0.656x at GAS 2 (docs/benchmarks.md,
# "DeepSpeed ZeRO-3 with AutoEP experts: placements"); its cost is EDP x the resident expert weights.
DEFAULT_EXPERT_PLACEMENT = "replicated"


def check_zero3_config(zero_config: dict[str, Any]) -> None:
    """Refuse, with the fix, the stage-3 settings the flat-partition glue cannot serve."""
    for key in ("offload_optimizer", "offload_param"):
        device = (zero_config.get(key) or {}).get("device", "none")
        if device not in (None, "none", "cpu"):
            raise ValueError(
                f'"zero_optimization.{key}" with device {device!r} is not supported with expertopt\'s '
                "optimizers at ZeRO-3 (NVMe swapping replaces the partitions the optimizer state is keyed "
                f'by between steps); use "device": "cpu" or remove "{key}"'
            )
    if (zero_config.get("offload_optimizer") or {}).get("super_offload"):
        raise ValueError(
            '"offload_optimizer.super_offload" steps its own CPU Adam in place of the client optimizer, '
            'so expertopt\'s optimizer would not run: remove "super_offload"'
        )
    if zero_config.get("reduce_scatter") is False:
        raise ValueError(
            '"zero_optimization.reduce_scatter": false doubles the gradient bytes at ZeRO-3 and expertopt '
            "does not need it (DeepSpeed forces it only for its own Muon); remove the setting"
        )


def zero3_placements(optimizer: Muon, zero: Any, muon_gradients: str | None = None) -> tuple[list, dict]:
    """Every Muon sub-group's flat fp32 partition with its unit, and the units whose gradients go
    straight to their owners (by sub-group: ``(unit, its parameters, matrix view options)``)
    under ``muon_gradients`` (None: :data:`DEFAULT_ZERO3_MUON_GRADIENTS`)."""
    to_owner = (muon_gradients or DEFAULT_ZERO3_MUON_GRADIENTS) == "to_owner"
    placements, served = [], {}
    for sub_group, params in enumerate(zero.fp16_groups):
        group = optimizer.param_groups[zero.sub_group_to_group_id[sub_group]]
        if not group["use_muon"]:
            continue
        process_group = zero.sub_group_process_groups[sub_group]
        options = matrix_view_options(group)
        layout = param_partition_layout(
            [p.ds_shape for p in params],
            [p.partition_numel() for p in params],
            dist.get_world_size(group=process_group),
            **options,
        )
        flat = zero.fp32_partitioned_groups_flat[sub_group]
        if flat.numel() != layout.buffer_numels[0]:
            raise RuntimeError(
                f"ZeRO-3 sub-group {sub_group}: flat partition of {flat.numel()} elements, expected "
                f"{layout.buffer_numels[0]} from its parameters' partitions (DeepSpeed layout changed?)"
            )
        # AutoEP experts (averaged over DP, partitioned over EDP) keep DeepSpeed's reduce-scatter.
        owner_reduced = to_owner and not any(map(_is_autoep_expert, params))
        unit = shard_unit(layout, group, process_group, flat, gradients_at_owner=owner_reduced)
        if unit.plan.local_only and owner_reduced:  # nothing crosses ranks: nothing to save
            unit = shard_unit(layout, group, process_group, flat)
        elif owner_reduced:
            served[sub_group] = (unit, params, options)
        placements.append((flat, unit))
    return placements, served


def _is_autoep_expert(param: Any) -> bool:
    return getattr(param, "ds_zero_placement_family", None) == "autoep_expert"


def autoep_experts(module: Any) -> list:
    """The AutoEP expert parameters of ``module`` (tagged by AutoEP inside ``deepspeed.initialize``)."""
    return [p for p in module.parameters() if _is_autoep_expert(p)]


def keep_experts_whole(experts: list, zero: Any) -> None:
    """Make ``experts`` ZeRO-3 persistent parameters: whole on every rank of their EDP group.

    Gradients, fp32 masters and optimizer state stay partitioned over EDP (persistence changes
    only when the compute weight is released: never, once the first step's trace is recorded),
    so the optimizer step is the "sharded" one unchanged; DeepSpeed's post-step all-gather of the
    persistent parameters then refreshes every EDP rank's whole copy.
    """
    added = [p for p in experts if not p.ds_persist]
    for param in added:
        param.ds_persist = True
    # DeepSpeed's own list (stage3.persistent_parameters is parameter_offload's list object):
    # gathered after every step and checkpoint event, partitioned around loading.
    zero.persistent_parameters.extend(added)


def attach_zero3(
    engine: Any,
    optimizer: Muon | AdamW,
    zero: Any,
    expert_placement: str | None = None,
    muon_gradients: str | None = None,
) -> None:
    """Place every Muon sub-group and key optimizer state by the flat partitions DeepSpeed steps,
    with AutoEP experts in ``expert_placement`` (None: :data:`DEFAULT_EXPERT_PLACEMENT`) and dense
    Muon gradients reduced as ``muon_gradients`` says (None: :data:`DEFAULT_ZERO3_MUON_GRADIENTS`)."""
    if zero.swap_optimizer:
        check_zero3_config({"offload_optimizer": {"device": "nvme"}})
    experts = autoep_experts(engine.module)
    if expert_placement is not None and not experts:
        raise ValueError(
            f'"optimizer.params.expert_placement": {expert_placement!r} places AutoEP experts, and this model '
            'has none (no "expert_parallel": {"enabled": true} block converted it): remove "expert_placement"'
        )
    if (expert_placement or DEFAULT_EXPERT_PLACEMENT) == "replicated":
        keep_experts_whole(experts, zero)
    # Every rank takes DeepSpeed's verdict on the global norm (computed before any sub-group
    # steps), so no rank skips a step, and its exchanges, that another one takes.
    optimizer.shared_finite_check = lambda _grads: (
        not is_invalid_grad_norm(zero._global_grad_norm),
        engine.global_steps,
    )
    zero._set_fp32_optimizer_param_groups()
    try:
        if isinstance(optimizer, Muon):
            placements, served = zero3_placements(optimizer, zero, muon_gradients)
            check_offloaded_exchange(placements)
            if served:
                check_supported(zero)
            optimizer.place_shards(placements)
            if served:
                GradientsToOwners(zero, served).install()
        else:
            optimizer.rebind_state()
    finally:
        zero._clear_fp32_optimizer_param_groups()

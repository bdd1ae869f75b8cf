"""DeepSpeed ZeRO-3: reduce each Muon matrix's gradient straight to its owner.

At ZeRO-3 DeepSpeed reduce-scatters every gradient over its partition group, and the Muon step
then gathers each matrix's reduced pieces to the rank that orthogonalizes it: the gradient
crosses the wire twice (the reduce-scatter, then the gather). With ``"zero3_muon_gradients":
"to_owner"`` (the default for dense Muon matrices) each matrix's raw gradient is summed once,
in DeepSpeed's communication dtype, at its owner (:func:`expertopt.distributed._runtime.reduce_to_owners`),
accumulated there in fp32 over micro-batches (overwritten by the first one after a step or
``zero_grad``, as DeepSpeed treats its partitions), and only the orthogonalized update travels back
(in the Newton-Schulz dtype). Momentum lives at the owner. Measured: docs/benchmarks.md, "ZeRO-3
Muon: reduce straight to the owner".

What this relies on in DeepSpeed 0.19.8 (``runtime/zero/stage3.py``), wrapped on the optimizer
instance, never patched into the class:

- ``__reduce_and_partition_ipg_grads`` calls ``__avg_scatter_grads(params, comm_dtype)`` for
  every bucket when ``reduce_scatter`` is true (we refuse false) and writes the partitions it
  returns into the fp32 gradient partitions. For served parameters we return zeros there, so
  DeepSpeed's own overflow check, norm and unscale see nothing of them;
- ``step`` takes the global norm from ``_get_norm_groups`` (one more group here: the owned
  gradients, all-reduced over the process group), skips the step when it is not finite, and
  calls ``unscale_and_clip_grads(sub_group, norm)`` before each sub-group's client step (we
  apply the same factor to the owned gradients of that sub-group).

AutoEP expert sub-groups (averaged over DP, partitioned over EDP) keep the reduce-scatter, as do
units whose matrices never leave their rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from expertopt.distributed._runtime import reduce_to_owners
from expertopt.distributed.layout import matrices_of
from expertopt.distributed.step import ShardedMatrices

__all__ = ["DEFAULT_ZERO3_MUON_GRADIENTS", "ZERO3_MUON_GRADIENTS", "GradientsToOwners", "check_supported"]

# How dense Muon gradients reach their owner at ZeRO-3 (see the module docstring).
ZERO3_MUON_GRADIENTS = ("to_owner", "reduce_scatter")
DEFAULT_ZERO3_MUON_GRADIENTS = "to_owner"

_STAGE3 = "_DeepSpeedZeroOptimizer_Stage3"


def check_supported(zero: Any) -> None:
    """Refuse, with the fix, the stage-3 settings under which gradients cannot go to owners."""
    fix = 'set "zero3_muon_gradients": "reduce_scatter" in the config\'s "optimizer.params"'
    if not zero.reduce_scatter:
        # DeepSpeed then reduces contiguous buckets without the hook this module wraps.
        raise ValueError(
            '"zero_optimization.reduce_scatter": false bypasses the reduction to owners: remove it'
        )
    if getattr(zero, "all2all_process_group", None) is not None:
        raise ValueError(
            '"zero_quantized_gradients" reduces gradients with its own all-to-all, which cannot send them to '
            f"their Muon owners: drop it, or {fix}"
        )
    if zero.model_parallel_group is not None:
        raise ValueError(
            "with model (tensor) parallelism DeepSpeed's gradient norm also sums over the model-parallel "
            f"group, which the owners' norm does not follow yet: {fix}"
        )
    if zero.torch_autocast_gradscaler is not None:
        raise ValueError(
            "torch autocast with fp16 unscales only DeepSpeed's gradient partitions (its GradScaler), not "
            f"the gradients at their owners: use bf16, or {fix}"
        )


@dataclass(frozen=True, slots=True)
class _Span:
    """One matrix of a served parameter: ``numel`` elements from ``start`` of its flat gradient,
    owned by ``owner`` (a rank of the unit's group), written there at ``owned_offset`` of the
    unit's owned gradient (meaningful on the owner only)."""

    unit: ShardedMatrices
    start: int
    numel: int
    owner: int
    owned_offset: int


class GradientsToOwners:
    """Route the gradients of ``units`` (placed ZeRO-3 Muon sub-groups, by sub-group index) to
    their owners inside DeepSpeed's ``zero`` optimizer; see the module docstring."""

    def __init__(
        self, zero: Any, units: dict[int, tuple[ShardedMatrices, list[Any], dict[str, Any]]]
    ) -> None:
        self.zero = zero
        self.units = {sub_group: unit for sub_group, (unit, _, _) in units.items()}
        # Where the owned gradients live: the partitions' device (the CPU with offload_optimizer).
        self.device = next(iter(self.units.values())).owned_gradient.device
        self.spans: dict[int, list[_Span]] = {}  # by ds_id
        self._zero_partition: Tensor | None = None
        for unit, params, options in units.values():
            offsets = dict(zip(unit.plan.owned, unit.plan.owned_offsets, strict=True))
            index = 0
            for param in params:
                flats = matrices_of([param.ds_shape], [0], **options)
                spans = []
                for flat in flats:
                    spans.append(
                        _Span(unit, flat.start, flat.numel, unit.owners[index], offsets.get(index, -1))
                    )
                    index += 1
                self.spans[param.ds_id] = spans
            if index != len(unit.layout.matrices):
                raise RuntimeError(
                    f"{index} matrices found in the sub-group's parameters, layout has "
                    f"{len(unit.layout.matrices)}"
                )

    def install(self) -> None:
        zero = self.zero
        scatter = getattr(zero, f"{_STAGE3}__avg_scatter_grads")
        norms = zero._get_norm_groups
        unscale = zero.unscale_and_clip_grads
        step = zero.step

        @functools.wraps(scatter)
        def avg_scatter_grads(params: list, communication_data_type: torch.dtype) -> list[Tensor]:
            served = [p for p in params if p.ds_id in self.spans]
            if not served:
                return scatter(params, communication_data_type)
            rest = [p for p in params if p.ds_id not in self.spans]
            partitions = (
                dict(zip(map(id, rest), scatter(rest, communication_data_type), strict=True)) if rest else {}
            )
            self._reduce(served, communication_data_type)
            # DeepSpeed only reads these (copies them into its partitions): one zero buffer serves all.
            zeros = self._zeros(max(p.partition_numel() for p in served), served[0].grad.device)
            for param in served:
                partitions[id(param)] = zeros[: param.partition_numel()]
            return [partitions[id(p)] for p in params]

        def get_norm_groups() -> list[Tensor]:
            groups = norms()
            owned = self._owned_norm()
            return [*groups, owned.to(groups[0].device) if groups and torch.is_tensor(groups[0]) else owned]

        def unscale_and_clip_grads(sub_group_id: int, total_norm: Tensor) -> None:
            unscale(sub_group_id, total_norm)
            unit = self.units.get(sub_group_id)
            if unit is not None:
                # DeepSpeed's factor, applied to the gradients it does not see.
                combined_scale = zero.loss_scale
                if zero.clip_grad > 0.0:
                    clip = ((total_norm / zero.loss_scale) + 1e-6) / zero.clip_grad
                    combined_scale = torch.clamp(clip, min=1.0) * zero.loss_scale
                unit.owned_gradient.mul_(1.0 / combined_scale)

        @functools.wraps(step)
        def step_then_clear(*args: Any, **kwargs: Any) -> Any:
            try:
                return step(*args, **kwargs)
            finally:
                for unit in self.units.values():
                    unit.owned_gradient.zero_()

        setattr(zero, f"{_STAGE3}__avg_scatter_grads", avg_scatter_grads)
        zero._get_norm_groups = get_norm_groups
        zero.unscale_and_clip_grads = unscale_and_clip_grads
        zero.step = step_then_clear

    def _zeros(self, numel: int, device: torch.device) -> Tensor:
        if self._zero_partition is None or self._zero_partition.numel() < numel:
            self._zero_partition = torch.zeros(
                numel, dtype=self.zero.gradient_accumulation_dtype, device=device
            )
        return self._zero_partition

    def _reduce(self, params: list, communication_data_type: torch.dtype) -> None:
        """Sum the served parameters' gradients at their owners (averaged over their partition
        group, as DeepSpeed's reduce-scatter does for dense parameters; AutoEP experts, averaged
        over DP instead, are never served) into the owners' fp32 owned gradients."""
        group = self.zero._get_param_partition_group(params[0])
        sends: dict[int, list[Tensor]] = {}
        landing: dict[int, list[_Span]] = {}
        for param in params:
            grad = param.grad.reshape(-1).to(communication_data_type)
            for span in self.spans[param.ds_id]:
                sends.setdefault(span.owner, []).append(grad[span.start : span.start + span.numel])
                landing.setdefault(span.owner, []).append(span)
        mine = reduce_to_owners(sends, group)
        if mine is None:
            return
        mine = mine.to(self.device)
        # DeepSpeed's own rule for its partitions (``__partition_grads``): the first micro-step
        # after a step or ``zero_grad`` overwrites, later ones accumulate.
        accumulate = self.zero.micro_step_id != 0
        position = 0
        for span in landing[dist.get_rank(group=group)]:
            target = span.unit.owned_gradient[span.owned_offset : span.owned_offset + span.numel]
            arrived = mine[position : position + span.numel]
            if accumulate:
                target.add_(arrived)
            else:
                target.copy_(arrived)
            position += span.numel

    def _owned_norm(self) -> Tensor:
        """The 2-norm of every owned gradient of the world (each element has one owner), on every rank."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        by_group: dict[int, tuple[Any, Tensor]] = {}
        for unit in self.units.values():
            group, total = by_group.setdefault(id(unit.group), (unit.group, squares.clone()))
            total.add_(torch.linalg.vector_norm(unit.owned_gradient).square())
        for group, total in by_group.values():
            dist.all_reduce(total, group=group)
            squares.add_(total)
        return squares.sqrt()

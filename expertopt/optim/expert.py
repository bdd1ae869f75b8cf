"""A dense optimizer and a dedicated expert optimizer that one scheduler drives (F1).

Expert parameters need their own optimizer object: their own state, and (with expert parallelism)
their own process group. Upstream, that second optimizer copied ``param_groups[0]`` once and then
never saw the LR scheduler again (DeepSpeed PR #7928). Here:

- ``MoEOptimizer.param_groups`` is the dense groups followed by the expert groups (the same dict
  objects the two optimizers step with), so any scheduler that iterates ``param_groups`` - torch,
  DeepSpeed, Hugging Face - drives the expert groups too;
- each expert group names a dense group in ``link``; before every step the keys a scheduler or
  user may change (:data:`LINKED_KEYS`) are copied from the dense group into the expert group,
  so even code that only touches the dense optimizer reaches the experts. The expert group's
  own ``lr_mult`` still applies at step time (the dense group is authoritative for ``lr``).
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any

import torch
from torch.optim import Optimizer

from expertopt.optim._base import (
    GroupedOptimizer,
    effective_lr,
    group_label,
    param_label,
    skip_nonfinite_step,
)

__all__ = ["LINKED_KEYS", "MoEOptimizer"]

# Hyperparameters schedulers write (lr; momentum/betas for cyclic schedules; weight decay schedules).
LINKED_KEYS = ("lr", "momentum", "betas", "weight_decay")


class MoEOptimizer(Optimizer):
    """Steps a dense optimizer and an expert optimizer as one ``torch.optim.Optimizer``.

    Build it from param groups (``expertopt.build_param_groups``) with :meth:`from_groups`, or
    from two ready optimizers of expertopt's kind. A non-finite gradient anywhere skips both
    (counted in ``nonfinite_steps``), so dense and expert weights never drift apart by a step.
    ``state_dict()`` holds both optimizers' states under ``"dense"`` and ``"experts"``.
    """

    def __init__(self, dense: GroupedOptimizer, experts: GroupedOptimizer) -> None:
        for role, optimizer in (("dense", dense), ("experts", experts)):
            if not isinstance(optimizer, GroupedOptimizer):
                raise TypeError(
                    f"MoEOptimizer {role} optimizer must be an expertopt optimizer (Muon or AdamW), "
                    f"got {type(optimizer).__name__}"
                )
        _check_disjoint(dense, experts)
        self.dense = dense
        self.experts = experts
        # The guard moves up here so that a bad gradient anywhere skips both optimizers.
        self.skip_nonfinite = dense.skip_nonfinite
        self.nonfinite_steps = 0
        dense.skip_nonfinite = experts.skip_nonfinite = False
        self._ready = False
        super().__init__(dense.param_groups + experts.param_groups, dict(dense.defaults))
        self._ready = True
        self._links()  # fail now, not at the first step, on a link to a missing group

    @classmethod
    def from_groups(
        cls,
        param_groups: list[dict[str, Any]],
        optimizer_cls: type[GroupedOptimizer] | None = None,
        **defaults: Any,
    ) -> MoEOptimizer:
        """Split groups on their ``expert`` key and build both optimizers with ``optimizer_cls``
        (default :class:`expertopt.Muon`) and the same ``defaults``."""
        if optimizer_cls is None:
            from expertopt.optim.muon import Muon

            optimizer_cls = Muon
        dense = [g for g in param_groups if not g.get("expert", False)]
        experts = [g for g in param_groups if g.get("expert", False)]
        if not dense or not experts:
            raise ValueError(
                f"MoEOptimizer needs dense and expert groups, got {len(dense)} dense and {len(experts)} "
                "expert groups; with no experts use the optimizer class directly"
            )
        return cls(optimizer_cls(dense, **defaults), optimizer_cls(experts, **defaults))

    # -- views derived from the two optimizers (never stale, whatever replaced their groups) --
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.dense.param_groups + self.experts.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._ready:
            raise AttributeError(
                "MoEOptimizer.param_groups is derived from its dense and expert optimizers; "
                "use add_param_group (routed by the group's 'expert' key)"
            )

    @property
    def state(self) -> ChainMap:  # type: ignore[override]
        return ChainMap(self.dense.state, self.experts.state)

    @state.setter
    def state(self, value: Any) -> None:
        pass  # Optimizer.__init__ assigns an empty state; the real one lives in the two optimizers

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:  # Optimizer.__init__ registering the groups the two optimizers own
            return
        target = self.experts if param_group.get("expert", False) else self.dense
        target.add_param_group(param_group)
        self._links()

    def _links(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(dense group, expert group) pairs, resolved by name now."""
        by_name = {g["name"]: g for g in self.dense.param_groups if g.get("name")}
        links = []
        for index, group in enumerate(self.experts.param_groups):
            link = group.get("link")
            if link is None:
                continue
            if link not in by_name:
                raise ValueError(
                    f"expert {group_label(group, index)} links to dense group {link!r}, which does not "
                    f"exist; dense group names: {sorted(by_name)}"
                )
            links.append((by_name[link], group))
        return links

    def sync_expert_groups(self) -> None:
        """Copy :data:`LINKED_KEYS` from each linked dense group into its expert group."""
        for dense_group, expert_group in self._links():
            for key in LINKED_KEYS:
                if key in dense_group and key in expert_group:
                    expert_group[key] = dense_group[key]

    def effective_lrs(self) -> list[float]:
        """Each group's lr as it will be applied (after linking): ``lr * lr_mult``."""
        self.sync_expert_groups()
        return [effective_lr(g) for g in self.param_groups]

    # -- step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_expert_groups()
        if not skip_nonfinite_step(self, self.dense.all_grads() + self.experts.all_grads()):
            self.dense.step()
            self.experts.step()
        return loss

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "experts": self.experts.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"dense", "experts"} - set(state_dict)
        if missing:
            raise ValueError(
                f"MoEOptimizer state_dict lacks {sorted(missing)}: it must come from MoEOptimizer.state_dict()"
            )
        self.dense.load_state_dict(state_dict["dense"])
        self.experts.load_state_dict(state_dict["experts"])


def _check_disjoint(dense: GroupedOptimizer, experts: GroupedOptimizer) -> None:
    """A parameter stepped by both optimizers would be updated twice per step: name it."""
    dense_ids = {id(p) for g in dense.param_groups for p in g["params"]}
    for index, group in enumerate(experts.param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) in dense_ids:
                raise ValueError(
                    f"{param_label(group, position, param)} of expert {group_label(group, index)} is also "
                    "in the dense optimizer; each parameter must be in exactly one group"
                )

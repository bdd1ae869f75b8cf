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

Its ``state_dict`` is torch's layout over those combined groups (one running parameter index,
``state`` and ``param_groups``), so ``torch.distributed.checkpoint``, accelerate and the Trainer
save and load it like any optimizer (issue 10).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from expertopt.optim._base import (
    DeviceGuard,
    GroupedOptimizer,
    SharedFiniteCheck,
    SkippedStepCounter,
    copyable_attributes,
    effective_lr,
    group_label,
    param_label,
    skip_nonfinite_step,
)

__all__ = ["LINKED_KEYS", "JoinedState", "MoEOptimizer"]

# Hyperparameters schedulers write (lr; momentum/betas for cyclic schedules; weight decay schedules).
LINKED_KEYS = ("lr", "momentum", "betas", "weight_decay")


class MoEOptimizer(SkippedStepCounter, Optimizer):
    """Steps a dense optimizer and an expert optimizer as one ``torch.optim.Optimizer``.

    Build it from param groups (``expertopt.build_param_groups``) with :meth:`from_groups`, or
    from two ready optimizers of expertopt's kind.

    Non-finite gradients: one verdict covers both optimizers, so dense and expert weights never
    drift apart by a step. A gradient with inf/NaN anywhere skips both (parameters and state
    untouched; counted in ``nonfinite_steps``). The verdict is taken on the device, as
    :class:`expertopt.Muon` does, whenever both optimizers can mask their own update with it:
    with ``capturable=True`` the step then has no host sync. Engines whose ranks must agree
    (``shared_finite_check``) decide on the host, before either optimizer steps.

    Checkpoints: ``state_dict()`` is what ``torch.optim.Optimizer.state_dict`` gives for
    ``param_groups`` (dense groups, then expert groups, one running parameter index; ``state``
    keyed by it), so ``torch.distributed.checkpoint.state_dict`` and the Trainer handle it like
    any optimizer. ``load_state_dict`` splits it back by group (checking group and parameter
    counts) and also reads the ``{"dense", "experts"}`` layout earlier versions saved.
    """

    def __init__(self, dense: GroupedOptimizer, experts: GroupedOptimizer) -> None:
        for role, optimizer in (("dense", dense), ("experts", experts)):
            if not isinstance(optimizer, GroupedOptimizer):
                raise TypeError(
                    f"MoEOptimizer {role} optimizer must be an expertopt optimizer (Muon or AdamW), "
                    f"got {type(optimizer).__name__}"
                )
        if dense.capturable != experts.capturable:
            raise ValueError(
                f"MoEOptimizer needs capturable to agree: dense has capturable={dense.capturable}, "
                f"experts capturable={experts.capturable}; build both with the same value"
            )
        _check_disjoint(dense, experts)
        self.dense = dense
        self.experts = experts
        # The guard moves up here so that a bad gradient anywhere skips both optimizers.
        self.skip_nonfinite = dense.skip_nonfinite
        self.capturable = dense.capturable
        self.shared_finite_check: SharedFiniteCheck | None = None
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
    def state(self) -> JoinedState:  # type: ignore[override]
        return JoinedState(self.dense, self.experts)

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
        grads = self.dense.all_grads() + self.experts.all_grads()
        if self.skip_nonfinite and self._guard_on_device():
            guard = DeviceGuard.from_grads(grads)  # one flag over both halves' gradients
            self.dense._step_groups(guard)
            self.experts._step_groups(guard)
            self._count_skipped(guard)
        elif not skip_nonfinite_step(self, grads):
            self.dense._step_groups(None)
            self.experts._step_groups(None)
        return loss

    def _guard_on_device(self) -> bool:
        """Whether both optimizers can mask their update with a device flag (else the host decides)."""
        return (
            self.shared_finite_check is None
            and self.dense._guard_on_device()
            and self.experts._guard_on_device()
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout over ``param_groups``: the two optimizers' state dicts, the expert
        indices shifted past the dense parameters (torch's state-dict hooks run as usual)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        dense, experts = self.dense.state_dict(), self.experts.state_dict()
        offset = sum(len(group["params"]) for group in dense["param_groups"])
        state_dict = {
            "state": {**dense["state"], **{offset + i: s for i, s in experts["state"].items()}},
            "param_groups": dense["param_groups"]
            + [{**g, "params": [offset + i for i in g["params"]]} for g in experts["param_groups"]],
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's layout (as :meth:`state_dict` saves it, or keyed by name as
        ``torch.distributed.checkpoint`` hands it back), or the legacy ``{"dense", "experts"}``."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if set(state_dict) == {"dense", "experts"}:  # saved by expertopt before issue 10
            dense, experts = state_dict["dense"], state_dict["experts"]
        else:
            dense, experts = self._split_state_dict(state_dict)
        self.dense.load_state_dict(dense)
        self.experts.load_state_dict(experts)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups, which here are views of the two
        # optimizers: keep the optimizers themselves (copy.deepcopy, pickle).
        return copyable_attributes(self)

    def _split_state_dict(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The dense and expert halves of a torch-layout state dict, split by group position.

        Keys are whatever the saver used (indices, or names after ``torch.distributed.checkpoint``):
        each half keeps its keys, and torch's own loader maps them by position in the groups.
        """
        _check_torch_layout(state_dict)
        groups, state = state_dict["param_groups"], state_dict["state"]
        split = len(self.dense.param_groups)
        _check_groups_match(groups, self.param_groups, split)
        listed = {key for group in groups for key in group["params"]}
        stray = [key for key in state if key not in listed]
        if stray:
            raise ValueError(
                f"MoEOptimizer state_dict has state for {stray[:5]}, which no saved param group lists: "
                "the state dict is inconsistent; save it again with MoEOptimizer.state_dict()"
            )
        dense_keys = {key for group in groups[:split] for key in group["params"]}
        dense = {key: value for key, value in state.items() if key in dense_keys}
        experts = {key: value for key, value in state.items() if key not in dense_keys}
        return (
            {"state": dense, "param_groups": groups[:split]},
            {"state": experts, "param_groups": groups[split:]},
        )


def _check_torch_layout(state_dict: dict[str, Any]) -> None:
    missing = {"state", "param_groups"} - set(state_dict)
    if missing:
        raise ValueError(
            f"MoEOptimizer state_dict lacks {sorted(missing)} (it has {sorted(state_dict)}): load "
            "torch's optimizer layout ('state' and 'param_groups', as MoEOptimizer.state_dict() "
            "saves it), or the {'dense', 'experts'} layout of earlier expertopt versions"
        )


def _check_groups_match(saved: list[dict[str, Any]], groups: list[dict[str, Any]], dense_count: int) -> None:
    """Same group count, each group dense or expert as here, same parameter count: else name the fix."""
    fix = (
        "load it into a MoEOptimizer built from the same param groups (same model, same "
        "build_param_groups options, so the same dense groups followed by the same expert groups)"
    )
    if len(saved) != len(groups):
        raise ValueError(
            f"MoEOptimizer state_dict has {len(saved)} param groups, this optimizer has {len(groups)} "
            f"({dense_count} dense, then {len(groups) - dense_count} expert): {fix}"
        )
    for index, (saved_group, group) in enumerate(zip(saved, groups, strict=True)):
        role = "an expert" if index >= dense_count else "a dense"
        if "expert" in saved_group and bool(saved_group["expert"]) != (index >= dense_count):
            saved_role = "an expert" if saved_group["expert"] else "a dense"
            raise ValueError(
                f"saved {group_label(saved_group, index)} is {saved_role} group, but {group_label(group, index)} "
                f"of this MoEOptimizer is {role} group: {fix}"
            )
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(
                f"saved {group_label(saved_group, index)} holds {len(saved_group['params'])} parameters, "
                f"{group_label(group, index)} of this MoEOptimizer holds {len(group['params'])}: {fix}"
            )


class JoinedState(MutableMapping):
    """The dense and expert optimizers' ``state`` as one mapping, dense parameters first.

    Reads and writes go to the optimizer that holds the parameter. Not a ``ChainMap``: the two
    states are ``defaultdict`` s, and a ChainMap lookup of an expert parameter would create an
    empty entry for it in the dense state (and return that instead of the expert state).
    """

    def __init__(self, dense: GroupedOptimizer, experts: GroupedOptimizer) -> None:
        self._optimizers = (dense, experts)

    def _holder(self, param: Tensor) -> dict:
        for optimizer in self._optimizers:
            if param in optimizer.state:
                return optimizer.state
        for optimizer in self._optimizers:  # a parameter whose state is not created yet
            if any(p is param for group in optimizer.param_groups for p in group["params"]):
                return optimizer.state
        raise KeyError(f"tensor of shape {tuple(param.shape)} is in no param group of this MoEOptimizer")

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        return self._holder(param)[param]

    def __setitem__(self, param: Tensor, value: dict[str, Any]) -> None:
        self._holder(param)[param] = value

    def __delitem__(self, param: Tensor) -> None:
        del self._holder(param)[param]

    def __iter__(self) -> Iterator[Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


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

"""Group machinery shared by :class:`expertopt.Muon` and :class:`expertopt.AdamW`.

What lives here, once:

- per-group validation with errors that name the parameter and the fix;
- eager optimizer state, so every rank holds the same keys even for experts that received no
  gradient (F11), also after loading a checkpoint that lacked some;
- ``lr_mult``: per-group ratios kept as multipliers applied at step time, so a scheduler that
  writes one scalar lr into every group (DeepSpeed ``WarmupLR``) cannot erase them (F2);
- the non-finite guard: a step whose gradients hold inf/NaN touches neither parameters nor
  state (F10), is counted and warned about. Single-process steps decide it on the device (the
  flag masks the update, issue 12), so the step itself needs no host sync; the warning reads the
  flag once after the step is queued, and ``capturable=True`` drops that read too (the count
  stays on the device until ``nonfinite_steps`` is read). Engines whose ranks must agree before
  communicating (``shared_finite_check``) decide on the host, before any group steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "DeviceGuard",
    "GroupedOptimizer",
    "SharedFiniteCheck",
    "SkippedStepCounter",
    "copyable_attributes",
    "effective_lr",
    "finite_flag",
    "group_label",
    "param_label",
    "skip_nonfinite_step",
    "step_lr",
    "warn_skipped",
]


def _scalar(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


def effective_lr(group: dict[str, Any]) -> float:
    """The lr a group steps with: the (scheduled) ``lr`` times the group's ``lr_mult``."""
    return _scalar(group["lr"]) * group.get("lr_mult", 1.0)


def step_lr(group: dict[str, Any]) -> float | Tensor:
    """:func:`effective_lr` without a host sync: a tensor lr stays a tensor (one op with ``lr_mult``)."""
    lr, mult = group["lr"], group.get("lr_mult", 1.0)
    if not isinstance(lr, Tensor):
        return float(lr) * mult
    return lr if mult == 1.0 else lr * mult


class DeviceGuard(NamedTuple):
    """This step's non-finite verdict, on the device: ``finite`` (0-dim bool) masks the Muon update,
    ``found_inf`` (0-dim float, 1.0 when a gradient is non-finite) is what torch's fused AdamW takes."""

    finite: Tensor
    found_inf: Tensor

    @classmethod
    def from_grads(cls, grads: list[Tensor]) -> DeviceGuard:
        flag = finite_flag(grads)
        return cls(finite=flag.bool(), found_inf=1.0 - flag)


def group_label(group: dict[str, Any], index: int) -> str:
    name = group.get("name")
    return f"param group {index}" + (f" ({name!r})" if name else "")


def param_label(group: dict[str, Any], position: int, param: Tensor) -> str:
    names = group.get("param_names")
    shape = tuple(param.shape)
    if names:
        return f"parameter {names[position]!r} (shape {shape})"
    return f"parameter #{position} (shape {shape})"


def check_lr(lr: Any, where: str) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element" + f" ({where})")
    if not _scalar(lr) >= 0.0:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr} ({where})")


def check_nonnegative(group: dict[str, Any], key: str, where: str) -> None:
    if not group[key] >= 0.0:
        raise ValueError(f"{key} should be >= 0 but is: {group[key]} ({where})")


def check_betas(betas: Any, where: str) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r} ({where})")


class SkippedStepCounter:
    """``nonfinite_steps``: steps skipped for a non-finite gradient, counted on the host (the host
    guard) or on the device (the device guard: no sync until the count is read).

    Shared by :class:`GroupedOptimizer` and :class:`expertopt.MoEOptimizer`, whose one verdict
    covers its dense and expert optimizers. Owners set ``capturable``.
    """

    capturable: bool
    _host_nonfinite_steps: int = 0
    _device_nonfinite_steps: Tensor | None = None

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for a non-finite gradient (reads the device counter: one sync, on demand)."""
        device = self._device_nonfinite_steps
        return self._host_nonfinite_steps + (int(device.item()) if device is not None else 0)

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self._host_nonfinite_steps, self._device_nonfinite_steps = value, None

    def _count_skipped(self, guard: DeviceGuard) -> None:
        """Count a masked step on the device; unless ``capturable``, read it once to warn (F10)."""
        skipped = guard.found_inf
        if self._device_nonfinite_steps is None:
            self._device_nonfinite_steps = torch.zeros_like(skipped)
        self._device_nonfinite_steps.add_(skipped)  # in place: the same tensor step after step
        if not self.capturable and skipped.item():
            warn_skipped(self, stacklevel=5)


class GroupedOptimizer(SkippedStepCounter, Optimizer):
    """Base class: validation, eager state, lr multipliers and the non-finite guard.

    Subclasses implement :meth:`_complete_group` (validate a group), :meth:`_init_state` (create
    state for one parameter) and :meth:`_step_group` (the update rule for one group).
    """

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, skip_nonfinite: bool = True, capturable: bool = False
    ) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        self._host_nonfinite_steps = 0
        self._device_nonfinite_steps = None
        # Set by engine adapters when each rank holds only a partition of the gradients (ZeRO-1/2).
        self.shared_finite_check: SharedFiniteCheck | None = None
        super().__init__(params, defaults)

    # -- groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        self._check_no_overlap(param_group, index)
        self._fill_defaults(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._complete_group(group, group_label(group, index))
        for position, param in enumerate(group["params"]):
            self._init_state(group, param, position)

    def _check_no_overlap(self, param_group: dict[str, Any], index: int) -> None:
        """Name the parameter that is already in another group (torch's own error does not)."""
        params = param_group["params"]
        if isinstance(params, set):
            return  # torch raises its TypeError about sets
        items = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = items  # a generator can be read only once
        named = [item for item in items if isinstance(item, tuple)]
        names = [name for name, _ in named] or param_group.get("param_names")
        tensors = [item[1] if isinstance(item, tuple) else item for item in items]
        seen = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for position, param in enumerate(tensors):
            if id(param) in seen:
                other = seen[id(param)]
                label = param_label({"param_names": names}, position, param)
                raise ValueError(
                    f"{label} is in {group_label(param_group, index)} and in "
                    f"{group_label(self.param_groups[other], other)}; each parameter must be in "
                    "exactly one group: remove it from one of them"
                )

    def _fill_defaults(self, group: dict[str, Any]) -> None:
        """Fill keys the group lacks (torch fills ``self.defaults`` too; subclasses add more)."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)

    def _complete_group(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], param: Tensor, position: int) -> None:
        raise NotImplementedError

    def rebind_state(self) -> None:
        """Re-create state for the tensors the groups hold now.

        For engines (ZeRO-1/2) that replace each group's parameters with a flat partition after
        the optimizer was built: state must be keyed by what ``state_dict`` will find in the groups.
        """
        self.state.clear()
        for index, group in enumerate(self.param_groups):
            self._complete_group(group, group_label(group, index))
            for position, param in enumerate(group["params"]):
                self._init_state(group, param, position)

    # -- checkpoints -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return copyable_attributes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then re-complete groups and fill state a checkpoint lacked (e.g. torch.optim.Muon's
        lazily created state), so every parameter has the same keys afterwards."""
        super().load_state_dict(state_dict)
        for index, group in enumerate(self.param_groups):
            self._fill_defaults(group)
            self._complete_group(group, group_label(group, index))
            for position, param in enumerate(group["params"]):
                self._init_state(group, param, position)

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step; a no-op (counted) if any gradient is non-finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self.all_grads()
        if self.skip_nonfinite and self._guard_on_device():
            guard = DeviceGuard.from_grads(grads)
            self._step_groups(guard)
            self._count_skipped(guard)
        elif not skip_nonfinite_step(self, grads):
            self._step_groups(None)
        return loss

    def _guard_on_device(self) -> bool:
        """Whether every group can mask its own update with a device flag (else the host decides).

        Not when ranks must agree before communicating (``shared_finite_check``); subclasses add
        their own conditions (e.g. an AdamW group that does not run torch's fused kernel).
        """
        return self.shared_finite_check is None

    def _step_groups(self, guard: DeviceGuard | None) -> None:
        for group in self.param_groups:
            self._step_group(group, guard)

    def _step_group(self, group: dict[str, Any], guard: DeviceGuard | None) -> None:
        raise NotImplementedError

    def effective_lrs(self) -> list[float]:
        """Each group's lr as it will be applied: ``lr * lr_mult``."""
        return [effective_lr(g) for g in self.param_groups]

    # -- step helpers ------------------------------------------------------------------------
    @staticmethod
    def _grads_of(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters of ``group`` that have a gradient, and their gradients."""
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def all_grads(self) -> list[Tensor]:
        """Every gradient, after rejecting complex parameters and sparse gradients (RuntimeError, as torch)."""
        grads = []
        for group in self.param_groups:
            rule = "Muon" if group.get("use_muon") else "AdamW"
            for param in self._grads_of(group)[0]:
                if torch.is_complex(param):
                    raise RuntimeError(f"{rule} does not support complex parameters")
                if param.grad.is_sparse:
                    raise RuntimeError(f"{rule} does not support sparse gradients")
                grads.append(param.grad)
        return grads


# torch's __setstate__ re-creates these empty; its own __getstate__ leaves them out.
_HOOK_TABLES = frozenset(
    f"_optimizer_{kind}_hooks"
    for kind in (
        "step_pre",
        "step_post",
        "state_dict_pre",
        "state_dict_post",
        "load_state_dict_pre",
        "load_state_dict_post",
    )
)


def copyable_attributes(optimizer: Optimizer) -> dict[str, Any]:
    """What ``copy.deepcopy`` and pickle keep of an expertopt optimizer: every attribute but torch's
    hook tables. torch's own ``__getstate__`` keeps only defaults, state and param_groups, which
    would drop the attributes expertopt's optimizers step with (a copy would fail at its first step).
    """
    return {key: value for key, value in optimizer.__dict__.items() if key not in _HOOK_TABLES}


SharedFiniteCheck = Callable[[list[Tensor]], tuple[bool, Hashable]]
"""``check(local_grads) -> (finite, step)``: the verdict "every gradient on every rank is finite",
identical on all ranks, and an id of the optimizer step it belongs to; calls with the same id are
groups of one step (DeepSpeed's ZeRO steps the optimizer one group at a time)."""


def skip_nonfinite_step(owner: Any, grads: list[Tensor]) -> bool:
    """True (and counted in ``owner.nonfinite_steps``, and warned) when a gradient holds inf/NaN.

    The host-side guard (see the module docstring for the device-side one): one host sync before
    the step, the price of never folding a bad gradient into momentum (F10). Under
    sharding (``owner.shared_finite_check`` set by an engine adapter) every rank takes the same
    decision, so that none skips a step, and its collectives, that another one takes, and no
    partition of a model steps while another stands still.
    """
    if not owner.skip_nonfinite:
        return False
    check = getattr(owner, "shared_finite_check", None)
    finite, step = check(grads) if check is not None else (bool(finite_flag(grads)), None)
    if finite:
        return False
    if step is not None and step == getattr(owner, "_skipped_step", None):
        return True  # another group of a step already counted (engines step group by group)
    owner._skipped_step = step
    owner.nonfinite_steps += 1
    warn_skipped(owner, stacklevel=5)
    return True


def warn_skipped(owner: Any, stacklevel: int) -> None:
    warnings.warn(
        f"{type(owner).__name__}: non-finite gradient, step skipped; parameters and optimizer state "
        f"are unchanged ({owner.nonfinite_steps} skipped so far)",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def finite_flag(tensors: list[Tensor]) -> Tensor:
    """1.0 if every element of every tensor is finite, else 0.0: one fused norm kernel.

    Norms are accumulated in fp32 so finite fp16 gradients cannot overflow into a false alarm;
    inf and NaN propagate into the norm. A finite gradient whose norm exceeds fp32's range
    (~3e38) counts as non-finite too: such a step would be garbage anyway.
    """
    if not tensors:
        return torch.ones(())
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).isfinite().all().float()

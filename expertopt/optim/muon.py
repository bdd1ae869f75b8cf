"""``expertopt.Muon``: a drop-in for ``torch.optim.Muon`` that also trains MoE models.

Accepts everything ``torch.optim.Muon`` (torch 2.13) accepts, with the same defaults, meaning and
error types, and follows its trajectory on 2-D weights. Beyond torch:

- 3-D+ parameters are batches of matrices (stacked experts ``[E, out, in]``), each normalized and
  lr-scaled by its own shape; 4-D convolution weights are flattened to ``[out, in*kh*kw]`` unless
  the group is tagged ``expert``;
- matrices of identical shape, dtype and device in a group share one batched Newton-Schulz call;
- ``ns_method`` ("standard", "gram", "polar_express", "auto") and ``ns_dtype``;
- ``num_heads`` in a group orthogonalizes each attention head separately;
- groups with ``use_muon=False`` are stepped with AdamW (``betas``, ``eps``, ``weight_decay``)
  through torch's fused/foreach kernels;
- ``lr_mult`` per group, non-finite gradient guard, eager state (see ``_base``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from expertopt.distributed.step import (
    ShardedMatrices,
    check_agreement,
    owner_muon_step,
    place,
    sharded_muon_step,
    shards_of,
)
from expertopt.kernels import (
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    NS_METHODS,
    resolve_ns_dtype,
)
from expertopt.optim._base import (
    DeviceGuard,
    GroupedOptimizer,
    check_betas,
    check_lr,
    check_nonnegative,
    effective_lr,
    param_label,
    step_lr,
)
from expertopt.optim.adamw import adamw_group_is_fused, init_adamw_state, step_adamw_group
from expertopt.updates.muon import (
    ADJUST_LR_FNS,
    MATRIX_LAYOUTS,
    MuonHyperparams,
    matrix_view,
    matrix_view_options,
    muon_step,
    plan_muon_step,
)
from expertopt.updates.muon_buckets import MuonPlan

__all__ = ["Muon"]

# Defaults of the AdamW half; a use_muon=False group that does not set them gets these.
ADAMW_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8}


class Muon(GroupedOptimizer):
    r"""Muon (MomentUm Orthogonalized by Newton-Schulz) with an AdamW half for non-matrix params.

    For each Muon group, with momentum :math:`\mu`, lr :math:`\gamma` (times ``lr_mult``) and
    weight decay :math:`\lambda`, exactly as ``torch.optim.Muon``:

    .. math::
        B_t = \mu B_{t-1} + (1-\mu) g_t, \qquad
        \tilde B_t = \begin{cases} (1-\mu) g_t + \mu B_t & \text{nesterov} \\ B_t \end{cases}

        O_t = \mathrm{NS}(\tilde B_t) \text{ per matrix}, \qquad
        \theta_t = \theta_{t-1}(1 - \gamma\lambda) - \mathrm{AdjustLR}(\gamma, m, n)\, O_t

    where :math:`m \times n` is each matrix's own shape (the last two dims).

    Args:
        params: parameters or param groups (``expertopt.build_param_groups`` builds them for a model).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as in ``torch.optim.Muon`` (same defaults).
        ns_method: "standard" (default; torch's iteration), "gram", "polar_express" or "auto"
            (standard or Gram by device and shape: same iteration, different cost).
        ns_dtype: Newton-Schulz compute dtype: "auto" (default; bf16 for the standard iteration,
            as torch does, on GPUs and on CPUs where torch multiplies bf16 through oneDNN; fp32
            on other CPUs, whose bf16 GEMM is ~10x slower than fp32; never fp16 on CPU),
            "bfloat16", "float16" or "float32". Use float32 for parity tests: bf16 amplifies
            rounding noise in near-null gradient directions.
        betas, adamw_eps: defaults of ``use_muon=False`` groups (their ``eps`` key is AdamW's eps).
        fused, foreach: torch AdamW implementation for ``use_muon=False`` groups; None picks fused
            where supported.
        skip_nonfinite: skip (and count in ``nonfinite_steps``) a step with an inf/NaN gradient.
        capturable: no host sync at all in ``step()``: a skipped step is counted on the device
            (read when ``nonfinite_steps`` is read) and not warned about. Otherwise the step reads
            its non-finite flag once, after the work is queued, to warn.

    Group keys beyond torch's: ``use_muon`` (default True), ``expert`` (bool), ``num_heads``,
    ``matrix_layout`` ("out_in" default, "in_out" for ``[E, in, out]`` experts, "flatten" for
    convolutions: sets each matrix's fan-out/fan-in for the lr scale), ``row_blocks`` (a 2-D
    stack of that many matrices along its rows, e.g. DBRX experts), ``lr_mult`` (default 1.0),
    ``name``, ``link`` (see :class:`expertopt.MoEOptimizer`).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
        eps: float = DEFAULT_EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        ns_method: str = "standard",
        ns_dtype: str | torch.dtype = "auto",
        betas: tuple[float, float] = ADAMW_DEFAULTS["betas"],
        adamw_eps: float = ADAMW_DEFAULTS["eps"],
        fused: bool | None = None,
        foreach: bool | None = None,
        skip_nonfinite: bool = True,
        capturable: bool = False,
    ) -> None:
        # Checked here as torch.optim.Muon does (same messages), and again per group.
        check_lr(lr, "Muon")
        if not momentum >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        self.adamw_defaults = {"betas": betas, "eps": adamw_eps, "fused": fused, "foreach": foreach}
        # Every unit an engine placed (see place_shards): for reports; the step reads each
        # tensor's own unit (``shards_of``).
        self.shard_units: list[ShardedMatrices] = []
        # Stacked layout of each group's single-process Muon parameters, by group index: (key, plan).
        self._muon_plans: dict[int, tuple[tuple, MuonPlan]] = {}
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "ns_method": ns_method,
            "ns_dtype": ns_dtype,
            "use_muon": True,
            "expert": False,
            "num_heads": None,
            "matrix_layout": "out_in",
            "row_blocks": None,
            "lr_mult": 1.0,
        }
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite, capturable=capturable)

    # -- groups ------------------------------------------------------------------------------
    def _fill_defaults(self, group: dict[str, Any]) -> None:
        if not group.get("use_muon", True):
            # The AdamW half has its own eps default (Muon's eps is the Newton-Schulz epsilon).
            for key, value in self.adamw_defaults.items():
                group.setdefault(key, value)
        super()._fill_defaults(group)

    def _complete_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)
        for key in ("weight_decay", "lr_mult", "eps"):
            check_nonnegative(group, key, where)
        if group["use_muon"]:
            self._check_muon_group(group, where)
        else:
            check_betas(group["betas"], where)

    def _check_muon_group(self, group: dict[str, Any], where: str) -> None:
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']} ({where})")
        coefficients = group["ns_coefficients"]
        if not (isinstance(coefficients, (tuple, list)) and len(coefficients) == 3):
            raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {coefficients!r} ({where})")
        if not (isinstance(group["ns_steps"], int) and 1 <= group["ns_steps"] < 100):
            raise ValueError(f"ns_steps must be an int in [1, 100), got {group['ns_steps']!r} ({where})")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"adjust_lr_fn={group['adjust_lr_fn']!r} is not supported; use one of {ADJUST_LR_FNS} ({where})"
            )
        if group["ns_method"] not in NS_METHODS:
            raise ValueError(
                f"ns_method={group['ns_method']!r} is unknown; use one of {NS_METHODS} ({where})"
            )
        resolve_ns_dtype(group["ns_dtype"], torch.device("cpu"), "standard")  # raises on a bad value
        for key in ("num_heads", "row_blocks"):
            if group[key] is not None and not (isinstance(group[key], int) and group[key] >= 1):
                raise ValueError(f"{key} must be a positive int or None, got {group[key]!r} ({where})")
        if group["matrix_layout"] not in MATRIX_LAYOUTS:
            raise ValueError(
                f"matrix_layout={group['matrix_layout']!r} is unknown; use one of {MATRIX_LAYOUTS} ({where})"
            )
        for position, param in enumerate(group["params"]):
            if param.ndim < 2 and shards_of(param) is None:
                raise ValueError(
                    f"{param_label(group, position, param)} is {param.ndim}-D and cannot be in a Muon "
                    f"group ({where}): Muon orthogonalizes matrices. Move it to a group with "
                    "use_muon=False (AdamW), or let expertopt.build_param_groups(model) route it"
                )
            if shards_of(param) is None:
                self._check_layout_fits(group, position, param, where)

    @staticmethod
    def _check_layout_fits(group: dict[str, Any], position: int, param: Tensor, where: str) -> None:
        """The group's layout keys must describe this tensor (same view the step will take)."""
        try:
            matrix_view(
                torch.empty(param.shape, device="meta"),
                **matrix_view_options(group),
            )
        except ValueError as error:
            raise ValueError(
                f"{param_label(group, position, param)} does not fit its group's layout ({where}): {error}. "
                "Put tensors of another layout in a group of their own, or let "
                "expertopt.build_param_groups(model) make one group per layout"
            ) from None

    def _init_state(self, group: dict[str, Any], param: Tensor, position: int) -> None:
        state = self.state[param]
        if not group["use_muon"]:
            init_adamw_state(state, param, group.get("amsgrad", False))
        elif "momentum_buffer" not in state:
            unit = shards_of(param)
            if unit is not None:
                state["momentum_buffer"] = unit.new_momentum(param)
            else:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._muon_plans.clear()  # the loaded momentum is re-stacked by the next step's plan
        super().load_state_dict(state_dict)

    def rebind_state(self) -> None:
        self._muon_plans.clear()
        super().rebind_state()

    # -- step --------------------------------------------------------------------------------
    def _guard_on_device(self) -> bool:
        """The device flag masks single-process Muon and fused AdamW; ZeRO's partitions, the
        ZeRO-0 exchange and non-fused AdamW take the host's decision before stepping."""
        if self.shard_units or not super()._guard_on_device():
            return False
        return all(group["use_muon"] or adamw_group_is_fused(group) for group in self.param_groups)

    def _step_group(self, group: dict[str, Any], guard: DeviceGuard | None) -> None:
        if group["use_muon"]:
            self._step_muon_group(group, guard)
        else:
            step_adamw_group(self, group, guard)

    def _muon_plan(self, group: dict[str, Any], params: list[Tensor]) -> MuonPlan:
        """The stacked layout of ``params``, planned when they (or the group's layout keys) change.

        Planning moves each parameter's momentum into its bucket's stacked buffer and makes
        ``state[p]["momentum_buffer"]`` a view of it, so ``state_dict`` keeps torch's layout.
        """
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        key = (
            tuple(map(id, params)),
            group["ns_method"],
            group["ns_dtype"],  # sizes the planned Newton-Schulz workspace
            group["adjust_lr_fn"],
            *matrix_view_options(group).values(),
        )
        cached = self._muon_plans.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        states = [self.state[p] for p in params]
        plan = plan_muon_step(
            params,
            [s["momentum_buffer"] for s in states],
            MuonHyperparams.from_group(group, 0.0),
            **matrix_view_options(group),
        )
        for state, view in zip(states, plan.momentum_views, strict=True):
            state["momentum_buffer"] = view
        self._muon_plans[index] = (key, plan)
        return plan

    def _step_muon_group(self, group: dict[str, Any], guard: DeviceGuard | None) -> None:
        """Whole parameters through the planned ``muon_step``; tensors an engine placed in a unit
        (ZeRO partitions, replicated parameters) through the distributed step, one call per unit."""
        units: dict[int, tuple[ShardedMatrices, list[Tensor]]] = {}
        whole = []
        for param in group["params"]:
            unit = shards_of(param)
            if unit is None:
                if param.grad is not None:
                    whole.append(param)
            else:
                units.setdefault(id(unit), (unit, []))[1].append(param)
        if whole:
            plan = self._muon_plan(group, whole)
            muon_step(
                whole,
                [p.grad for p in whole],
                plan.momentum_views,
                MuonHyperparams.from_group(group, step_lr(group)),
                **matrix_view_options(group),
                plan=plan,
                finite=guard.finite if guard is not None else None,
            )
        if not units:
            return
        # Sharded units take a float lr (their exchange syncs anyway); reading a tensor lr here
        # for whole parameters too was a host sync in every capturable step.
        hyper = MuonHyperparams.from_group(group, effective_lr(group))
        for unit, params in units.values():
            if len(params) != len(unit.layout.buffer_numels):
                raise ValueError(
                    f"a sharded Muon unit expects {len(unit.layout.buffer_numels)} local buffers in one "
                    f"param group, found {len(params)}: the engine adapter placed it inconsistently"
                )
            if unit.gradients_at_owner:
                owner_muon_step(params, self.state[params[0]]["momentum_buffer"], unit, hyper)
                continue
            # Every rank of the unit joins the exchange: a buffer without a gradient (no tokens
            # reached it) contributes zeros, the same decision on every rank.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            sharded_muon_step(params, grads, buffers, unit, hyper)

    # -- engines -----------------------------------------------------------------------------
    def place_shards(self, placements: list[tuple[Tensor, ShardedMatrices]]) -> None:
        """Declare local buffers that stand in for (parts of) Muon matrices, each with its unit.

        Called by an engine adapter (``expertopt.integrations``) once the groups hold the tensors
        the engine will step (ZeRO flat partitions, or ZeRO-0's replicated parameters). Ranks
        first check that they agree on every unit (a clear error on all of them, not a hang),
        then state is re-created for the tensors the groups hold.
        """
        units = list({id(unit): unit for _, unit in placements}.values())
        check_agreement(units)
        for tensor, unit in placements:
            place(tensor, unit)
        self.shard_units = units
        self.rebind_state()

    def owned_matrices(self) -> int:
        """Matrices this rank orthogonalizes per step, over every placed unit."""
        return sum(unit.owned_matrices for unit in self.shard_units)

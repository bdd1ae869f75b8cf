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

from expertopt.distributed.step import ShardedMatrices, check_agreement, place, sharded_muon_step, shards_of
from expertopt.kernels import (
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    NS_METHODS,
    resolve_ns_dtype,
)
from expertopt.optim._base import (
    GroupedOptimizer,
    check_betas,
    check_lr,
    check_nonnegative,
    effective_lr,
    param_label,
)
from expertopt.optim.adamw import init_adamw_state, step_adamw_group
from expertopt.updates.muon import ADJUST_LR_FNS, MuonHyperparams, muon_step

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
            as torch does; never fp16 on CPU), "bfloat16", "float16" or "float32". Use float32 for
            parity tests: bf16 amplifies rounding noise in near-null gradient directions.
        betas, adamw_eps: defaults of ``use_muon=False`` groups (their ``eps`` key is AdamW's eps).
        fused, foreach: torch AdamW implementation for ``use_muon=False`` groups; None picks fused
            where supported.
        skip_nonfinite: skip (and count in ``nonfinite_steps``) a step with an inf/NaN gradient.

    Group keys beyond torch's: ``use_muon`` (default True), ``expert`` (bool), ``num_heads``,
    ``lr_mult`` (default 1.0), ``name``, ``link`` (see :class:`expertopt.MoEOptimizer`).
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
            "lr_mult": 1.0,
        }
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

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
        heads = group["num_heads"]
        if heads is not None and not (isinstance(heads, int) and heads >= 1):
            raise ValueError(f"num_heads must be a positive int or None, got {heads!r} ({where})")
        for position, param in enumerate(group["params"]):
            if param.ndim < 2 and shards_of(param) is None:
                raise ValueError(
                    f"{param_label(group, position, param)} is {param.ndim}-D and cannot be in a Muon "
                    f"group ({where}): Muon orthogonalizes matrices. Move it to a group with "
                    "use_muon=False (AdamW), or let expertopt.build_param_groups(model) route it"
                )

    def _init_state(self, group: dict[str, Any], param: Tensor, position: int) -> None:
        state = self.state[param]
        if not group["use_muon"]:
            init_adamw_state(state, param, group.get("amsgrad", False))
        elif "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    # -- step --------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any]) -> None:
        if group["use_muon"]:
            self._step_muon_group(group)
        else:
            step_adamw_group(self, group)

    def _step_muon_group(self, group: dict[str, Any]) -> None:
        """Whole parameters through ``muon_step``; tensors an engine placed in a unit (ZeRO
        partitions, replicated parameters) through the distributed step, one call per unit."""
        hyper = MuonHyperparams.from_group(group, effective_lr(group))
        units: dict[int, tuple[ShardedMatrices, list[Tensor]]] = {}
        whole = []
        for param in group["params"]:
            unit = shards_of(param)
            if unit is None:
                if param.grad is not None:
                    whole.append(param)
            else:
                units.setdefault(id(unit), (unit, []))[1].append(param)
        muon_step(
            whole,
            [p.grad for p in whole],
            [self.state[p]["momentum_buffer"] for p in whole],
            hyper,
            is_expert=group["expert"],
            num_heads=group["num_heads"],
        )
        for unit, params in units.values():
            if len(params) != len(unit.layout.buffer_numels):
                raise ValueError(
                    f"a sharded Muon unit expects {len(unit.layout.buffer_numels)} local buffers in one "
                    f"param group, found {len(params)}: the engine adapter placed it inconsistently"
                )
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

"""Hugging Face Trainer without DeepSpeed: expertopt through transformers' optimizer-factory hook.

transformers 5.x builds the optimizer with ``optimizer_cls()(model, **kwargs)`` when the first item
of ``Trainer(optimizer_cls_and_kwargs=(optimizer_cls, kwargs))`` is not a ``torch.optim.Optimizer``
subclass (``transformers.trainer_optimizer.is_optimizer_factory``). :class:`MuonFactory` is such a
factory: it sees the whole model, so it can route every parameter with
:func:`expertopt.build_param_groups` (Muon for hidden matrices, routers and expert stacks; AdamW for
embeddings, head, norms and biases) and return one optimizer whose ``param_groups`` hold every group,
experts included, for the Trainer's scheduler to drive (F1, F2).

This module imports nothing from transformers: the Trainer calls the factory, the factory only
needs the model. With a DeepSpeed config the Trainer does not use the factory at all; see
``docs/trainer.md`` for that path.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.optim import Optimizer

from expertopt.optim import MoEOptimizer, Muon
from expertopt.param_groups import build_param_groups

__all__ = ["MuonFactory"]

# Keywords that shape the groups; everything else goes to the optimizer (momentum, ns_method, ...).
GROUP_KEYS = frozenset(name for name in inspect.signature(build_param_groups).parameters if name != "model")
OPTIMIZER_KEYS = frozenset(name for name in inspect.signature(Muon).parameters if name != "params")


class MuonFactory:
    """``Trainer(optimizer_cls_and_kwargs=(MuonFactory, kwargs))``: expertopt's Muon for a Trainer.

    ``kwargs`` must hold ``lr`` (the Muon lr the scheduler starts from: the Trainer passes neither
    ``TrainingArguments.learning_rate`` nor ``weight_decay`` to a factory). Other keys go to
    :func:`expertopt.build_param_groups` (``adamw_lr``, ``weight_decay``, ``adamw_weight_decay``,
    ``expert_lr_mult``, ``router``, ``head_names``, ``rules``) or to :class:`expertopt.Muon`
    (``momentum``, ``nesterov``, ``ns_method``, ``ns_dtype``, ``betas``, ...).

    Returns a :class:`expertopt.MoEOptimizer` (dense and expert optimizers stepped as one, expert
    groups following their dense group's schedule) when the model has experts, else a
    :class:`expertopt.Muon`. Every group keeps its ``lr_mult``, so a scheduler that writes one lr
    into every group keeps the Muon/AdamW and expert ratios.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> Optimizer:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MuonFactory expects the model the Trainer passes, got {type(model).__name__}")
        if _trainer_runs_deepspeed():
            raise ValueError(
                "MuonFactory is for the Trainer without DeepSpeed: under ZeRO, DeepSpeed would step it on "
                'flat partitions. With a DeepSpeed config, name the optimizer there ("optimizer": '
                '{"type": "Muon", "params": {...}}), call expertopt.patch_deepspeed() and drop '
                "optimizer_cls_and_kwargs (docs/trainer.md)"
            )
        if "lr" not in kwargs:
            raise TypeError(
                "MuonFactory needs lr: pass optimizer_cls_and_kwargs=(MuonFactory, {'lr': ...}); "
                "the Trainer does not hand TrainingArguments.learning_rate to optimizer factories"
            )
        unknown = set(kwargs) - GROUP_KEYS - OPTIMIZER_KEYS
        if unknown:
            raise TypeError(
                f"MuonFactory got unknown options {sorted(unknown)}; group options: {sorted(GROUP_KEYS)}, "
                f"optimizer options: {sorted(OPTIMIZER_KEYS)}"
            )
        groups = build_param_groups(model, **{k: v for k, v in kwargs.items() if k in GROUP_KEYS})
        # lr is both: the groups' scheduled lr and the optimizer's default.
        defaults = {k: v for k, v in kwargs.items() if k in OPTIMIZER_KEYS}
        if any(group["expert"] for group in groups) and any(not group["expert"] for group in groups):
            return MoEOptimizer.from_groups(groups, Muon, **defaults)
        return Muon(groups, **defaults)


def _trainer_runs_deepspeed() -> bool:
    """Whether accelerate's process-wide state says DeepSpeed is on (what ``Trainer.is_deepspeed_enabled``
    reads). The Trainer calls a factory under DeepSpeed only when the config has no "optimizer" block."""
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # no accelerate, no Trainer
        return False
    return AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED

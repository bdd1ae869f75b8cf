"""expertopt: Muon and AdamW for Mixture-of-Experts training.

``import expertopt`` never imports deepspeed; the DeepSpeed integration lives in
``expertopt.integrations.deepspeed`` and imports it on use.
"""

from expertopt.kernels import orthogonalize
from expertopt.optim import LINKED_KEYS, AdamW, MoEOptimizer, Muon, effective_lr
from expertopt.param_groups import Rule, build_param_groups, is_expert_param

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with expertopt's optimizer; see :mod:`expertopt.integrations.deepspeed`.

    Imports deepspeed on call, so ``import expertopt`` stays free of it.
    """
    from expertopt.integrations.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


def patch_deepspeed() -> None:
    """One line for callers of ``deepspeed.initialize`` you do not control (the Hugging Face
    Trainer, accelerate, Lightning): configs naming ``"Muon"`` or ``"AdamW"`` get expertopt's
    optimizer; see :func:`expertopt.integrations.deepspeed.patch_deepspeed`. Imports deepspeed on call.
    """
    from expertopt.integrations.deepspeed import patch_deepspeed as _patch

    _patch()


def unpatch_deepspeed() -> None:
    """Undo :func:`patch_deepspeed`: ``deepspeed.initialize`` is DeepSpeed's own again."""
    from expertopt.integrations.deepspeed import unpatch_deepspeed as _unpatch

    _unpatch()


__all__ = [
    "LINKED_KEYS",
    "AdamW",
    "MoEOptimizer",
    "Muon",
    "Rule",
    "__version__",
    "build_param_groups",
    "effective_lr",
    "initialize",
    "is_expert_param",
    "orthogonalize",
    "patch_deepspeed",
    "unpatch_deepspeed",
]

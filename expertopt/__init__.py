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
]

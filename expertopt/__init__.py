"""expertopt: Muon and AdamW for Mixture-of-Experts training.

``import expertopt`` never imports deepspeed; the DeepSpeed integration lives in
``expertopt.integrations.deepspeed`` and imports it on use.
"""

from expertopt.kernels import orthogonalize
from expertopt.optim import LINKED_KEYS, AdamW, MoEOptimizer, Muon, effective_lr
from expertopt.param_groups import Rule, build_param_groups, is_expert_param

__version__ = "0.1.0"

__all__ = [
    "LINKED_KEYS",
    "AdamW",
    "MoEOptimizer",
    "Muon",
    "Rule",
    "__version__",
    "build_param_groups",
    "effective_lr",
    "is_expert_param",
    "orthogonalize",
]

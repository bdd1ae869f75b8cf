"""``torch.optim`` front ends."""

from expertopt.optim._base import effective_lr
from expertopt.optim.adamw import AdamW
from expertopt.optim.expert import LINKED_KEYS, MoEOptimizer
from expertopt.optim.muon import Muon

__all__ = ["LINKED_KEYS", "AdamW", "MoEOptimizer", "Muon", "effective_lr"]

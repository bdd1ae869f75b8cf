"""Update rules (pure functions on local tensors), shared by every front end."""

from expertopt.updates.adamw import adamw_step
from expertopt.updates.muon import (
    MuonHyperparams,
    adjusted_lr,
    blend_momentum,
    matrix_view,
    muon_step,
    orthogonalize_updates,
)

__all__ = [
    "MuonHyperparams",
    "adamw_step",
    "adjusted_lr",
    "blend_momentum",
    "matrix_view",
    "muon_step",
    "orthogonalize_updates",
]

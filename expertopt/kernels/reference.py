"""Slow, obviously-correct references for testing :mod:`expertopt.kernels.newton_schulz`.

``newton_schulz_loop`` runs the standard quintic one matrix at a time with plain ``@`` (the
"stacked equals loop" invariant); ``polar_factor_svd`` gives the exact :math:`UV^T` from a float64
SVD. Neither is meant for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertopt.kernels.newton_schulz import DEFAULT_EPS, DEFAULT_NS_COEFFICIENTS, DEFAULT_NS_STEPS

__all__ = ["newton_schulz_loop", "polar_factor_svd"]


def _newton_schulz_matrix(
    G: torch.Tensor,
    schedule: Sequence[tuple[float, float, float]],
    eps: float,
    dtype: torch.dtype,
    norm_scale: float,
) -> torch.Tensor:
    """The textbook iteration on one 2-D matrix, in the order Keller Jordan's Muon writes it."""
    X = G.float() if G.dtype in (torch.float16, torch.bfloat16) else G
    if G.size(0) > G.size(1):
        X = X.T
    X = (X / (X.norm() * norm_scale).clamp(min=eps)).to(dtype)
    for a, b, c in schedule:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X.to(G.dtype)


def newton_schulz_loop(
    G: torch.Tensor,
    *,
    steps: int = DEFAULT_NS_STEPS,
    coefficients: tuple[float, float, float] | Sequence[tuple[float, float, float]] = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype = torch.float32,
    norm_scale: float = 1.0,
) -> torch.Tensor:
    """Standard Newton-Schulz on each matrix of ``G: [..., m, n]`` in a Python loop.

    ``coefficients`` is one (a, b, c) triple used for every step, or a sequence of triples, one
    per step (``steps`` is then ignored), which lets Polar Express be checked with
    ``norm_scale=1.01``. Normalization follows the kernel's contract: per matrix, fp32 for
    half-precision inputs, ``clamp(min=eps)``.
    """
    if isinstance(coefficients[0], (int, float)):
        schedule = [tuple(coefficients)] * steps
    else:
        schedule = [tuple(triple) for triple in coefficients]
    m, n = G.shape[-2:]
    matrices = [
        _newton_schulz_matrix(matrix, schedule, eps, dtype, norm_scale) for matrix in G.reshape(-1, m, n)
    ]
    return torch.stack(matrices).reshape(G.shape)


def polar_factor_svd(G: torch.Tensor) -> torch.Tensor:
    """Exact polar factor :math:`UV^T` of each matrix of ``G: [..., m, n]`` via a float64 SVD, in ``G.dtype``."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).to(G.dtype)

"""Orthogonalization kernels: pure functions on ``[..., m, n]`` tensors, no optimizer state."""

from expertopt.kernels.newton_schulz import (
    DEFAULT_EPS,
    DEFAULT_NS_COEFFICIENTS,
    DEFAULT_NS_STEPS,
    NS_DTYPES,
    NS_METHODS,
    POLAR_EXPRESS_COEFFICIENTS,
    Workspace,
    cpu_bf16_matmul_is_fast,
    ns_flops,
    orthogonalize,
    resolve_ns_dtype,
    resolve_ns_method,
    workspace_shape,
)

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_NS_COEFFICIENTS",
    "DEFAULT_NS_STEPS",
    "NS_DTYPES",
    "NS_METHODS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "Workspace",
    "cpu_bf16_matmul_is_fast",
    "ns_flops",
    "orthogonalize",
    "resolve_ns_dtype",
    "resolve_ns_method",
    "workspace_shape",
]

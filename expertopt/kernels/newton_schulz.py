"""Batched Newton-Schulz orthogonalization of ``[..., m, n]`` tensors (the only NS math in expertopt).

Every matrix in the batch is orthogonalized independently in one batched call: the leading dims
are a batch, each matrix is normalized by its *own* Frobenius norm (a norm across the expert
axis is failure class F8), and tall matrices are transposed so the iteration runs on the short
side. Three iterations are provided:

``standard``
    Keller Jordan's quintic, identical to ``torch.optim.Muon``:
    :math:`A = XX^T,\\; X \\leftarrow aX + (bA + cA^2)X`.
``gram``
    Gram Newton-Schulz (Dao AI Lab, https://tridao.me/blog/2026/gram-newton-schulz/): iterate on
    the short-side Gram matrix :math:`R = XX^T` and accumulate the left factor :math:`Q`, restarting
    after two iterations. Equal to ``standard`` in exact arithmetic; fewer FLOPs when
    ``max(m, n) / min(m, n) >= 2``; square matrices fall back to ``standard``.
``polar_express``
    Amsel, Persson, Musco, Gower 2025, "The Polar Express" (arXiv 2505.16932): the standard
    quintic step with a per-iteration coefficient table that converges to :math:`UV^T`.

Numerical contract: in float32 the batched call equals a per-matrix loop to ~1e-6. In bf16 the
standard iteration is torch.optim.Muon's, product for product (bitwise equal when both
normalizations round to the same bf16 input); we normalize in fp32 where torch normalizes in
bf16, so on general input the two agree to bf16 rounding (~2% relative after 5 steps). Bitwise
equality with other implementations is not promised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

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

# Keller Jordan's quintic coefficients, the same as torch.optim.Muon's default ns_coefficients.
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_NS_STEPS = 5
DEFAULT_EPS = 1e-7
NS_METHODS = ("standard", "gram", "polar_express", "auto")
NS_DTYPES = ("auto", "bfloat16", "float16", "float32")

_DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MAX_STEPS = 100  # torch.optim.Muon refuses ns_steps >= 100 too

# Polar Express table before the safety factor, from the authors' code:
# https://github.com/NoahAmsel/PolarExpress/blob/7f0fb5730e3d5946f96b07404bbe476515f2caec/polar_express/basic.py
# (optimal_composition(l=1e-3, num_iters=8, safety_factor_eps=1e-2, cushion=0.02)).
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's safety factor: p(x / 1.01) for every polynomial but the last, so that rounding
# cannot push a singular value past the interval the next polynomial was fitted on. The same
# 1.01 also scales the initial normalization (X / (1.01 * ||X||_F)), as in their reference code.
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    *(
        (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
        for a, b, c in _POLAR_EXPRESS_RAW[:-1]
    ),
    _POLAR_EXPRESS_RAW[-1],
)

# Gram NS recomputes X and R = XX^T from the accumulated Q after this many iterations; the
# restart keeps half-precision error in R from compounding (Dao AI Lab; DeepSpeed's restart_at=2).
_GRAM_RESTART_AT = 2
# 'auto' picks gram only on accelerators and only from this aspect ratio on: counted with plain
# (non-symmetric) GEMMs, gram saves 12% of the FLOPs at ratio 2 but 33% at 4 and 46% at 8, and it
# issues more (smaller) matmuls, so the saving must be large to pay for itself.
_GRAM_AUTO_MIN_ASPECT_RATIO = 4
_ACCELERATOR_TYPES = ("cuda", "xpu")
# See _chunk_size: the working set of one batched call on CPU, sized to the L2 of the bench machine.
_CPU_CHUNK_BYTES = 1 << 20
# Smaller matrices are never chunked (see _chunk_size): 64 KiB is a 128 x 256 bf16 matrix.
_CPU_CHUNK_MIN_MATRIX_BYTES = 64 << 10
# _square_completion's bound: with b^2 / 4|c| at most this many times |a| + |b| + |c|, the
# completed square's terms (and its rounding) stay within ~10x the plain form's. Keller Jordan's
# coefficients give 0.27, Polar Express's at most 0.53.
_SQUARE_FORM_MAX_GROWTH = 4.0


def cpu_bf16_matmul_is_fast() -> bool:
    """Whether torch runs bf16 matmuls on this CPU through oneDNN (AVX-512 or Arm BF16).

    Without it torch falls back to a scalar bf16 GEMM: measured 1.9 GFLOP/s for a bf16
    ``bmm [32, 128, 128]`` against 25.6 in fp32 on a 2-core AVX2 machine (docs/benchmarks.md).
    """
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Read once: ``ns_dtype="auto"`` is resolved inside the optimizer step, which must not dispatch an
# op to ask (op count, torch.compile); tests patch this constant to check both policies.
_CPU_BF16_MATMUL_IS_FAST = cpu_bf16_matmul_is_fast()


def resolve_ns_method(method: str, shape: torch.Size | tuple[int, ...], device: torch.device) -> str:
    """Validate ``method`` and turn ``'auto'`` into ``'standard'`` or ``'gram'`` for this shape and device.

    ``'auto'`` never returns ``'polar_express'``: that computes a different iteration (it converges
    to :math:`UV^T`), so it must be asked for. On CPU ``'auto'`` is always ``'standard'``: gram needs
    more mantissa than bf16 and fp32 matmul runs at about a third of bf16's rate there.
    """
    if method not in NS_METHODS:
        raise ValueError(f"Unknown Newton-Schulz method {method!r}; expected one of {NS_METHODS}.")
    if len(shape) < 2:
        raise ValueError(
            f"Newton-Schulz needs a [..., m, n] shape, got {tuple(shape)}; "
            "route vectors and scalars to AdamW instead."
        )
    if method != "auto":
        return method
    short, long = sorted(shape[-2:])
    on_accelerator = torch.device(device).type in _ACCELERATOR_TYPES
    if on_accelerator and short > 0 and long >= _GRAM_AUTO_MIN_ASPECT_RATIO * short:
        return "gram"
    return "standard"


def resolve_ns_dtype(dtype: str | torch.dtype, device: torch.device, method: str) -> torch.dtype:
    """Return the compute dtype of the iteration; ``'auto'`` chooses per device and resolved method.

    ``'auto'``: cuda/xpu run standard and polar_express in bf16 and gram in fp16 (the Gram matrix
    needs the extra mantissa, as in Dao AI Lab's and DeepSpeed's kernels); CPU runs standard and
    polar_express in bf16 where torch multiplies bf16 through oneDNN (:func:`cpu_bf16_matmul_is_fast`)
    and in fp32 elsewhere (a scalar bf16 GEMM is ~10x slower than fp32 there), and gram in fp32;
    never fp16 on CPU (fp16 matmul is ~100-300x slower than bf16); other devices use fp32.
    Explicit dtypes are honoured as given.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_BY_NAME.values():
            raise ValueError(
                f"Unsupported Newton-Schulz dtype {dtype}; expected one of {NS_DTYPES} "
                "or torch.bfloat16 / torch.float16 / torch.float32."
            )
        return dtype
    if dtype not in NS_DTYPES:
        raise ValueError(
            f"Unknown Newton-Schulz dtype {dtype!r}; expected one of {NS_DTYPES} "
            "or torch.bfloat16 / torch.float16 / torch.float32."
        )
    if dtype != "auto":
        return _DTYPE_BY_NAME[dtype]
    if method not in NS_METHODS or method == "auto":
        raise ValueError(
            f"resolve_ns_dtype needs a resolved method, got {method!r}; "
            f"call resolve_ns_method first (resolved methods: {NS_METHODS[:-1]})."
        )
    device_type = torch.device(device).type
    if device_type in _ACCELERATOR_TYPES:
        return torch.float16 if method == "gram" else torch.bfloat16
    if device_type == "cpu":
        return torch.bfloat16 if method != "gram" and _CPU_BF16_MATMUL_IS_FAST else torch.float32
    return torch.float32


def _check_steps_and_coefficients(steps: int, coefficients: Sequence[float]) -> None:
    """Raise ValueError (never assert) on a bad iteration count or coefficient triple."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < _MAX_STEPS:
        raise ValueError(
            f"Newton-Schulz steps must be an int in [1, {_MAX_STEPS}), got {steps!r}; "
            f"the default is {DEFAULT_NS_STEPS}."
        )
    if (
        not isinstance(coefficients, Sequence)
        or len(coefficients) != 3
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in coefficients)
    ):
        raise ValueError(
            f"Newton-Schulz coefficients must be 3 numbers (a, b, c), got {coefficients!r}; "
            f"the default is {DEFAULT_NS_COEFFICIENTS}."
        )


def _coefficient_schedule(
    method: str, steps: int, coefficients: tuple[float, float, float]
) -> list[tuple[float, float, float]]:
    """One (a, b, c) per iteration; Polar Express reuses its last triple past the table's end."""
    if method != "polar_express":
        return [tuple(coefficients)] * steps
    table = list(POLAR_EXPRESS_COEFFICIENTS)
    return table[:steps] + [table[-1]] * max(0, steps - len(table))


class Workspace(NamedTuple):
    """Newton-Schulz buffers on a batch ``[C, rows, cols]`` (see :func:`workspace_shape`; ``[C, n, n]``
    squares, n = min(rows, cols)), reused by every iteration and
    chunk of a call (issue 12), and by every step when an optimizer plans them (``workspace=`` of
    :func:`orthogonalize`, shape from :func:`workspace_shape`). A fresh output per product costs
    page faults on CPU, where the allocator hands large blocks back to the OS: measured 15% of the
    iterations' time on the MoE bench model's buckets (docs/benchmarks.md)."""

    iterates: tuple[torch.Tensor, torch.Tensor]
    """``[C, rows, cols]`` twice: the normalized input lands in the first, iteration k writes ``k + 1 mod 2``."""
    gram: torch.Tensor
    """``[C, n, n]``: A = X X^T."""
    poly: torch.Tensor
    """``[C, n, n]``: bA + cA^2 (plus aI in fp32, see :func:`_standard_iterations`)."""
    gram_diagonal: torch.Tensor
    poly_diagonal: torch.Tensor
    """Diagonal views, made once per call: views are ops too (issue 12)."""

    @classmethod
    def allocate(
        cls, batch: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> Workspace:
        n = min(rows, cols)
        iterates = torch.empty(2, batch, rows, cols, dtype=dtype, device=device).unbind()
        return cls.around(iterates, torch.empty(2, batch, n, n, dtype=dtype, device=device).unbind())

    @classmethod
    def inside(cls, iterates: torch.Tensor, squares: torch.Tensor, shape: tuple[int, int, int]) -> Workspace:
        """Views of two flat buffers (of at least ``2 C rows cols`` and ``2 C n n`` elements)."""
        batch, rows, cols = shape
        n = min(rows, cols)
        return cls.around(
            iterates[: 2 * batch * rows * cols].view(2, batch, rows, cols).unbind(),
            squares[: 2 * batch * n * n].view(2, batch, n, n).unbind(),
        )

    @classmethod
    def around(cls, iterates: tuple[torch.Tensor, ...], squares: tuple[torch.Tensor, ...]) -> Workspace:
        gram, poly = squares
        diagonals = (t.diagonal(dim1=-2, dim2=-1) for t in squares)
        return cls((iterates[0], iterates[1]), gram, poly, *diagonals)

    def first(self, batch: int) -> Workspace:
        """The buffers of a smaller (last) chunk."""
        return Workspace.around(
            tuple(t[:batch] for t in self.iterates), (self.gram[:batch], self.poly[:batch])
        )


def _normalize(X: torch.Tensor, out: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """Divide each matrix by its own Frobenius norm (times ``scale``), clamped like torch.optim.Muon,
    into ``out`` (the compute dtype).

    Half-precision inputs are normalized in fp32: an fp16 matrix with 1e4 entries has an fp16
    norm of inf (F10), and bf16 would round the norm before the division.
    """
    norm_dtype = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
    if scale != 1.0:
        norm = norm * scale
    # One memory pass: divide in norm_dtype, round to the compute dtype and write a contiguous
    # buffer, which also materializes the transpose of tall matrices for free.
    return torch.div(X, norm.clamp(min=eps), out=out)


def _square_completion(a: float, b: float, c: float) -> tuple[float, float] | None:
    """``(beta, gamma)`` with ``a + bx + cx^2 = c (x + beta)^2 + gamma``, or None where the form
    would cancel badly (c = 0 or tiny: ``b^2 / 4c`` far above the coefficients themselves)."""
    if c == 0 or b * b / (4 * abs(c)) > _SQUARE_FORM_MAX_GROWTH * (abs(a) + abs(b) + abs(c)):
        return None
    return b / (2 * c), a - b * b / (4 * c)


def _fp32_polynomial(work: Workspace, a: float, b: float, c: float) -> None:
    """``work.poly = aI + bA + cA^2`` from ``work.gram = A`` with plain GEMMs: no copy of A.

    An out-of-place baddbmm with a nonzero ``beta`` first copies its input into the result (an
    ``[n, n]`` pass per iteration, 9 ms of a 155 ms MoE bench step on CPU); completing the square,
    ``c (A + beta I)^2 + gamma I``, needs only diagonal adds (n elements) and a GEMM whose input is
    ignored (``beta=0``). Where the completed square would cancel, ``aI + (bA + cA^2)`` instead.
    """
    square = _square_completion(a, b, c)
    if square is None:
        torch.baddbmm(work.gram, work.gram, work.gram, beta=b, alpha=c, out=work.poly)
        work.poly_diagonal.add_(a)
        return
    beta, gamma = square
    work.gram_diagonal.add_(beta)
    torch.baddbmm(work.gram, work.gram, work.gram, beta=0, alpha=c, out=work.poly)
    work.poly_diagonal.add_(gamma)


def _iterates_tall(m: int, n: int, compute_dtype: torch.dtype, method: str) -> bool:
    """Whether fp32 iterates tall ``[m, n]`` matrices as they are stored (see :func:`_standard_iterations`)
    rather than transposed: half precision keeps torch's transpose, and Gram NS its own iteration."""
    return m > n and compute_dtype == torch.float32 and method != "gram"


def _normalize_gram(work: Workspace, eps: float, scale: float) -> torch.Tensor:
    """Turn ``work.gram = X X^T`` of unnormalized X into that of ``X / max(scale ||X||_F, eps)``, and
    return ``1 / max(scale ||X||_F, eps)`` as ``[C, 1, 1]``: ``||X||_F^2 = tr(X X^T)`` per matrix."""
    squares = work.gram_diagonal.sum(-1, keepdim=True).unsqueeze(-1)
    if scale != 1.0:
        squares.mul_(scale * scale)
    inverse_squares = squares.clamp_(min=eps * eps).reciprocal_()
    work.gram.mul_(inverse_squares)
    return inverse_squares.sqrt_()


def _standard_iterations(
    work: Workspace,
    schedule: list[tuple[float, float, float]],
    last: torch.Tensor | None = None,
    *,
    tall: bool = False,
    unnormalized: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> torch.Tensor:
    """Quintic NS on the batch in ``work.iterates[0]``: X <- aX + (bA + cA^2)X with A = XX^T.

    In half precision ``aX + (bA + cA^2) X`` is torch.optim.Muon's, product for product (two
    baddbmm, as its addmm; bitwise torch's, see the module docstring). In fp32 (issue 12) the
    polynomial ``P = aI + bA + cA^2`` is formed in the ``[n, n]`` buffer (:func:`_fp32_polynomial`)
    and ``X <- P X`` is a plain GEMM: a baddbmm with ``beta != 0`` first copies its ``[n, m]``
    input into the result, one memory pass per iteration (on the MoE bench model on CPU a
    quarter of the step's time outside its GEMMs). Same polynomial, other fp32 rounding.

    fp32 only: ``tall`` iterates ``[C, m, n]`` matrices (m > n) as stored, on the right:
    A = X^T X and X <- X P, the same polynomial (X (X^T X) = (X X^T) X) with the same small
    ``[n, n]`` Gram matrix, so no pass transposes X in or out (a transposing copy ran at a
    quarter of a contiguous one's rate on the bench CPU: 2 ms of the MoE bench step). ``last``
    (contiguous, fp32, the iterate's shape) receives the final product directly.

    fp32 only, with ``unnormalized`` (contiguous fp32 input in the iterate's shape, not aliasing
    ``last`` unless there are two iterations or more): the normalization is folded into the first
    iteration: its Gram matrix is scaled by ``1 / ||X||^2`` (``||X||^2`` is its trace) and its
    polynomial by ``1 / ||X||``, so the input is read by the first product and by nothing else (a
    norm and a division pass over every matrix saved: 1.3 ms of the MoE bench step).
    ``||X||^2`` stays within fp32 wherever the norm itself does; a step's guard rejects any
    gradient whose norm does not (``finite_flag``). Returns the result.
    """
    fold = work.gram.dtype == torch.float32
    X = work.iterates[0] if unnormalized is None else unnormalized
    for k, (a, b, c) in enumerate(schedule):
        if tall:
            torch.bmm(X.mT, X, out=work.gram)
        else:
            torch.bmm(X, X.mT, out=work.gram)
        following = work.iterates[(k + 1) % 2]
        if not fold:
            torch.baddbmm(work.gram, work.gram, work.gram, beta=b, alpha=c, out=work.poly)
            X = torch.baddbmm(X, work.poly, X, beta=a, out=following)
            continue
        inverse_norm = _normalize_gram(work, eps, scale) if k == 0 and unnormalized is not None else None
        _fp32_polynomial(work, a, b, c)
        if inverse_norm is not None:
            work.poly.mul_(inverse_norm)  # P (X / ||X||) = (P / ||X||) X
        if k == len(schedule) - 1 and last is not None:
            following = last
        # P is symmetric (a polynomial in the symmetric A), so X P is the transpose of P X^T.
        X = torch.bmm(X, work.poly, out=following) if tall else torch.bmm(work.poly, X, out=following)
    return X


def _gram_iterations(X: torch.Tensor, schedule: list[tuple[float, float, float]]) -> torch.Tensor:
    """Gram NS on a wide batch ``X: [B, n, m]`` (n < m); equal to ``_standard_iterations`` in exact arithmetic.

    With P_k = aI + bR_k + cR_k^2 the standard step is X_{k+1} = P_k X_k, so R_{k+1} = P_k R_k P_k
    = P_k (P_k R_k) (P_k commutes with R_k) and X_k = Q_k X_0 with Q_k = P_{k-1} ... P_0. Only the
    n x n matrices R and Q are iterated; X is touched at the restart and at the end.
    """
    R = torch.bmm(X, X.mT)
    Q = None
    steps = len(schedule)
    for i, (a, b, c) in enumerate(schedule):
        if i == _GRAM_RESTART_AT:
            X = torch.bmm(Q, X)
            R = torch.bmm(X, X.mT)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)  # bR + cR^2; P = aI + Z
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = torch.baddbmm(Q, Z, Q, beta=a)
        # R is not needed after the last step, nor before a restart recomputes it.
        if i < steps - 1 and i + 1 != _GRAM_RESTART_AT:
            PR = torch.baddbmm(R, Z, R, beta=a)
            R = torch.baddbmm(PR, Z, PR, beta=a)
    return torch.bmm(Q, X)


def orthogonalize(
    G: torch.Tensor,
    *,
    method: str = "standard",
    steps: int = DEFAULT_NS_STEPS,
    coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = DEFAULT_EPS,
    dtype: str | torch.dtype = "auto",
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Approximate polar factor :math:`UV^T` of every matrix of ``G: [..., m, n]`` in one batched call.

    ``coefficients`` drive ``standard`` and ``gram``; ``polar_express`` uses its own per-iteration
    table. ``dtype`` is the compute dtype (see :func:`resolve_ns_dtype`). The result is a new
    contiguous tensor of ``G.shape`` and ``G.dtype``; a zero matrix maps to zeros. On CPU the
    batch runs in cache-sized chunks (see ``_chunk_size``), which does not change the result.

    For the optimizer step (issue 12): ``out`` (contiguous, ``G.shape``; it may be ``G`` itself,
    every chunk is read before it is written) receives the result, and ``out_scale`` (a tensor
    broadcastable to ``[1, 1, 1]``, typically fp32 ``-lr * AdjustLR``) multiplies it on the way
    out, computed in ``out_scale``'s dtype: in fp32 the last product is written into ``out`` in its
    layout and scaled in place, otherwise the cast back, the transpose of tall matrices and the
    scaling are one pass. ``workspace`` (see :class:`Workspace`) holds the iteration's buffers
    across calls; without it the call allocates them.

    fp32 in and out (and more than one iteration): the normalization is folded into the first
    iteration (see :func:`_standard_iterations`); a matrix whose Frobenius norm overflows fp32
    (entries of ~1e17 and up) then gives NaN where the division gave zeros.
    """
    if not isinstance(G, torch.Tensor) or G.ndim < 2:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(
            f"orthogonalize needs a tensor of shape [..., m, n] (ndim >= 2), got {shape}; "
            "route vectors and scalars to AdamW instead."
        )
    if not G.is_floating_point():
        raise ValueError(f"orthogonalize needs a floating-point tensor, got {G.dtype}.")
    _check_steps_and_coefficients(steps, coefficients)
    method = resolve_ns_method(method, G.shape, G.device)
    compute_dtype = resolve_ns_dtype(dtype, G.device, method)

    m, n = G.shape[-2:]
    tall = _iterates_tall(m, n, compute_dtype, method)
    if out is None:
        out = torch.empty(G.shape, dtype=G.dtype, device=G.device)
    elif out.shape != G.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(G.shape)}, got {tuple(out.shape)}")
    if G.numel() == 0:
        return out
    scale = _POLAR_EXPRESS_SAFETY if method == "polar_express" else 1.0
    schedule = _coefficient_schedule(method, steps, coefficients)
    # Gram saves nothing on a square matrix, so it runs the standard iteration there.
    gram = method == "gram" and m != n
    # fp32 standard iterations write the last product straight into ``out`` (see
    # _standard_iterations); otherwise one pass casts (and scales) the result into it.
    direct = not gram and compute_dtype == out.dtype == torch.float32
    # One flat batch dim so every product is a single bmm/baddbmm call (no reshape op when the
    # input already has one: each op is a kernel launch on a GPU, issue 12).
    X = G if G.ndim == 3 else G.reshape(-1, m, n)
    flat_out = out if out.ndim == 3 else out.view(-1, m, n)
    batch = X.shape[0]
    chunk = _chunk_size(X.shape, compute_dtype, X.device)
    expected = workspace_shape(G.shape, compute_dtype, G.device, method)
    if workspace is None:
        work = Workspace.allocate(*expected, compute_dtype, G.device)
    elif workspace.gram.dtype != compute_dtype or tuple(workspace.iterates[0].shape) != expected:
        raise ValueError(
            f"workspace holds {workspace.gram.dtype} {tuple(workspace.iterates[0].shape)} buffers, this call "
            f"needs {compute_dtype} {expected}: build it with workspace_shape(G.shape, ...) for this dtype"
        )
    else:
        work = workspace
    for start in range(0, batch, chunk):
        whole = chunk >= batch
        rows = batch if whole else min(chunk, batch - start)
        Y = X if whole else X[start : start + rows]
        target = flat_out if whole else flat_out[start : start + rows]
        chunk_work = work if rows == work.gram.shape[0] else work.first(rows)
        # Tall matrices are transposed (a view; _normalize materializes it) so that A = XX^T is
        # min(m, n) square, and transposed back on the way out; fp32 iterates them as they are.
        transpose = m > n and not tall
        if direct and len(schedule) > 1 and Y.is_contiguous():
            # fp32 in and out: the normalization is folded into the first iteration.
            _standard_iterations(
                chunk_work, schedule, last=target, tall=tall, unnormalized=Y, eps=eps, scale=scale
            )
            _scale_in_place(target, out_scale)
            continue
        _normalize(Y.mT if transpose else Y, chunk_work.iterates[0], eps, scale)
        if direct:
            _standard_iterations(chunk_work, schedule, last=target, tall=tall)
            _scale_in_place(target, out_scale)
            continue
        if gram:
            Y = _gram_iterations(chunk_work.iterates[0], schedule)
        else:
            Y = _standard_iterations(chunk_work, schedule, tall=tall)
        Y = Y.mT if transpose else Y
        if out_scale is None:
            target.copy_(Y)  # also the cast back to out.dtype
        else:
            torch.mul(Y, out_scale, out=target)
    return out


def _scale_in_place(target: torch.Tensor, out_scale: torch.Tensor | None) -> None:
    """Scale a result written in place. Not folded into the last ``[n, n]`` factor: the ZeRO-0 step
    scales the same orthogonalized bits after its exchange, and both must land on the same bits."""
    if out_scale is not None:
        target.mul_(out_scale)


def workspace_shape(
    shape: Sequence[int], compute_dtype: torch.dtype, device: torch.device, method: str = "standard"
) -> tuple[int, int, int]:
    """``(C, rows, cols)`` of the iterates of the :class:`Workspace` one :func:`orthogonalize` call on
    ``shape`` with the resolved ``method`` works in: C matrices at a time (a CPU chunk, else all),
    each wide (short side first, the transpose of a tall matrix) or, in fp32, as stored."""
    m, n = shape[-2:]
    batch = math.prod(shape[:-2])
    chunk = min(batch, _chunk_size((batch, m, n), compute_dtype, device))
    if _iterates_tall(m, n, compute_dtype, method):
        return chunk, m, n
    return chunk, min(m, n), max(m, n)


def _chunk_size(shape: Sequence[int], compute_dtype: torch.dtype, device: torch.device) -> int:
    """Matrices per batched call: all of them on accelerators, about 1 MiB of X per call on CPU.

    On CPU a 128 x 256 x 512 batch streams 32 MiB through every elementwise pass (normalization,
    baddbmm's copy of its input) while a per-expert loop keeps each matrix in the 2 MiB L2; batching
    in ~1 MiB chunks keeps both the cache locality and the batching win for small matrices (whose
    chunks still hold hundreds of experts): measured never slower than the loop, see
    docs/benchmarks.md.

    Matrices under ``_CPU_CHUNK_MIN_MATRIX_BYTES`` always go in one call: their GEMMs are
    dispatch-bound, and chunking them would make an optimizer step's op count grow with the
    number of layers (issue 12); the losses chunking fixed were measured at 256 KiB matrices and up.
    """
    if torch.device(device).type != "cpu":
        return shape[0]
    matrix_bytes = shape[-2] * shape[-1] * compute_dtype.itemsize
    if matrix_bytes < _CPU_CHUNK_MIN_MATRIX_BYTES:
        return shape[0]
    return max(1, _CPU_CHUNK_BYTES // matrix_bytes)


def ns_flops(shape: tuple[int, ...], *, method: str, steps: int = DEFAULT_NS_STEPS) -> int:
    """Matmul FLOPs (2*m*n*k per product) of one :func:`orthogonalize` call on ``shape`` with ``method``.

    Mirrors the kernels product by product, so it equals ``FlopCounterMode``'s count; elementwise
    work (norms, scaling) is not counted. ``method`` must already be resolved (not ``'auto'``).
    """
    if method not in NS_METHODS or method == "auto":
        raise ValueError(
            f"ns_flops needs a resolved method, got {method!r}; expected one of {NS_METHODS[:-1]} "
            "(call resolve_ns_method for 'auto')."
        )
    if len(shape) < 2:
        raise ValueError(f"ns_flops needs a [..., m, n] shape, got {tuple(shape)}.")
    _check_steps_and_coefficients(steps, DEFAULT_NS_COEFFICIENTS)
    batch = math.prod(shape[:-2])
    n, m = sorted(shape[-2:])  # n: short side, m: long side
    wide_product = 2 * n * n * m  # XX^T, BX, QX
    square_product = 2 * n * n * n  # RR, ZQ, ZR
    if method != "gram" or m == n:
        return batch * steps * (2 * wide_product + square_product)
    total = wide_product  # R = XX^T
    for i in range(steps):
        if i == _GRAM_RESTART_AT:
            total += 2 * wide_product  # X = QX, R = XX^T
        total += square_product  # bR + cR^2
        if i != 0 and i != _GRAM_RESTART_AT:
            total += square_product  # Q = aQ + ZQ
        if i < steps - 1 and i + 1 != _GRAM_RESTART_AT:
            total += 2 * square_product  # R = P(PR)
    total += wide_product  # X = QX
    return batch * total

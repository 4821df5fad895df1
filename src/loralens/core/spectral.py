"""Top-k singular triplets of a stack of matrices known only through products (a block Krylov engine).

For ``batch`` linear maps ``W_b : R^{d_in} -> R^{d_out}`` given as closures

    matvec(X)  = W @ X      X (batch, d_in, p)  -> (batch, d_out, p)
    rmatvec(Y) = W^T @ Y    Y (batch, d_out, p) -> (batch, d_in, p)

:func:`top_singular_triplets` returns ``U`` (batch, d_out, k), ``S`` (batch, k) descending and ``V``
(batch, d_in, k) with ``W V ~ U diag(S)`` and ``W^T U ~ V diag(S)``. A merged weight ``W + s B A`` never has to be
formed: :func:`weight_operator` builds the closures from the dense base ``W`` and the factors.

Method: block Golub-Kahan-Lanczos with full re-orthogonalisation and an explicit Rayleigh-Ritz step, batched over
the stack. With ``n = min(d_out, d_in)`` (the algorithm runs on ``W^T`` when ``d_out < d_in`` so that ``n`` is the
side of the start block) and block size ``p``:

    V_1 = orth(Omega)                       Omega (batch, n, p), seeded Gaussian
    U_j = orth(W V_j      minus its part in span(U_1..U_{j-1}))
    V_j+1 = orth(W^T U_j  minus its part in span(V_1..V_j))

each ``orth`` being two rounds of block Gram-Schmidt with a QR after each (BCGS2), so the bases stay orthonormal
to working precision. ``span(V_1..V_j)`` is the block Krylov space ``K_j(W^T W, Omega)``. The products ``W V`` and
``W^T U`` are stored, so the projected matrix ``C = U_b^T W V_b`` (m x m, m = j p) and both residuals come without
extra products: with ``C = X diag(sigma) Y^T``, ``u = U_b x``, ``v = V_b y``,

    ||W v - sigma u|| = ||(W V_b) y - sigma U_b x||,   ||W^T u - sigma v|| = ||(W^T U_b) x - sigma V_b y||.

The basis grows until every wanted triplet of every matrix passes
``max(||W v - sigma u||, ||W^T u - sigma v||) <= tol * sigma_1``, or it fills ``R^n`` (then Rayleigh-Ritz is exact),
or ``max_iter`` blocks have been used: then :class:`SpectralConvergenceError` names the batch positions that failed.

Accuracy follows from the residual (standard perturbation bounds for singular triplets): each ``sigma`` is within
``sqrt(2) * tol * sigma_1`` of a true singular value (in practice within ``(tol sigma_1)^2 / gap``), and the angle
between a computed singular subspace and the true one is at most about ``tol * sigma_1 / gap``, ``gap`` being the
distance to the singular values outside it. The default ``tol`` (:data:`DEFAULT_TOL`) is ``1e-10`` in float64,
which gives 1e-6 relative agreement with a dense SVD on sigma and on subspace angles for relative gaps down to
``1e-4 sigma_1``, and ``2e-5`` in float32, about the smallest residual that float32 arithmetic reaches reliably on
d = 384 .. 2048 weights (sigma to ~1e-6 relative, subspace angles ~1e-4 / relative gap).

For small matrices a dense ``torch.linalg.svd`` is faster. It is used for ``n <= dense_cutover`` (default
:data:`DENSE_CUTOVER`: 384 in float64, 256 in float32), for ``n <= 12 k`` (``8 k`` in float32), where the Krylov
basis would need a large part of ``R^n`` (the cross-over for k = 64 lies near n = 1024, 512 in float32), both
measured in ``benchmarks/spectral.md``, and with ``exact=True``; the matrix is formed from the closures when no
dense form is known. Inputs are float32 or float64 (half precision is upcast by :func:`weight_operator`); everything
runs on the inputs' device; the start block comes from a seeded CPU generator, so results are reproducible and the
same start is used on CPU and CUDA.

Nothing here reads files, prints or plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from loralens.core.random import gaussian
from loralens.core.similarity import working_precision
from loralens.errors import BatchError, DTypeError, LoralensError, NonFiniteError, ShapeError

__all__ = [
    "DEFAULT_TOL",
    "DENSE_CUTOVER",
    "SpectralConvergenceError",
    "StackOperator",
    "SpectralResult",
    "weight_operator",
    "operator_from_closures",
    "top_singular_triplets",
    "default_block_size",
]

#: Residual tolerance relative to sigma_1, per dtype (see the module docstring for what each reaches).
DEFAULT_TOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 2e-5}

#: Up to this ``min(d_out, d_in)`` a dense SVD is used, per dtype (measured CPU cross-over for k = 16:
#: between 384 and 512 in float64, 256 and 384 in float32; ``benchmarks/spectral.md``).
DENSE_CUTOVER: dict[torch.dtype, int] = {torch.float64: 384, torch.float32: 256}

#: Dense also while ``min(d_out, d_in) <= factor * k``: for many wanted triplets the Krylov basis needs a large part
#: of ``R^n`` (measured cross-over for k = 64: near d = 1024 in float64, 512 in float32).
_DENSE_K_FACTOR: dict[torch.dtype, int] = {torch.float64: 12, torch.float32: 8}


#: Default cap on block iterations (the basis never exceeds ``n`` columns either). There is no restart: the engine
#: holds ``2 * batch * (d_out + d_in) * m`` numbers for a basis of ``m`` columns (``m <= max_iter * block_size``).
DEFAULT_MAX_ITER = 100


class SpectralConvergenceError(BatchError):
    """Some matrices of a stack did not reach the residual tolerance.

    ``indices`` are the failing batch positions; ``result`` holds the best triplets found for the whole stack
    (a :class:`SpectralResult`, its ``residual`` says how far each matrix got).
    """

    def __init__(
        self,
        message: str,
        indices: tuple[int, ...] = (),
        result: SpectralResult | None = None,
        *,
        option: str | tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(message, indices, option=option)
        self.result = result


@dataclass(frozen=True)
class StackOperator:
    """A stack of ``batch`` linear maps ``R^{d_in} -> R^{d_out}`` known through products.

    Attributes
    ----------
    matvec : callable
        ``X (batch, d_in, p) -> W @ X (batch, d_out, p)``.
    rmatvec : callable
        ``Y (batch, d_out, p) -> W^T @ Y (batch, d_in, p)``.
    batch, d_out, d_in : int
    dtype : torch.dtype
        float32 or float64: the dtype the closures take and return.
    device : torch.device
    dense : callable, optional
        ``() -> W (batch, d_out, d_in)``, when the matrix is cheap to form (used by the dense path; without it the
        dense path forms ``W`` from ``min(d_out, d_in)`` products).
    """

    matvec: Callable[[Tensor], Tensor]
    rmatvec: Callable[[Tensor], Tensor]
    batch: int
    d_out: int
    d_in: int
    dtype: torch.dtype
    device: torch.device
    dense: Callable[[], Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(batch, d_out, d_in)``."""
        return (self.batch, self.d_out, self.d_in)

    def transpose(self) -> StackOperator:
        """The stack of ``W^T`` ``(batch, d_in, d_out)``."""
        dense = self.dense
        return StackOperator(
            matvec=self.rmatvec,
            rmatvec=self.matvec,
            batch=self.batch,
            d_out=self.d_in,
            d_in=self.d_out,
            dtype=self.dtype,
            device=self.device,
            dense=None if dense is None else (lambda: dense().mT),
        )


class SpectralResult(NamedTuple):
    """Top-k singular triplets of a stack, ``W V ~ U diag(S)``, ``W^T U ~ V diag(S)``.

    Attributes
    ----------
    U : Tensor
        ``(batch, d_out, k)`` orthonormal columns.
    S : Tensor
        ``(batch, k)`` non-negative, descending.
    V : Tensor
        ``(batch, d_in, k)`` orthonormal columns.
    residual : Tensor
        ``(batch,)``: ``max_i max(||W v_i - s_i u_i||, ||W^T u_i - s_i v_i||) / s_1`` over the k triplets
        (0 where ``W = 0``).
    iterations : int
        Block Krylov iterations (0 for the dense path).
    products : int
        Columns multiplied by ``W`` (and as many by ``W^T``) per matrix; for the dense path the products used to
        form ``W`` (0 when its dense form was known).
    method : {"krylov", "dense"}
    """

    U: Tensor
    S: Tensor
    V: Tensor
    residual: Tensor
    iterations: int
    products: int
    method: Literal["krylov", "dense"]


# --------------------------------------------------------------------------------------------- operators


def weight_operator(
    W: Tensor, B: Tensor | None = None, A: Tensor | None = None, scale: float | Tensor = 1.0
) -> StackOperator:
    """The stack ``W + s B A`` as products, without forming ``s B A``.

    ``matvec(X) = W X + s B (A X)`` and ``rmatvec(Y) = W^T Y + s A^T (B^T Y)``: ``O(d_out d_in p + r (d_out + d_in) p)``
    per product instead of a dense ``d_out x d_in`` update.

    Parameters
    ----------
    W : Tensor
        ``(batch, d_out, d_in)``; a single ``(d_out, d_in)`` matrix is taken as ``batch = 1``.
    B : Tensor, optional
        ``(batch, d_out, r)`` (or ``(d_out, r)`` with a 2-D ``W``); given together with ``A``.
    A : Tensor, optional
        ``(batch, r, d_in)``.
    scale : float or Tensor
        ``s``: a scalar or ``(batch,)``.

    Returns
    -------
    StackOperator
        float64 inputs stay float64; float32, float16 and bfloat16 are computed in float32.
    """
    if W.ndim == 2:
        W = W.unsqueeze(0)
        B = None if B is None else (B.unsqueeze(0) if B.ndim == 2 else B)
        A = None if A is None else (A.unsqueeze(0) if A.ndim == 2 else A)
    if W.ndim != 3:
        raise ShapeError(f"expected a stack W (batch, d_out, d_in), got shape {tuple(W.shape)}")
    W = _float_working(W, "W")
    batch, d_out, d_in = W.shape
    if (B is None) != (A is None):
        raise ShapeError("give both factors B (batch, d_out, r) and A (batch, r, d_in), or neither")
    if B is None or A is None:
        # (X^T W^T)^T: see the note on the row layout below.
        return StackOperator(
            matvec=lambda X: (X.mT @ W.mT).mT,
            rmatvec=lambda Y: (Y.mT @ W).mT,
            batch=batch,
            d_out=d_out,
            d_in=d_in,
            dtype=W.dtype,
            device=W.device,
            dense=lambda: W,
        )
    if B.ndim != 3 or A.ndim != 3 or B.shape[-1] != A.shape[-2]:
        raise ShapeError(
            f"B (batch, d_out, r) and A (batch, r, d_in) do not fit: {tuple(B.shape)} and {tuple(A.shape)}"
        )
    if B.shape[:2] != (batch, d_out) or A.shape[0] != batch or A.shape[2] != d_in:
        raise ShapeError(
            f"W {tuple(W.shape)} does not fit B {tuple(B.shape)} and A {tuple(A.shape)}: expected "
            f"B ({batch}, {d_out}, r) and A ({batch}, r, {d_in})"
        )
    if B.device != W.device or A.device != W.device:
        raise ShapeError(f"W, B and A must share a device, got {W.device}, {B.device}, {A.device}")
    B = _float_working(B, "B").to(W.dtype)
    A = _float_working(A, "A").to(W.dtype)
    s = torch.as_tensor(scale, dtype=W.dtype, device=W.device)
    if s.ndim == 1 and s.shape[0] == batch:
        s = s[:, None, None]
    elif s.ndim != 0:
        raise ShapeError(f"scale must be a scalar or (batch,) = ({batch},), got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise NonFiniteError("the LoRA scaling holds NaN or Inf")
    sB = B * s  # (batch, d_out, r): the scale folded into B once
    # Products are taken as (X^T W^T)^T: MKL's batched float64 GEMM with a narrow (d, p) right-hand side runs
    # ~4x slower than the same product in (p, d) row layout (measured, benchmarks/spectral.md).
    return StackOperator(
        matvec=lambda X: torch.baddbmm(X.mT @ W.mT, X.mT @ A.mT, sB.mT).mT,
        rmatvec=lambda Y: torch.baddbmm(Y.mT @ W, Y.mT @ sB, A).mT,
        batch=batch,
        d_out=d_out,
        d_in=d_in,
        dtype=W.dtype,
        device=W.device,
        dense=lambda: torch.baddbmm(W, sB, A),
    )


def operator_from_closures(
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor],
    shape: tuple[int, int, int],
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> StackOperator:
    """A :class:`StackOperator` from user closures, checked once on a small probe.

    Parameters
    ----------
    matvec, rmatvec : callable
        ``(batch, d_in, p) -> (batch, d_out, p)`` and ``(batch, d_out, p) -> (batch, d_in, p)``.
    shape : (batch, d_out, d_in)
    dtype : float32 or float64
    device : the device the closures work on

    Raises
    ------
    ShapeError
        A closure returns the wrong shape, dtype or device for a ``(batch, ., 1)`` probe.
    """
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ShapeError(f"shape must be (batch, d_out, d_in) with positive sizes, got {tuple(shape)}")
    batch, d_out, d_in = (int(n) for n in shape)
    if dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"the closures must work in float32 or float64, got {dtype}")
    op = StackOperator(matvec, rmatvec, batch, d_out, d_in, dtype, torch.device(device))
    _probe(op)
    return op


def _float_working(X: Tensor, name: str) -> Tensor:
    try:
        return working_precision(X)
    except LoralensError as e:
        raise type(e)(f"{name}: {e}", option=e.option) from e


def _probe(op: StackOperator) -> None:
    """Apply both closures to a zero ``(batch, ., 1)`` block and check what comes back."""
    for name, fn, n_in, n_out in (("matvec", op.matvec, op.d_in, op.d_out), ("rmatvec", op.rmatvec, op.d_out, op.d_in)):
        X = torch.zeros(op.batch, n_in, 1, dtype=op.dtype, device=op.device)
        Y = fn(X)
        if not isinstance(Y, Tensor) or tuple(Y.shape) != (op.batch, n_out, 1):
            got = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise ShapeError(
                f"{name} maps (batch, {n_in}, p) = {tuple(X.shape)} to {got}, expected ({op.batch}, {n_out}, 1) "
                f"for the stack shape (batch, d_out, d_in) = {op.shape}"
            )
        if Y.dtype != op.dtype or Y.device != op.device:
            raise ShapeError(f"{name} returned {Y.dtype} on {Y.device}, expected {op.dtype} on {op.device}")


# ------------------------------------------------------------------------------------------------ engine


def default_block_size(k: int) -> int:
    """Krylov block size for ``k`` wanted triplets: ``max(12, k // 4)``.

    Smaller blocks than ``k`` need fewer products in all (a higher polynomial degree per product) at the price of
    more iterations; measured on one CPU core at d = 2048 (``benchmarks/spectral.md``), k = 16 was fastest with
    12 columns and k = 64 with 16, 1.4-1.6x faster than a block of ``k`` plus oversampling. A cluster of more than
    ``p`` (near-)equal singular values converges slowly (the residual test still guards the answer).
    """
    return max(12, k // 4)


def top_singular_triplets(
    op: StackOperator,
    k: int,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    exact: bool = False,
    dense_cutover: int | None = None,
) -> SpectralResult:
    """Top-``k`` singular triplets of every matrix of a stack, by block Krylov (or dense SVD when small).

    Parameters
    ----------
    op : StackOperator
        The stack ``(batch, d_out, d_in)``, e.g. from :func:`weight_operator` or :func:`operator_from_closures`.
    k : int
        ``1 <= k <= min(d_out, d_in)``.
    tol : float, optional
        Residual tolerance relative to ``sigma_1``; default :data:`DEFAULT_TOL` for the dtype. Must exceed ``eps``.
    max_iter : int, optional
        Most block iterations (default :data:`DEFAULT_MAX_ITER`); the basis also stops at ``min(d_out, d_in)``
        columns, where the result is exact. Memory grows with the basis: ``W V``, ``W^T U`` and both bases,
        ``2 batch (d_out + d_in) m`` numbers for ``m`` columns (measured: 192-480 columns at d = 2048).
    block_size : int, optional
        Columns per Krylov block (default :func:`default_block_size`); may be below ``k``.
    seed : int
        Seed of the Gaussian start block (drawn on the CPU in float64, then moved): the same result every run.
    exact : bool
        Always use the dense SVD.
    dense_cutover : int, optional
        Use the dense SVD when ``n = min(d_out, d_in) <= dense_cutover`` (default :data:`DENSE_CUTOVER` of the
        dtype) or ``n <= 12 k`` (``8 k`` in float32: the Krylov basis would need much of ``R^n``); 0: always Krylov.

    Returns
    -------
    SpectralResult
        ``U`` (batch, d_out, k), ``S`` (batch, k), ``V`` (batch, d_in, k), residuals and counts. Signs are fixed:
        the largest-magnitude entry of each ``u`` is positive (the same convention on both paths).

    Raises
    ------
    ShapeError
        ``k`` outside ``1..min(d_out, d_in)``, a bad block size or tolerance.
    SpectralConvergenceError
        Some matrices miss the tolerance after ``max_iter`` blocks (``indices``: their batch positions).
    """
    if not isinstance(op, StackOperator):
        raise ShapeError(f"expected a StackOperator (see weight_operator / operator_from_closures), got {type(op)}")
    if op.dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"the spectral engine computes in float32 or float64, got {op.dtype}")
    n = min(op.d_out, op.d_in)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ShapeError(f"k = {k!r} must be an integer in 1..min(d_out, d_in) = {n} for the stack shape {op.shape}")
    eps = torch.finfo(op.dtype).eps
    tol = DEFAULT_TOL[op.dtype] if tol is None else float(tol)
    if not (math.isfinite(tol) and tol > eps):
        raise ShapeError(f"tol = {tol!r} must be a finite number above the dtype's eps ({eps:.1e})")
    p = default_block_size(k) if block_size is None else block_size
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ShapeError(f"block_size = {p!r} must be a positive integer")
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ShapeError(f"max_iter = {max_iter!r} must be a positive integer")
    cutover = DENSE_CUTOVER[op.dtype] if dense_cutover is None else dense_cutover
    if isinstance(cutover, bool) or not isinstance(cutover, int) or cutover < 0:
        raise ShapeError(f"dense_cutover = {cutover!r} must be a non-negative integer")

    if exact or n <= cutover or (cutover > 0 and n <= _DENSE_K_FACTOR[op.dtype] * k):
        return _dense_triplets(op, k)
    flip = op.d_out < op.d_in  # run on W^T so that the start block lives in the smaller space R^n
    res = _krylov_triplets(op.transpose() if flip else op, k, p, tol, max_iter, seed)
    if flip:
        res = res._replace(U=res.V, V=res.U)
    res = _fix_signs(res)
    bad = res.residual > tol
    if bad.any():
        positions = tuple(int(i) for i in bad.nonzero().flatten())
        worst = float(res.residual.max())
        raise SpectralConvergenceError(
            f"the top-{k} singular triplets did not converge at batch positions {list(positions)} of the stack "
            f"{op.shape} ({op.dtype}): relative residual up to {worst:.2e} > tol = {tol:.1e} after "
            f"{res.iterations} block iterations ({res.products} products, block {p}); raise max_iter, loosen tol "
            f"(float32 reaches about {DEFAULT_TOL[torch.float32]:.0e}) or use exact=True",
            positions,
            res,
        )
    return res


def _dense_triplets(op: StackOperator, k: int) -> SpectralResult:
    """Dense thin SVD of the formed stack ``(batch, d_out, d_in)``; its top ``k`` triplets."""
    products = 0
    if op.dense is not None:
        W = op.dense()
    elif op.d_in <= op.d_out:
        eye = torch.eye(op.d_in, dtype=op.dtype, device=op.device).expand(op.batch, -1, -1)
        W, products = op.matvec(eye), op.d_in  # (batch, d_out, d_in)
    else:
        eye = torch.eye(op.d_out, dtype=op.dtype, device=op.device).expand(op.batch, -1, -1)
        W, products = op.rmatvec(eye).mT, op.d_out
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, V = U[..., :k], S[..., :k], Vh[..., :k, :].mT
    r1 = (W @ V - U * S[:, None, :]).norm(dim=-2)
    r2 = (W.mT @ U - V * S[:, None, :]).norm(dim=-2)
    residual = _relative(torch.maximum(r1, r2).amax(dim=-1), S[:, 0])
    return _fix_signs(SpectralResult(U, S, V, residual, 0, products, "dense"))


def _krylov_triplets(op: StackOperator, k: int, p: int, tol: float, max_iter: int, seed: int) -> SpectralResult:
    """Block Golub-Kahan-Lanczos, full re-orthogonalisation, Rayleigh-Ritz; ``op.d_in <= op.d_out``."""
    b, m_out, n = op.batch, op.d_out, op.d_in
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype, device = op.dtype, op.device

    def draw(rows: int, cols: int) -> Tensor:
        return gaussian(b, rows, cols, generator=gen, dtype=dtype, device=device)

    Vb = torch.empty(b, n, 0, dtype=dtype, device=device)  # right basis (b, n, m)
    Ub = torch.empty(b, m_out, 0, dtype=dtype, device=device)  # left basis (b, m_out, m)
    WV = torch.empty(b, m_out, 0, dtype=dtype, device=device)  # W @ Vb
    WtU = torch.empty(b, n, 0, dtype=dtype, device=device)  # W^T @ Ub
    C = torch.empty(b, 0, 0, dtype=dtype, device=device)  # Ub^T W Vb (b, m, m)
    Vj = _extend_basis(Vb, draw(n, p), draw)
    it, next_check, last = 0, 1, None
    while True:
        it += 1
        P = op.matvec(Vj)  # (b, m_out, pj)
        Uj = _extend_basis(Ub, P, draw)
        Q = op.rmatvec(Uj)  # (b, n, pj)
        # C grows by a column block Ub^T P and a row block Uj^T [WV, P].
        top = torch.cat([C, _mm(Ub.mT, P)], dim=-1)
        Vb, Ub = torch.cat([Vb, Vj], dim=-1), torch.cat([Ub, Uj], dim=-1)
        WV, WtU = torch.cat([WV, P], dim=-1), torch.cat([WtU, Q], dim=-1)
        C = torch.cat([top, _mm(Uj.mT, WV)], dim=-2)
        m = Vb.shape[-1]
        if it >= next_check or m >= n or it >= max_iter:
            X, sigma, Yh = torch.linalg.svd(C)  # Rayleigh-Ritz: (b, m, m), the only O(m^3) step
            x, s, y = X[..., :k], sigma[..., :k], Yh[..., :k, :].mT
            U, V = _mm(Ub, x), _mm(Vb, y)
            r1 = (_mm(WV, y) - U * s[:, None, :]).norm(dim=-2)
            r2 = (_mm(WtU, x) - V * s[:, None, :]).norm(dim=-2)
            residual = _relative(torch.maximum(r1, r2).amax(dim=-1), s[:, 0])
            if bool((residual <= tol).all()) or m >= n or it >= max_iter:
                return SpectralResult(U, s, V, residual, it, m, "krylov")
            worst = float(residual.max())
            next_check = it + _iterations_to_skip(last, (it, worst), tol)
            last = (it, worst)
        Vj = _extend_basis(Vb, Q, draw, cols=min(p, n - m))


def _iterations_to_skip(last: tuple[int, float] | None, now: tuple[int, float], tol: float) -> int:
    """Block iterations until the next Rayleigh-Ritz check, from the residual's observed rate of decrease.

    The ``(b, m, m)`` SVD costs ``~20 m^3`` per matrix, as much as a block of products once ``m ~ d^(2/3) p^(1/3)``;
    checking every iteration would cost ``O(J^4 p^3)`` over ``J`` iterations. Krylov residuals fall at least
    geometrically (and faster as the Ritz values separate), so half the iterations the observed rate predicts is
    a safe skip: an overshoot costs at most that many blocks of products.
    """
    if last is None or not (0 < now[1] < last[1]) or not math.isfinite(now[1]):
        return 1
    rate = math.log(now[1] / last[1]) / (now[0] - last[0])  # < 0: log residual per iteration
    need = math.log(tol / now[1]) / rate
    return max(1, int(0.5 * need))


def _extend_basis(Basis: Tensor, X: Tensor, gaussian: Callable[[int, int], Tensor], cols: int | None = None) -> Tensor:
    """Orthonormal ``(b, d, c)`` spanning ``X``'s part orthogonal to ``Basis`` (b, d, m); BCGS2.

    Columns of ``X`` (b, d, p) that lie in ``span(Basis)`` to working precision (Krylov breakdown, a rank-deficient
    ``W``) are replaced by Gaussian ones, so the result always has full rank. ``cols`` keeps the first columns only.
    """
    if cols is not None:
        X = X[..., :cols]
    d = X.shape[-2]
    scale = X.norm(dim=-2).amax(dim=-1, keepdim=True)  # (b, 1)
    X = X - _mm(Basis, _mm(Basis.mT, X))
    Q, R = torch.linalg.qr(X)
    weak = R.diagonal(dim1=-2, dim2=-1).abs() <= 8 * d * torch.finfo(X.dtype).eps * scale  # (b, c)
    if bool(weak.any()):
        Q = torch.where(weak[:, None, :], gaussian(d, Q.shape[-1]), Q)
        Q = Q - _mm(Basis, _mm(Basis.mT, Q))
        Q, _ = torch.linalg.qr(Q)
    Q = Q - _mm(Basis, _mm(Basis.mT, Q))
    Q, _ = torch.linalg.qr(Q)
    return Q


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y`` for batched tall-skinny products, computed as ``(Y^T X^T)^T``.

    The same flops; MKL's batched float64 GEMM runs 2-4x faster when the narrow dimension is the leading one of
    the output (measured on the 2-core benchmark machine; cuBLAS does not mind either way).
    """
    return (Y.mT @ X.mT).mT


def _relative(r: Tensor, s1: Tensor) -> Tensor:
    """``r / s1`` elementwise, ``0`` where both are 0 (the zero matrix is solved exactly)."""
    return torch.where(s1 > 0, r / torch.where(s1 > 0, s1, 1), torch.where(r > 0, torch.inf, 0.0))


def _fix_signs(res: SpectralResult) -> SpectralResult:
    """Flip each pair ``(u_i, v_i)`` so that the largest-magnitude entry of ``u_i`` is positive."""
    idx = res.U.abs().argmax(dim=-2, keepdim=True)  # (b, 1, k)
    sign = torch.sign(res.U.gather(-2, idx))
    sign = torch.where(sign == 0, 1, sign)
    return res._replace(U=res.U * sign, V=res.V * sign)

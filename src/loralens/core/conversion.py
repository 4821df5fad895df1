"""Conversion matrices: what maps a base weight to its trained LoRA factors.

For one target module over ``L`` layers, with the stored base weight ``W`` of shape
``(L, d_out, d_in)`` (``nn.Linear`` convention, used as is) and PEFT's factors
``A`` ``(L, r, d_in)`` and ``B`` ``(L, d_out, r)``, the CondLoRA paper (its eqs. 3 and 4) defines

    conv_A = W^-1 @ A.T      (L, d_in, r)
    conv_B = W^-1 @ B        (L, d_out, r)
    conv_BA = W^-1 @ B @ A = conv_B @ A     (L, d_out, d_in)

for square ``W``. ``W^-1`` is never formed: one LU factorisation of each ``W`` serves both
right-hand sides ``[A.T | B]``.

Beyond the paper (its stated limitation), a non-square ``W`` gets the least-squares convention:
``conv_A`` solves ``W.T @ X = A.T`` (shape ``(d_out, r)``) and ``conv_B`` solves ``W @ X = B``
(shape ``(d_in, r)``), each in the least-squares sense when over-determined and with minimum norm
when under-determined. One reduced QR factorisation of whichever of ``W``, ``W.T`` is tall serves
both. Every result records which convention made it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from loralens.errors import DTypeError, NonFiniteError, ShapeError, SingularMatrixError

__all__ = ["Conversion", "Convention", "conversion_matrices", "condition_estimate"]

Convention = Literal["solve", "lstsq"]

# Hager's estimator converges in two or three steps on almost every matrix; LAPACK's gecon stops at 5.
_HAGER_STEPS = 5


@dataclass(frozen=True)
class Conversion:
    """Conversion matrices of one module type over ``L`` layers.

    Attributes
    ----------
    A : Tensor
        ``(L, d_in, r)`` for ``"solve"``; ``(L, d_out, r)`` for ``"lstsq"``.
    B : Tensor
        ``(L, d_out, r)`` for ``"solve"``; ``(L, d_in, r)`` for ``"lstsq"``.
    BA : Tensor or None
        ``conv_B @ A``: ``(L, d_out, d_in)`` for ``"solve"``, ``(L, d_in, d_in)`` for ``"lstsq"``;
        None when not requested.
    residual_A, residual_B : Tensor
        ``(L,)`` relative residuals ``||W X - RHS||_F / ||RHS||_F`` of the two solves (``W.T`` for A
        under ``"lstsq"``). Near machine precision for a well-conditioned square ``W``; for an
        over-determined least-squares solve it measures how much of the RHS lies outside ``W``'s range.
    condition : Tensor
        ``(L,)`` estimate of the 1-norm condition number of ``W`` (of the triangular factor ``R``,
        which has ``W``'s singular values, under ``"lstsq"``), by Hager's method as LAPACK's ``gecon``.
    convention : {"solve", "lstsq"}
        ``"solve"``: the paper's ``W^-1`` (square ``W``); ``"lstsq"``: the least-squares generalisation.
    """

    A: Tensor
    B: Tensor
    BA: Tensor | None
    residual_A: Tensor
    residual_B: Tensor
    condition: Tensor
    convention: Convention


def conversion_matrices(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    with_product: bool = True,
) -> Conversion:
    """Conversion matrices ``W^-1 A.T``, ``W^-1 B`` and ``W^-1 B A`` for a stack of layers.

    Parameters
    ----------
    W : Tensor
        ``(L, d_out, d_in)`` base weights as ``nn.Linear`` stores them.
    A : Tensor
        ``(L, r, d_in)`` LoRA down-projections (PEFT ``lora_A.weight``).
    B : Tensor
        ``(L, d_out, r)`` LoRA up-projections (PEFT ``lora_B.weight``).
    dtype : torch.dtype
        ``float32`` or ``float64``: dtype of the computation and the results (inputs, half precision
        included, are cast to it).
    with_product : bool
        Also return ``conv_BA = conv_B @ A``.

    Returns
    -------
    Conversion
        On ``W.device``. Square ``W`` uses one batched LU (``"solve"``), non-square one batched
        reduced QR (``"lstsq"``).

    Raises
    ------
    ShapeError
        Shapes that do not fit together.
    NonFiniteError
        NaN or Inf in an input.
    SingularMatrixError
        A ``W`` that is singular to working precision; ``indices`` names the batch positions.
    """
    _check_inputs(W, A, B, dtype)
    W, A, B = (t.to(dtype) for t in (W, A, B))
    d_out, d_in = W.shape[-2:]
    if d_out == d_in:
        conv_A, conv_B, cond = _solve_square(W, A, B)
        convention: Convention = "solve"
    else:
        conv_A, conv_B, cond = _solve_least_squares(W, A, B)
        convention = "lstsq"
    residual_A = _relative_residual(W.mT if convention == "lstsq" else W, conv_A, A.mT)
    residual_B = _relative_residual(W, conv_B, B)
    BA = conv_B @ A if with_product else None
    return Conversion(conv_A, conv_B, BA, residual_A, residual_B, cond, convention)


def condition_estimate(W: Tensor) -> Tensor:
    """Estimate of the 1-norm condition number ``||W||_1 ||W^-1||_1`` of square matrices.

    Parameters
    ----------
    W : Tensor
        ``(L, d, d)``, float32 or float64.

    Returns
    -------
    Tensor
        ``(L,)``; ``inf`` where ``W`` is exactly singular. A lower bound on the true value, almost
        always equal to it (Hager 1984; Higham 1988), at the cost of a few solves with one RHS.
    """
    if W.ndim != 3 or W.shape[-1] != W.shape[-2]:
        raise ShapeError(f"expected a stack of square matrices (L, d, d), got shape {tuple(W.shape)}")
    if W.dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"expected float32 or float64 matrices, got {W.dtype}")
    LU, pivots, info = torch.linalg.lu_factor_ex(W)
    cond = _lu_condition(W, LU, pivots)
    return torch.where(info > 0, torch.full_like(cond, float("inf")), cond)


def _check_inputs(W: Tensor, A: Tensor, B: Tensor, dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise DTypeError(
            f"compute dtype must be float32 or float64, got {dtype} (half-precision inputs are upcast to it)"
        )
    for name, t in (("W", W), ("A", A), ("B", B)):
        if t.ndim != 3:
            raise ShapeError(f"{name} must be a stack of matrices (L, rows, cols), got shape {tuple(t.shape)}")
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            raise ShapeError(f"{name} has dtype {t.dtype}; integer or quantized weights must be dequantized first")
    L, d_out, d_in = W.shape
    r = A.shape[1]
    if A.shape != (L, r, d_in) or B.shape != (L, d_out, r):
        raise ShapeError(
            f"shapes do not fit: W {tuple(W.shape)} (L, d_out, d_in) needs A (L, r, d_in) and "
            f"B (L, d_out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    for name, t in (("W", W), ("A", A), ("B", B)):
        bad = ~torch.isfinite(t).flatten(1).all(dim=1)
        if bad.any():
            raise NonFiniteError(f"{name} holds NaN or Inf at batch positions {_positions(bad)}")


def _solve_square(W: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L, d, d), (L, r, d), (L, d, r) -> conv_A (L, d, r), conv_B (L, d, r), cond (L,)."""
    LU, pivots, info = torch.linalg.lu_factor_ex(W)
    cond = _lu_condition(W, LU, pivots)
    _raise_if_singular(info > 0, cond, W.dtype)
    r = A.shape[1]
    X = torch.linalg.lu_solve(LU, pivots, torch.cat([A.mT, B], dim=-1))  # (L, d, 2r)
    return X[..., :r], X[..., r:], cond


def _solve_least_squares(W: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Non-square W (L, d_out, d_in): conv_A (L, d_out, r) from W.T X = A.T, conv_B (L, d_in, r) from W X = B.

    With M the tall one of (W, W.T) and M = Q R (reduced), ``M X = Y`` has the least-squares
    solution ``R^-1 Q.T Y`` and ``M.T X = Y`` the minimum-norm solution ``Q R^-T Y``.
    """
    tall_is_W = W.shape[-2] > W.shape[-1]
    M = W if tall_is_W else W.mT
    Q, R = torch.linalg.qr(M, mode="reduced")  # (L, n, k), (L, k, k), k = min(d_out, d_in)
    cond = _triangular_condition(R)
    diag = R.diagonal(dim1=-2, dim2=-1).abs()
    exact = (diag == 0).any(dim=-1)
    _raise_if_singular(exact, cond, W.dtype)

    def least_squares(Y: Tensor) -> Tensor:  # M X = Y
        return torch.linalg.solve_triangular(R, Q.mT @ Y, upper=True)

    def minimum_norm(Y: Tensor) -> Tensor:  # M.T X = Y
        return Q @ torch.linalg.solve_triangular(R.mT, Y, upper=False)

    if tall_is_W:  # W X = B over-determined, W.T X = A.T under-determined
        return minimum_norm(A.mT), least_squares(B), cond
    return least_squares(A.mT), minimum_norm(B), cond


def _relative_residual(M: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """||M X - Y||_F / ||Y||_F per batch entry: (L, m, n), (L, n, r), (L, m, r) -> (L,)."""
    num = torch.linalg.matrix_norm(M @ X - Y)
    den = torch.linalg.matrix_norm(Y)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)


def _raise_if_singular(exact: Tensor, cond: Tensor, dtype: torch.dtype) -> None:
    """Raise for exact zero pivots and for condition numbers past 1 / eps (singular to working precision)."""
    singular = exact | ~torch.isfinite(cond) | (cond * torch.finfo(dtype).eps >= 1)
    if singular.any():
        raise SingularMatrixError(
            f"base weight is singular to working precision ({dtype}) at batch positions {_positions(singular)}",
            indices=tuple(int(i) for i in singular.nonzero().flatten()),
        )


def _lu_condition(W: Tensor, LU: Tensor, pivots: Tensor) -> Tensor:
    """1-norm condition estimate from an LU factorisation: (L, d, d) -> (L,)."""
    inv_norm = _hager_inverse_norm(
        lambda x: torch.linalg.lu_solve(LU, pivots, x),
        lambda x: torch.linalg.lu_solve(LU, pivots, x, adjoint=True),
        LU,
    )
    return torch.linalg.matrix_norm(W, ord=1) * inv_norm


def _triangular_condition(R: Tensor) -> Tensor:
    """1-norm condition estimate of upper-triangular R: (L, k, k) -> (L,)."""
    inv_norm = _hager_inverse_norm(
        lambda x: torch.linalg.solve_triangular(R, x, upper=True),
        lambda x: torch.linalg.solve_triangular(R.mT, x, upper=False),
        R,
    )
    return torch.linalg.matrix_norm(R, ord=1) * inv_norm


def _hager_inverse_norm(
    solve: Callable[[Tensor], Tensor], solve_adjoint: Callable[[Tensor], Tensor], like: Tensor
) -> Tensor:
    """Lower-bound estimate of ||M^-1||_1 for a batch (L, d, d) given solves with M and M.T.

    Hager's power method on the 1-norm, with Higham's alternating-sign test vector as a safeguard.
    Runs a fixed number of steps for the whole batch and keeps each entry's best (largest) bound,
    which is valid because every step yields a lower bound.
    """
    L, d = like.shape[0], like.shape[-1]
    opts = {"dtype": like.dtype, "device": like.device}
    x = torch.full((L, d, 1), 1.0 / d, **opts)
    best = torch.zeros(L, **opts)
    eye = torch.eye(d, **opts)
    with torch.no_grad():
        for _ in range(_HAGER_STEPS):
            y = solve(x)
            best = torch.maximum(best, y.abs().sum(dim=(-2, -1)))
            sign = torch.where(y >= 0, 1.0, -1.0).to(like.dtype)
            z = solve_adjoint(sign)
            x = eye[z.abs().squeeze(-1).argmax(dim=-1)].unsqueeze(-1)
        k = torch.arange(d, **opts)
        alt = ((-1.0) ** k * (1 + k / max(d - 1, 1))).expand(L, d).unsqueeze(-1)
        best = torch.maximum(best, 2 * solve(alt).abs().sum(dim=(-2, -1)) / (3 * d))
    return torch.nan_to_num(best, nan=float("inf"))


def _positions(mask: Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten()]

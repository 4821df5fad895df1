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

Exactly singular and near-singular ``W``: a zero pivot of the LU (a zero diagonal entry of the QR's ``R``),
or a condition estimate that is not finite, raises :class:`~loralens.errors.SingularMatrixError`. A finite
condition estimate past ``1 / eps`` of the compute dtype marks ``W`` *near-singular*: its LU (QR) solution
would be rounding noise, so those layers alone are solved in the minimum-norm least-squares sense with a
truncated-SVD pseudo-inverse (singular values below ``eps * max(d_out, d_in) * sigma_max`` dropped; the same
on CPU and CUDA), each convention keeping its equations. Their residuals are always computed, the result
records them in ``Conversion.fallback``, and a :class:`~loralens.errors.NearSingularWarning` names them. Every
other layer of the batch keeps the LU (QR) solution, bit for bit.

Speed and memory: a solve costs little more than the LU itself.

- :func:`factorize` copies the weights once into a working buffer of the compute dtype (half-precision
  weights are upcast in that copy) and LAPACK factors the buffer in place. The row-major buffer holding
  ``W`` is ``W.T`` in column-major order, so the LU of ``W.T`` needs no transposing copy and no second
  buffer; ``W X = Y`` is then the adjoint solve with that LU.
- One pass over the buffer yields the 1-norm of each ``W`` (for the condition estimate) and, through it,
  the NaN/Inf check: a non-finite entry makes its column sum non-finite.
- The condition estimate (Hager's method as LAPACK's ``gecon``) stops once every matrix has converged,
  usually after four single-column solves, each a fraction of the LU's cost.
- One factorisation serves any number of right-hand sides: :func:`solve_conversions` solves the
  factors of several adapters of the same base as one block.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from loralens.errors import (
    DTypeError,
    LoralensError,
    NearSingularWarning,
    NonFiniteError,
    ShapeError,
    SingularMatrixError,
)

__all__ = [
    "Conversion",
    "Convention",
    "Factorization",
    "conversion_matrices",
    "condition_estimate",
    "factorize",
    "fallback_message",
    "solve_conversions",
    "layer_working_bytes",
    "chunk_bytes",
]

Convention = Literal["solve", "lstsq"]

# Hager's estimator converges in two or three steps on almost every matrix; LAPACK's gecon stops at 5.
_HAGER_STEPS = 5
# Temporaries of the chunked passes (|W| column sums, residual products) hold about this many elements.
_CHUNK_ELEMENTS = 1 << 20


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
        NaN when not requested (``with_residuals=False``), except in ``fallback`` layers, which always get theirs.
    condition : Tensor
        ``(L,)`` estimate of the 1-norm condition number of ``W`` (of the triangular factor ``R``,
        which has ``W``'s singular values, under ``"lstsq"``), by Hager's method as LAPACK's ``gecon``.
    convention : {"solve", "lstsq"}
        ``"solve"``: the paper's ``W^-1`` (square ``W``); ``"lstsq"``: the least-squares generalisation.
    fallback : Tensor
        ``(L,)`` bool: layers whose ``W`` is near-singular to working precision (condition estimate * eps >= 1),
        solved by minimum-norm least squares (truncated-SVD pseudo-inverse) instead of the convention's LU/QR.
    """

    A: Tensor
    B: Tensor
    BA: Tensor | None
    residual_A: Tensor
    residual_B: Tensor
    condition: Tensor
    convention: Convention
    fallback: Tensor


@dataclass(frozen=True, eq=False)
class Factorization:
    """One factorisation of a stack of base weights ``W`` ``(L, d_out, d_in)``, reusable for any number of RHS.

    Made by :func:`factorize`; used by :func:`solve_conversions`. ``"solve"`` holds the LU of ``W.T``
    (computed in place in a row-major buffer, see the module docstring), ``"lstsq"`` the reduced QR of
    whichever of ``W``, ``W.T`` is tall.

    Attributes
    ----------
    convention : {"solve", "lstsq"}
    shape : (L, d_out, d_in)
    dtype : torch.dtype
        Compute dtype of the factors and of every solution.
    condition : Tensor
        ``(L,)`` 1-norm condition estimates, as :attr:`Conversion.condition`.
    weights : tuple of Tensor
        The ``L`` matrices ``(d_out, d_in)`` as given (any float dtype): residuals are computed against them.
    fallback : Tensor
        ``(L,)`` bool, as :attr:`Conversion.fallback`: the near-singular layers, solved by the pseudo-inverse.
    """

    convention: Convention
    shape: tuple[int, int, int]
    dtype: torch.dtype
    condition: Tensor
    weights: tuple[Tensor, ...]
    _factors: tuple[Tensor, Tensor]  # "solve": (row-major buffer holding the LU of W.T, pivots); "lstsq": (Q, R)
    _tall_is_W: bool = False
    # Near-singular layers: (positions (n,), U (n, d_out, k), 1/S truncated to 0 (n, k), Vh (n, k, d_in)).
    _pinv: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.condition.device

    @property
    def fallback(self) -> Tensor:
        mask = torch.zeros(self.shape[0], dtype=torch.bool, device=self.device)
        if self._pinv is not None:
            mask[self._pinv[0]] = True
        return mask

    def solve(self, Y: Tensor) -> Tensor:
        """``W X = Y``: ``(L, d_out, n) -> (L, d_in, n)``; least squares / minimum norm for non-square ``W``
        and for the near-singular layers."""
        if self.convention == "solve":
            buffer, pivots = self._factors
            X = torch.linalg.lu_solve(buffer.mT, pivots, Y, adjoint=True)
        else:
            X = self._least_squares(Y) if self._tall_is_W else self._minimum_norm(Y)
        return self._pseudo_inverse_solve(X, Y, transpose=False)

    def solve_transposed(self, Y: Tensor) -> Tensor:
        """``W.T X = Y``: ``(L, d_in, n) -> (L, d_out, n)``; least squares / minimum norm for non-square ``W``
        and for the near-singular layers."""
        if self.convention == "solve":
            buffer, pivots = self._factors
            X = torch.linalg.lu_solve(buffer.mT, pivots, Y)
        else:
            X = self._minimum_norm(Y) if self._tall_is_W else self._least_squares(Y)
        return self._pseudo_inverse_solve(X, Y, transpose=True)

    def select(self, positions: Sequence[int]) -> Factorization:
        """The factorisation of ``W[positions]`` (copies the factors of those layers; no new factorisation)."""
        idx = torch.as_tensor(list(positions), dtype=torch.long, device=self.device)
        factors = (self._factors[0][idx], self._factors[1][idx])
        weights = tuple(self.weights[int(k)] for k in positions)
        pinv = None
        if self._pinv is not None:
            where = {int(p): n for n, p in enumerate(self._pinv[0].tolist())}
            kept = [(new, where[int(old)]) for new, old in enumerate(positions) if int(old) in where]
            if kept:
                new_pos = torch.as_tensor([n for n, _ in kept], dtype=torch.long, device=self.device)
                rows = torch.as_tensor([k for _, k in kept], dtype=torch.long, device=self.device)
                _, U, S_inv, Vh = self._pinv
                pinv = (new_pos, U[rows], S_inv[rows], Vh[rows])
        return Factorization(
            self.convention,
            (len(weights), *self.shape[1:]),
            self.dtype,
            self.condition[idx],
            weights,
            factors,
            self._tall_is_W,
            pinv,
        )

    def weights_times(self, X: Tensor, *, transpose: bool = False) -> Tensor:
        """``W @ X`` (``W.T @ X`` with ``transpose``) in the compute dtype, from the weights as given.

        ``(L, d_in, n) -> (L, d_out, n)``; half-precision weights are upcast a block of rows at a time.
        """
        L, rows = len(self.weights), self.shape[2] if transpose else self.shape[1]
        out = torch.empty((L, rows, X.shape[-1]), dtype=self.dtype, device=X.device)
        for k, M in enumerate(self.weights):
            M = M.mT if transpose else M
            if M.dtype == self.dtype:
                torch.matmul(M, X[k], out=out[k])
                continue
            step = max(1, _CHUNK_ELEMENTS // M.shape[1])
            for s in range(0, rows, step):
                torch.matmul(M[s : s + step].to(self.dtype), X[k], out=out[k, s : s + step])
        return out

    # M = Q R is the tall one of W, W.T: M X = Y has the least-squares solution R^-1 Q.T Y,
    # M.T X = Y the minimum-norm solution Q R^-T Y.
    def _least_squares(self, Y: Tensor) -> Tensor:
        Q, R = self._factors
        return torch.linalg.solve_triangular(R, Q.mT @ Y, upper=True)

    def _minimum_norm(self, Y: Tensor) -> Tensor:
        Q, R = self._factors
        return Q @ torch.linalg.solve_triangular(R.mT, Y, upper=False)

    # W = U S Vh: W X = Y has the minimum-norm least-squares solution Vh.T S^+ U.T Y, W.T X = Y has U S^+ Vh Y.
    def _pseudo_inverse_solve(self, X: Tensor, Y: Tensor, *, transpose: bool) -> Tensor:
        """Overwrite the near-singular layers of ``X`` (the LU/QR solution, rounding noise there) in place."""
        if self._pinv is None:
            return X
        pos, U, S_inv, Vh = self._pinv
        Yp = Y[pos]
        if transpose:
            X[pos] = U @ (S_inv.unsqueeze(-1) * (Vh @ Yp))
        else:
            X[pos] = Vh.mT @ (S_inv.unsqueeze(-1) * (U.mT @ Yp))
        return X


def conversion_matrices(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    with_product: bool = True,
    warn: bool = True,
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
    warn : bool
        Warn about near-singular layers (below); callers that know the model's layer numbers pass False and
        warn themselves (see :func:`fallback_message`).

    Returns
    -------
    Conversion
        On ``W.device``. Square ``W`` uses one batched LU (``"solve"``), non-square one batched
        reduced QR (``"lstsq"``).

    Raises
    ------
    ShapeError
        Shapes that do not fit together.
    DTypeError
        Integer or quantized inputs, or a compute dtype other than float32/float64.
    NonFiniteError
        NaN or Inf in an input.
    SingularMatrixError
        A ``W`` that is exactly singular (a zero pivot, or a condition estimate that is not finite);
        ``indices`` names the batch positions.

    Warns
    -----
    NearSingularWarning
        Some ``W`` are near-singular to working precision (condition estimate * eps >= 1): those layers are
        solved by minimum-norm least squares (see ``Conversion.fallback``); the message names their batch
        positions, condition estimates and residuals.
    """
    _check_compute_dtype(dtype)
    for name, t in (("W", W), ("A", A), ("B", B)):
        _check_stack(name, t)
    _check_fit(tuple(W.shape), A, B)
    _check_finite("A", A)
    _check_finite("B", B)
    conv = solve_conversions(factorize(W, dtype=dtype), [A], [B], with_product=with_product, warn=False)[0]
    if warn and bool(conv.fallback.any()):
        option = "dtype" if dtype != torch.float64 else None  # the advice of fallback_message
        warnings.warn(NearSingularWarning(fallback_message(conv, dtype), option=option), stacklevel=2)
    return conv


def factorize(
    W: Tensor | Sequence[Tensor], *, dtype: torch.dtype = torch.float64, out: Tensor | None = None
) -> Factorization:
    """Factor a stack of base weights once, for :func:`solve_conversions` with any number of adapters.

    Parameters
    ----------
    W : Tensor or sequence of Tensor
        ``(L, d_out, d_in)``, or ``L`` matrices ``(d_out, d_in)`` (e.g. memory-mapped tensors straight from
        a checkpoint: they are copied into the working buffer without an intermediate stack). Any float dtype;
        kept by reference for the residuals.
    dtype : torch.dtype
        ``float32`` or ``float64``: the compute dtype.
    out : Tensor, optional
        ``(L, d_out, d_in)`` contiguous buffer of ``dtype`` on ``W``'s device for square ``W``: the LU is
        computed in it (overwritten), so a caller solving many batches can reuse one allocation. Ignored
        for non-square ``W``.

    Returns
    -------
    Factorization

    Raises
    ------
    ShapeError, DTypeError, NonFiniteError, SingularMatrixError
        As :func:`conversion_matrices`. Near-singular layers are not an error: their pseudo-inverse factors
        are kept (:attr:`Factorization.fallback`) and :func:`solve_conversions` warns about them.
    """
    _check_compute_dtype(dtype)
    mats = _matrices(W)
    L, (d_out, d_in) = len(mats), mats[0].shape
    device = mats[0].device
    if d_out == d_in:
        work = _buffer(out, (L, d_out, d_in), dtype, device)
        for k, M in enumerate(mats):
            work[k].copy_(M)  # the upcast happens here; row-major W is column-major W.T
        norm1 = _column_abs_sums(work).amax(dim=-1)  # (L,) ||W||_1, non-finite iff W is (or overflows dtype)
        _check_finite_weights(norm1, mats, dtype)
        pivots, info = _lu_in_place(work)
        cond = _lu_condition(work, pivots, info, norm1)
        near = _raise_if_singular(info > 0, cond, dtype)
        pinv = _pseudo_inverse(mats, near, dtype)
        return Factorization("solve", (L, d_out, d_in), dtype, cond, mats, (work, pivots), False, pinv)
    work = torch.empty((L, d_out, d_in), dtype=dtype, device=device)
    for k, M in enumerate(mats):
        work[k].copy_(M)
    _check_finite_weights(_column_abs_sums(work).amax(dim=-1), mats, dtype)
    tall_is_W = d_out > d_in
    Q, R = torch.linalg.qr(work if tall_is_W else work.mT, mode="reduced")  # (L, n, k), (L, k, k)
    del work
    cond = _triangular_condition(R)
    exact = (R.diagonal(dim1=-2, dim2=-1) == 0).any(dim=-1)
    near = _raise_if_singular(exact, cond, dtype)
    pinv = _pseudo_inverse(mats, near, dtype)
    return Factorization("lstsq", (L, d_out, d_in), dtype, cond, mats, (Q, R), tall_is_W, pinv)


def solve_conversions(
    factorization: Factorization,
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    *,
    with_product: bool = True,
    with_residuals: bool = True,
    warn: bool = True,
) -> list[Conversion]:
    """Conversion matrices of several adapters of the same base from one factorisation.

    All right-hand sides are solved as one block: ``[A_1.T | B_1 | A_2.T | B_2 | ...]`` for square ``W``.

    Parameters
    ----------
    factorization : Factorization
        Of ``W`` ``(L, d_out, d_in)``, from :func:`factorize`.
    As, Bs : sequences of Tensor
        Per adapter ``A_k`` ``(L, r_k, d_in)`` and ``B_k`` ``(L, d_out, r_k)``; ranks may differ.
    with_product : bool
        Also return ``conv_BA = conv_B @ A`` per adapter.
    with_residuals : bool
        Compute the residuals (one more pass over ``W``); NaN otherwise, except in near-singular layers.
    warn : bool
        Warn (:class:`~loralens.errors.NearSingularWarning`, batch positions) when near-singular layers were
        solved by least squares; callers that know the model's layer numbers pass False and warn themselves.

    Returns
    -------
    list of Conversion
        One per adapter, in the compute dtype on the factorisation's device.
    """
    if len(As) != len(Bs) or not As:
        raise ShapeError(f"need one B per A and at least one adapter, got {len(As)} A and {len(Bs)} B")
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        tag = "" if len(As) == 1 else f"[{k}]"
        _check_stack("A" + tag, A)
        _check_stack("B" + tag, B)
        _check_fit(factorization.shape, A, B, tag)
        _check_finite("A" + tag, A)
        _check_finite("B" + tag, B)
    f = factorization
    As = [A.to(device=f.device, dtype=f.dtype) for A in As]
    Bs = [B.to(device=f.device, dtype=f.dtype) for B in Bs]
    ranks = [A.shape[1] for A in As]
    if f.convention == "solve":
        Y = torch.cat([t for A, B in zip(As, Bs, strict=True) for t in (A.mT, B)], dim=-1)  # (L, d, sum 2 r_k)
        X = f.solve(Y)
        res = _block_residuals(f, X, Y, [r for r in ranks for _ in (0, 1)], with_residuals)
        starts = _offsets([r for r in ranks for _ in (0, 1)])
        XA = [X[..., starts[2 * k] : starts[2 * k] + r] for k, r in enumerate(ranks)]
        XB = [X[..., starts[2 * k + 1] : starts[2 * k + 1] + r] for k, r in enumerate(ranks)]
        res_A, res_B = res[0::2], res[1::2]
    else:
        Y_A = torch.cat([A.mT for A in As], dim=-1)  # (L, d_in, sum r_k)
        Y_B = torch.cat(list(Bs), dim=-1)  # (L, d_out, sum r_k)
        X_A, X_B = f.solve_transposed(Y_A), f.solve(Y_B)
        starts = _offsets(ranks)
        res_A = _block_residuals(f, X_A, Y_A, ranks, with_residuals, transpose=True)
        res_B = _block_residuals(f, X_B, Y_B, ranks, with_residuals)
        XA = [X_A[..., s : s + r] for s, r in zip(starts, ranks, strict=True)]
        XB = [X_B[..., s : s + r] for s, r in zip(starts, ranks, strict=True)]
    fallback = f.fallback
    convs = [
        Conversion(
            XA[k],
            XB[k],
            XB[k] @ As[k] if with_product else None,
            res_A[k],
            res_B[k],
            f.condition,
            f.convention,
            fallback,
        )
        for k in range(len(As))
    ]
    if warn and bool(fallback.any()):
        for k, c in enumerate(convs):
            tag = "" if len(convs) == 1 else f"adapter [{k}]: "
            option = "dtype" if f.dtype != torch.float64 else None
            warnings.warn(NearSingularWarning(tag + fallback_message(c, f.dtype), option=option), stacklevel=2)
    return convs


def fallback_message(conversion: Conversion, dtype: torch.dtype, where: str = "W", layers: Sequence[int] = ()) -> str:
    """What a near-singular warning says: where, the condition estimates, the residuals, and (float32) the fix
    (computing in float64: the warning's ``option`` is then ``"dtype"``).

    ``layers``: the model layer numbers of the batch entries (batch positions when empty).
    """
    c = conversion
    pos = _positions(c.fallback)
    named = [layers[k] for k in pos] if layers else pos
    at = f"at layers {named}" if layers else f"at batch positions {named}"
    eps = torch.finfo(dtype).eps
    precision = str(dtype).removeprefix("torch.")
    advice = "; compute in float64 to resolve them better" if dtype != torch.float64 else ""
    return (
        f"{where} is near-singular to {precision} precision {at} (1-norm condition estimate "
        f"{_numbers(c.condition[pos])} >= 1/eps = {1 / eps:.1e}): solved there by minimum-norm least squares "
        f"(truncated-SVD pseudo-inverse) instead of W^-1, relative residual ||W X - RHS|| / ||RHS|| "
        f"A {_numbers(c.residual_A[pos])}, B {_numbers(c.residual_B[pos])}{advice}"
    )


def layer_working_bytes(d_out: int, d_in: int, *, stored_itemsize: int, dtype: torch.dtype, rhs_columns: int) -> int:
    """Bytes one layer occupies while :func:`factorize` and :func:`solve_conversions` run on it.

    The weights as given (``stored_itemsize`` per entry), the working buffer (LU in place; for non-square
    ``W`` the QR's copy, ``Q`` and ``R``), and the right-hand sides, solutions and residual products of
    ``rhs_columns`` columns. Fixed-size temporaries of the chunked passes come on top, see
    :func:`chunk_bytes`.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = d_out * d_in
    factor = n * itemsize if d_out == d_in else 3 * n * itemsize + min(d_out, d_in) ** 2 * itemsize
    rhs = 4 * max(d_out, d_in) * rhs_columns * itemsize  # RHS, solution, W @ X, W @ X - RHS
    return n * stored_itemsize + factor + rhs + 8 * max(d_out, d_in) * itemsize


def chunk_bytes(d_out: int, d_in: int, *, dtype: torch.dtype) -> int:
    """Bytes of the temporaries of the chunked passes over ``(d_out, d_in)`` weights, whatever the number of layers."""
    elements = min(max(_CHUNK_ELEMENTS, d_out, d_in), d_out * d_in)
    return 2 * elements * torch.empty((), dtype=dtype).element_size()


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
    work = W.clone(memory_format=torch.contiguous_format)
    norm1 = _column_abs_sums(work).amax(dim=-1)
    pivots, info = _lu_in_place(work)
    return _lu_condition(work, pivots, info, norm1)


# ------------------------------------------------------------------------------------------ validation


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise DTypeError(
            f"compute dtype must be float32 or float64, got {dtype} (half-precision inputs are upcast to it)"
        )


def _check_stack(name: str, t: Tensor) -> None:
    if t.ndim != 3:
        raise ShapeError(f"{name} must be a stack of matrices (L, rows, cols), got shape {tuple(t.shape)}")
    _check_float(name, t)


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype.is_complex:
        raise DTypeError(f"{name} has dtype {t.dtype}; conversion matrices need real weights")
    if not t.dtype.is_floating_point or t.dtype.itemsize == 1:  # float8: quantized, scales stored elsewhere
        raise DTypeError(f"{name} has dtype {t.dtype}; integer or quantized weights must be dequantized first")


def _check_fit(W_shape: tuple[int, ...], A: Tensor, B: Tensor, tag: str = "") -> None:
    L, d_out, d_in = W_shape
    r = A.shape[1]
    if A.shape != (L, r, d_in) or B.shape != (L, d_out, r):
        raise ShapeError(
            f"shapes do not fit: W {tuple(W_shape)} (L, d_out, d_in) needs A{tag} (L, r, d_in) and "
            f"B{tag} (L, d_out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )


def _check_finite(name: str, t: Tensor) -> None:
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)
    if bad.any():
        raise NonFiniteError(f"{name} holds NaN or Inf at batch positions {_positions(bad)}")


def _matrices(W: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """A stack (L, d_out, d_in) or a sequence of L matrices -> tuple of L (d_out, d_in) views, validated."""
    if isinstance(W, Tensor):
        _check_stack("W", W)
        mats = tuple(W.unbind(0))
    else:
        mats = tuple(W)
        for k, M in enumerate(mats):
            if not isinstance(M, Tensor) or M.ndim != 2:
                shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
                raise ShapeError(f"W[{k}] must be a matrix (rows, cols), got {shape}")
            _check_float(f"W[{k}]", M)
            if M.shape != mats[0].shape or M.device != mats[0].device:
                raise ShapeError(
                    f"W[{k}] is {tuple(M.shape)} on {M.device}, W[0] {tuple(mats[0].shape)} on {mats[0].device}: "
                    "the matrices of one stack must share shape and device"
                )
    if not mats:
        raise ShapeError("W holds no matrices (L = 0)")
    return mats


def _buffer(out: Tensor | None, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ShapeError(
            f"out must be a contiguous {shape} {dtype} tensor on {device}, got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    return out


def _check_finite_weights(norm1: Tensor, mats: tuple[Tensor, ...], dtype: torch.dtype) -> None:
    """Raise for matrices whose 1-norm is not finite: NaN/Inf in W, or entries beyond ``dtype``'s range."""
    bad = ~torch.isfinite(norm1)
    if not bool(bad.any()):
        return
    positions = _positions(bad)
    nonfinite = [k for k in positions if not bool(torch.isfinite(mats[k]).all())]
    if nonfinite:
        raise NonFiniteError(f"W holds NaN or Inf at batch positions {nonfinite}")
    raise DTypeError(f"W at batch positions {positions} has entries beyond the range of {dtype}; use float64")


# ------------------------------------------------------------------------------------------ numerics


def _column_abs_sums(work: Tensor) -> Tensor:
    """(L, m, n) -> (L, n) sums of |entries| per column, in row blocks through one small reused temporary."""
    L, m, n = work.shape
    acc = torch.zeros((L, n), dtype=work.dtype, device=work.device)
    step = max(1, min(m, _CHUNK_ELEMENTS // max(1, n)))
    tmp = torch.empty((step, n), dtype=work.dtype, device=work.device)
    for k in range(L):
        for s in range(0, m, step):
            block = work[k, s : s + step]
            t = tmp[: block.shape[0]]
            torch.abs(block, out=t)
            acc[k] += t.sum(dim=0)
    return acc


def _lu_in_place(work: Tensor) -> tuple[Tensor, Tensor]:
    """LU of ``work.mT`` (column-major view of the row-major buffer) computed in the buffer itself.

    (L, d, d) -> pivots (L, d) int32, info (L,) int32; ``work`` then holds the factors of ``W.T``.
    """
    L, d, _ = work.shape
    pivots = torch.empty((L, d), dtype=torch.int32, device=work.device)
    info = torch.empty((L,), dtype=torch.int32, device=work.device)
    torch.linalg.lu_factor_ex(work.mT, out=(work.mT, pivots, info))
    # LAPACK's pivots are row numbers 1..d. Some torch CPU builds (MKL 2024) return garbage after
    # torch.set_num_threads(n > 1); a cheap check turns silent nonsense into an error.
    bad = ((pivots < 1) | (pivots > d)).any(dim=-1)
    if bool(bad.any()):
        raise LoralensError(
            f"the LU factorisation returned invalid pivots at batch positions {_positions(bad)}: the linear-algebra "
            "back end misbehaved (seen with MKL after torch.set_num_threads(n > 1)); keep torch's default threads"
        )
    return pivots, info


def _relative_residual(diff: Tensor, Y: Tensor) -> Tensor:
    """||M X - Y||_F / ||Y||_F per batch entry from ``diff = M X - Y``: (L, m, r) -> (L,)."""
    num = torch.linalg.matrix_norm(diff)
    den = torch.linalg.matrix_norm(Y)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)


def _block_residuals(
    f: Factorization, X: Tensor, Y: Tensor, widths: list[int], compute: bool, transpose: bool = False
) -> list[Tensor]:
    """Relative residuals ``||W X - Y||_F / ||Y||_F`` (``W.T`` with ``transpose``) of consecutive column blocks
    of the given widths: each (L,); NaN when not ``compute``, except in the near-singular layers."""
    if not compute:
        out = [torch.full(Y.shape[:1], float("nan"), dtype=Y.dtype, device=Y.device) for _ in widths]
        if f._pinv is not None:
            pos = f._pinv[0]
            sub = f.select(pos.tolist())
            for res, r in zip(out, _block_residuals(sub, X[pos], Y[pos], widths, True, transpose), strict=True):
                res[pos] = r
        return out
    diff = f.weights_times(X, transpose=transpose) - Y
    return [
        _relative_residual(diff[..., s : s + w], Y[..., s : s + w])
        for s, w in zip(_offsets(widths), widths, strict=True)
    ]


def _offsets(widths: list[int]) -> list[int]:
    starts, total = [], 0
    for w in widths:
        starts.append(total)
        total += w
    return starts


def _raise_if_singular(exact: Tensor, cond: Tensor, dtype: torch.dtype) -> Tensor:
    """Raise for exact zero pivots and non-finite condition estimates (exactly singular); return the (L,) mask
    of the near-singular rest, whose finite condition estimate is past 1 / eps of ``dtype``."""
    singular = exact | ~torch.isfinite(cond)
    if singular.any():
        raise SingularMatrixError(
            f"base weight is exactly singular in working precision ({dtype}: a zero pivot, or a condition "
            f"estimate beyond its range) at batch positions {_positions(singular)}",
            indices=tuple(int(i) for i in singular.nonzero().flatten()),
        )
    return cond * torch.finfo(dtype).eps >= 1


def _pseudo_inverse(
    mats: tuple[Tensor, ...], near: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Truncated SVD of the near-singular ``W`` (``near`` (L,) bool), recomputed from the weights as given.

    Returns (positions (n,), U (n, d_out, k), S^+ (n, k), Vh (n, k, d_in)) with ``S^+ = 1 / S`` for singular
    values above ``eps * max(d_out, d_in) * sigma_max`` (numpy's and MATLAB's ``pinv`` default) and 0 below;
    None when no layer is near-singular. ``torch.linalg.svd`` works alike on CPU and CUDA (``lstsq`` has only
    the QR-based 'gels' driver on CUDA, which does not handle rank deficiency).
    """
    if not bool(near.any()):
        return None
    pos = near.nonzero().flatten()
    W = torch.stack([mats[int(k)].to(dtype) for k in pos])  # (n, d_out, d_in)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    tol = torch.finfo(dtype).eps * max(W.shape[-2:]) * S[..., :1]
    S_inv = torch.where(S > tol, 1 / torch.where(S > tol, S, torch.ones_like(S)), torch.zeros_like(S))
    return pos, U, S_inv, Vh


def _numbers(t: Tensor) -> str:
    """``1.2e-03`` for one value, ``[1.2e-03, 4e+17]`` for several."""
    values = [f"{float(x):.2g}" for x in t.tolist()]
    return values[0] if len(values) == 1 else "[" + ", ".join(values) + "]"


def _lu_condition(work: Tensor, pivots: Tensor, info: Tensor, norm1: Tensor) -> Tensor:
    """1-norm condition estimate of W from the in-place LU of W.T: (L,); inf where a pivot is exactly zero."""
    LU = work.mT
    inv_norm = _hager_inverse_norm(
        lambda x: torch.linalg.lu_solve(LU, pivots, x, adjoint=True),  # W x = y
        lambda x: torch.linalg.lu_solve(LU, pivots, x),  # W.T x = y
        work,
    )
    cond = norm1 * inv_norm
    return torch.where(info > 0, torch.full_like(cond, float("inf")), cond)


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

    Hager's power method on the 1-norm with LAPACK's (``dlacn2``) stopping rules, and Higham's
    alternating-sign test vector as a safeguard (solved together with the first step). The whole batch
    iterates until every entry has stopped; each entry keeps its best (largest) bound, which is valid
    because every step yields a lower bound.
    """
    L, d = like.shape[0], like.shape[-1]
    with torch.no_grad():
        k = torch.arange(d, dtype=like.dtype, device=like.device)
        alt = ((1 - 2 * (k % 2)) * (1 + k / max(d - 1, 1))).expand(L, d).unsqueeze(-1)  # (L, d, 1)
        x = torch.full((L, d, 1), 1.0 / d, dtype=like.dtype, device=like.device)
        Y = solve(torch.cat([x, alt], dim=-1))  # (L, d, 2)
        y = Y[..., :1]
        est = y.abs().sum(dim=(-2, -1))
        best = torch.maximum(est, 2 * Y[..., 1].abs().sum(dim=-1) / (3 * d))
        sign = torch.where(y >= 0, 1.0, -1.0).to(like.dtype)
        active = torch.ones(L, dtype=torch.bool, device=like.device)
        j = torch.full((L,), -1, dtype=torch.long, device=like.device)
        for _ in range(_HAGER_STEPS - 1):
            z = solve_adjoint(sign).squeeze(-1)  # (L, d)
            z_abs = z.abs()
            j_next = z_abs.argmax(dim=-1)
            # x is a local maximum of ||M^-1 x||_1 on the unit ball, or the same e_j comes back: stop.
            active &= (z_abs.amax(dim=-1) > (z * x.squeeze(-1)).sum(dim=-1)) & (j_next != j)
            if not bool(active.any()):
                break
            j = j_next
            x = torch.nn.functional.one_hot(j, d).to(like.dtype).unsqueeze(-1)
            y = solve(x)
            new_est = y.abs().sum(dim=(-2, -1))
            new_sign = torch.where(y >= 0, 1.0, -1.0).to(like.dtype)
            # No gain, or the same sign vector as before: the next step would repeat this one.
            active &= (new_est > est) & (new_sign != sign).any(dim=-2).squeeze(-1)
            best = torch.maximum(best, new_est)
            est, sign = new_est, new_sign
            if not bool(active.any()):
                break
    return torch.nan_to_num(best, nan=float("inf"))


def _positions(mask: Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten()]

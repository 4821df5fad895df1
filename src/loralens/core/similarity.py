"""Normalized subspace similarity (phi) between matrices, pairs of layers and random baselines.

    phi(X, Y, i, j) = ||U_X[:, :i].T @ U_Y[:, :j]||_F^2 / min(i, j)      in [0, 1]

with ``U`` the left (or right) singular vectors (LoRA paper, Hu et al. 2022, Sec. 7; CondLoRA eq. 2).
Only the top ``i`` (``j``) singular vectors matter, so every SVD here is thin, and a low-rank product
``B @ A`` is handled through QR of its factors and the SVD of an ``r x r`` core, never a dense SVD.
``i`` and ``j`` must not exceed the numerical rank: past it singular vectors are arbitrary.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from loralens.core.random import gaussian
from loralens.errors import NonFiniteError, RankError, ShapeError

__all__ = [
    "Side",
    "top_singular_vectors",
    "product_singular_vectors",
    "basis_similarity",
    "pairwise_basis_similarity",
    "subspace_similarity",
    "pairwise_subspace_similarity",
    "mean_offdiagonal",
    "random_similarity_expected",
    "random_pairwise_similarity",
    "require_rank",
    "working_precision",
]

Side = Literal["left", "right"]


def top_singular_vectors(X: Tensor, k: int, side: Side = "left") -> Tensor:
    """Orthonormal basis of the top-``k`` left (or right) singular subspace of each matrix.

    Parameters
    ----------
    X : Tensor
        ``(..., m, n)``.
    k : int
        Number of singular vectors, ``1 <= k <= rank``.
    side : {"left", "right"}

    Returns
    -------
    Tensor
        ``(..., m, k)`` for ``"left"``, ``(..., n, k)`` for ``"right"``; half precision is computed in float32.

    Raises
    ------
    RankError
        ``k`` above the numerical rank of some matrix (``indices`` names the flattened batch positions).
    """
    _check_side(side)
    if X.ndim < 2:
        raise ShapeError(f"expected matrices (..., m, n), got shape {tuple(X.shape)}")
    X = working_precision(X)
    U, S, V = _thin_svd(X)
    require_rank(S, k, max(X.shape[-2:]))
    return U[..., :k] if side == "left" else V[..., :k]


def product_singular_vectors(B: Tensor, A: Tensor, k: int, side: Side = "left") -> Tensor:
    """Top-``k`` singular vectors of the low-rank product ``B @ A`` without forming it.

    ``B = Q_B R_B`` and ``A.T = Q_A R_A`` (reduced QR) give ``B @ A = Q_B (R_B R_A.T) Q_A.T``, so the
    SVD of the ``r x r`` core ``R_B R_A.T = U_c S V_c.T`` yields ``U = Q_B U_c`` and ``V = Q_A V_c``.

    Parameters
    ----------
    B : Tensor
        ``(..., m, r)``.
    A : Tensor
        ``(..., r, n)``.
    k : int
        ``1 <= k <= rank(B @ A) <= r``.
    side : {"left", "right"}

    Returns
    -------
    Tensor
        ``(..., m, k)`` for ``"left"``, ``(..., n, k)`` for ``"right"``.
    """
    _check_side(side)
    if B.ndim < 2 or A.ndim < 2 or B.shape[-1] != A.shape[-2]:
        raise ShapeError(f"B (..., m, r) and A (..., r, n) do not fit: {tuple(B.shape)} and {tuple(A.shape)}")
    B, A = working_precision(B), working_precision(A)
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.mT, mode="reduced")
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    # Relative to the product's scale: the factors' own scales cancel out of this tolerance.
    require_rank(S, k, max(B.shape[-2], A.shape[-1]))
    return (Q_B @ U_c[..., :k]) if side == "left" else (Q_A @ Vh_c[..., :k, :].mT)


def basis_similarity(U: Tensor, V: Tensor) -> Tensor:
    """phi between subspaces given by orthonormal bases: ``||U.T V||_F^2 / min(i, j)``.

    Parameters
    ----------
    U : Tensor
        ``(..., d, i)`` with orthonormal columns.
    V : Tensor
        ``(..., d, j)`` with orthonormal columns; batch dimensions broadcast.

    Returns
    -------
    Tensor
        ``(...)`` values in ``[0, 1]``.
    """
    if U.shape[-2] != V.shape[-2]:
        raise ShapeError(f"bases live in different spaces: {tuple(U.shape)} vs {tuple(V.shape)} (dimension -2)")
    U, V = _common_dtype(U, V)
    overlap = U.mT @ V  # (..., i, j)
    return overlap.square().sum(dim=(-2, -1)) / min(U.shape[-1], V.shape[-1])


def pairwise_basis_similarity(U: Tensor, V: Tensor | None = None) -> Tensor:
    """phi between every basis of one stack and every basis of another.

    Parameters
    ----------
    U : Tensor
        ``(L, d, i)`` orthonormal bases.
    V : Tensor, optional
        ``(K, d, j)``; defaults to ``U``.

    Returns
    -------
    Tensor
        ``(L, K)`` with entry ``[l, k] = phi(U[l], V[k])``. Computed as one ``(L i) x (K j)``
        matrix product, the fastest form on CPU and GPU alike.
    """
    V = U if V is None else V
    if U.ndim != 3 or V.ndim != 3 or U.shape[1] != V.shape[1]:
        raise ShapeError(f"expected stacks (L, d, i) and (K, d, j), got {tuple(U.shape)} and {tuple(V.shape)}")
    U, V = _common_dtype(U, V)
    (L, d, i), (K, _, j) = U.shape, V.shape
    G = U.permute(0, 2, 1).reshape(L * i, d) @ V.permute(1, 0, 2).reshape(d, K * j)  # (L i, K j)
    return G.reshape(L, i, K, j).square().sum(dim=(1, 3)) / min(i, j)


def subspace_similarity(X: Tensor, Y: Tensor, i: int, j: int, side: Side = "left") -> Tensor:
    """phi(X, Y, i, j) for matrices (batch dimensions broadcast).

    Parameters
    ----------
    X : Tensor
        ``(..., m, n)``.
    Y : Tensor
        ``(..., m, n2)`` for ``"left"``, ``(..., m2, n)`` for ``"right"``.
    i, j : int
        Subspace dimensions, each at most the numerical rank of its matrix.
    side : {"left", "right"}

    Returns
    -------
    Tensor
        ``(...)`` values in ``[0, 1]``.
    """
    return basis_similarity(top_singular_vectors(X, i, side), top_singular_vectors(Y, j, side))


def pairwise_subspace_similarity(
    X: Tensor, Y: Tensor | None = None, *, i: int, j: int | None = None, side: Side = "left"
) -> Tensor:
    """Layer x layer phi: ``(L, m, n)`` (and ``(K, m', n')``) -> ``(L, K)``.

    Each matrix is decomposed once (``L + K`` thin SVDs), not once per pair.
    """
    j = i if j is None else j
    U = top_singular_vectors(X, i, side)
    V = U if Y is None and j == i else top_singular_vectors(X if Y is None else Y, j, side)
    return pairwise_basis_similarity(U, V)


def mean_offdiagonal(S: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of a square ``(L, L)`` matrix ("average similarity" of Figure 1).

    Returns NaN for ``L = 1``, which has no off-diagonal entries.
    """
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ShapeError(f"expected a square (L, L) matrix, got {tuple(S.shape)}")
    L = S.shape[0]
    off = ~torch.eye(L, dtype=torch.bool, device=S.device)
    return S[off].mean() if L > 1 else torch.tensor(float("nan"), dtype=S.dtype, device=S.device)


def random_similarity_expected(i: int, j: int, d: int) -> float:
    """E[phi] for independent uniformly random ``i``- and ``j``-dimensional subspaces of R^d: ``max(i, j) / d``.

    ``E ||U.T V||_F^2 = i j / d``, divided by ``min(i, j)``.
    """
    if not (1 <= i <= d and 1 <= j <= d):
        raise RankError(f"subspace dimensions i={i}, j={j} must lie in 1..d={d}")
    return max(i, j) / d


def random_pairwise_similarity(
    L: int,
    shape: tuple[int, int],
    *,
    i: int,
    j: int | None = None,
    side: Side = "left",
    rank: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Monte-Carlo baseline: layer x layer phi of ``L`` random Gaussian matrices of the given shape.

    Parameters
    ----------
    L : int
        Number of random matrices.
    shape : (m, n)
        Shape of each random matrix, that of the real matrices it stands beside.
    i, j : int
        Subspace dimensions as for the real matrices.
    side : {"left", "right"}
    rank : int, optional
        Draw rank-``rank`` products ``G1 @ G2`` of Gaussian factors ``(m, rank)``, ``(rank, n)``
        instead of dense matrices (the baseline for ``conv_BA``). Their singular subspaces are
        uniformly distributed just like a dense Gaussian's, at the cost of an ``r x r`` SVD.
    generator : torch.Generator, optional
        Seeded CPU generator for reproducible draws (:func:`loralens.core.random.gaussian`).

    Returns
    -------
    Tensor
        ``(L, L)``; off-diagonal entries have expectation ``max(i, j) / d``, with ``d = m`` for
        ``"left"`` and ``n`` for ``"right"``.
    """
    m, n = shape
    j = i if j is None else j
    if rank is None:
        G = gaussian(L, m, n, generator=generator, dtype=dtype, device=device)
        return pairwise_subspace_similarity(G, i=i, j=j, side=side)
    G1 = gaussian(L, m, rank, generator=generator, dtype=dtype, device=device)
    G2 = gaussian(L, rank, n, generator=generator, dtype=dtype, device=device)
    k = max(i, j)
    U = product_singular_vectors(G1, G2, k, side)
    return pairwise_basis_similarity(U[..., :i], U[..., :j])


def _thin_svd(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``X = U diag(S) V.T``: (..., m, n) -> U (..., m, p), S (..., p), V (..., n, p), p = min(m, n).

    A conversion matrix is tall and thin (d x r): its SVD goes through a reduced QR, ``X = Q R``, and the SVD
    of the small ``R`` (``U = Q U_R``), which is several times faster than a direct batched SVD on CPU and
    GPU alike and as accurate (Chan's R-SVD, what LAPACK's ``gesvd`` does for m >> n).
    """
    m, n = X.shape[-2:]
    if m >= 2 * n:
        Q, R = torch.linalg.qr(X, mode="reduced")
        U_R, S, Vh = torch.linalg.svd(R)
        return Q @ U_R, S, Vh.mT
    if n >= 2 * m:
        V, S, U = _thin_svd(X.mT)
        return U, S, V
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U, S, Vh.mT


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ShapeError(f"side must be 'left' or 'right', got {side!r}")


def require_rank(S: Tensor, k: int, size: int) -> None:
    """Raise a :class:`RankError` naming the batch positions unless every matrix has numerical rank >= k >= 1.

    ``S`` (..., p): singular values in descending order; ``size``: the larger matrix dimension, for the rank
    tolerance ``S[0] * size * eps`` (numpy's ``matrix_rank``)."""
    p = S.shape[-1]
    if k < 1:
        raise RankError(f"subspace dimension {k} must be at least 1")
    if k > p:
        raise RankError(
            f"subspace dimension {k} exceeds the rank (at most {p}, the smaller matrix dimension); choose i, j <= {p}"
        )
    tol = S[..., :1] * size * torch.finfo(S.dtype).eps
    rank = (S > tol).sum(dim=-1).reshape(-1)
    low = rank < k
    if low.any():
        first = int(low.nonzero()[0])
        reason = "it is all zero" if int(rank[first]) == 0 else f"its numerical rank is {int(rank[first])}"
        positions = tuple(int(x) for x in low.nonzero().flatten())
        raise RankError(
            f"subspace dimension {k} exceeds the rank at batch positions {list(positions)} "
            f"({reason}); choose i, j <= rank",
            indices=positions,
        )


def working_precision(X: Tensor) -> Tensor:
    """Validate an input to an SVD/QR: floating, finite; half precision is upcast to float32."""
    if not X.dtype.is_floating_point:
        raise ShapeError(f"expected a floating-point tensor, got {X.dtype}")
    bad = ~torch.isfinite(X).reshape(-1, *X.shape[-2:]).flatten(1).all(dim=1)
    if bad.any():
        positions = tuple(int(i) for i in bad.nonzero().flatten())
        raise NonFiniteError(f"NaN or Inf in the matrices at batch positions {list(positions)}")
    return X.float() if X.dtype in (torch.float16, torch.bfloat16) else X


def _common_dtype(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(U.dtype, V.dtype)
    return U.to(dtype), V.to(dtype)

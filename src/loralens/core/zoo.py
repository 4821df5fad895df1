"""Many adapters of one base compared from their factors: update cosines and factor-subspace similarity.

For adapters ``i = 1..N`` at one layer, each update ``dW_i = s_i B_i A_i`` (``B_i`` ``(d_out, r_i)``, ``A_i``
``(r_i, d_in)``). Factors are passed concatenated along the rank axis with a *segment* index naming the adapter of
each column: ``B`` ``(L, d_out, R)``, ``A`` ``(L, R, d_in)``, ``segments`` ``(R,)`` in ``0..N-1``, ``R = sum r_i``
(the scale ``s_i`` folded into ``B`` by the caller).

- :func:`update_inner_products`: ``<dW_i, dW_j>_F = tr((B_i^T B_j)(A_j A_i^T))``, i.e. the block sums of
  ``(B^T B) * (A A^T)`` (elementwise): ``O((d_out + d_in) R1 R2)`` for a tile of ``R1 x R2`` columns, never a
  ``d_out x d_in`` matrix.
- :func:`segment_subspace_similarity`: ``phi_ij = ||Q_i^T Q_j||_F^2 / k`` between orthonormal bases of ``k`` columns
  each (``Q`` ``(L, d, N k)``, adapter ``i`` in columns ``i k .. i k + k - 1``), the paper's phi with ``i = j = k``.

Both take two column sets, so a caller can tile an ``N x N`` result into blocks under a memory budget. Nothing here
reads files, prints or plots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loralens.errors import ShapeError

__all__ = ["update_inner_products", "segment_subspace_similarity", "cosine_from_inner_products"]


def update_inner_products(
    B1: Tensor, A1: Tensor, segments1: Tensor, n1: int, B2: Tensor, A2: Tensor, segments2: Tensor, n2: int
) -> Tensor:
    """Frobenius inner products ``<B1_i A1_i, B2_j A2_j>_F`` of every pair of segments.

    Parameters
    ----------
    B1, A1 : Tensor
        ``(L, d_out, R1)``, ``(L, R1, d_in)``: the first set's factors, concatenated (scale folded into ``B1``).
    segments1 : Tensor
        ``(R1,)`` int64 in ``0..n1-1``: the segment (adapter) of each column.
    B2, A2, segments2, n2
        The second set, alike.

    Returns
    -------
    Tensor
        ``(L, n1, n2)``.
    """
    if B1.ndim != 3 or A1.ndim != 3 or B2.ndim != 3 or A2.ndim != 3:
        raise ShapeError("expected stacks B (L, d_out, R) and A (L, R, d_in)")
    if B1.shape[-1] != A1.shape[-2] or B2.shape[-1] != A2.shape[-2] or B1.shape[:2] != B2.shape[:2]:
        raise ShapeError(
            f"factors do not fit: B1 {tuple(B1.shape)}, A1 {tuple(A1.shape)}, "
            f"B2 {tuple(B2.shape)}, A2 {tuple(A2.shape)}"
        )
    if A1.shape[-1] != A2.shape[-1] or segments1.shape != (B1.shape[-1],) or segments2.shape != (B2.shape[-1],):
        raise ShapeError("A1 and A2 must share d_in, and each segment index must have one entry per column")
    products = (B1.mT @ B2) * (A1 @ A2.mT)  # (L, R1, R2): entry (p, q) = (b_p . b_q)(a_p . a_q)
    r1, r2 = _uniform_width(segments1, n1), _uniform_width(segments2, n2)
    if r1 and r2:  # every segment r columns wide, in order (the usual zoo): block sums by a reshape
        return products.reshape(products.shape[0], n1, r1, n2, r2).sum(dim=(2, 4))
    E1 = _indicator(segments1, n1, products)
    E2 = _indicator(segments2, n2, products)
    return E1.mT @ products @ E2


def cosine_from_inner_products(inner: Tensor, norms1_sq: Tensor, norms2_sq: Tensor) -> Tensor:
    """``inner / sqrt(norms1_sq norms2_sq^T)``, NaN where either norm is 0 (an update that is all zero).

    ``inner`` ``(..., n1, n2)``, ``norms1_sq`` ``(..., n1)``, ``norms2_sq`` ``(..., n2)``; clamped to ``[-1, 1]``.
    """
    denominator = (norms1_sq.unsqueeze(-1) * norms2_sq.unsqueeze(-2)).sqrt()
    cos = (inner / denominator).clamp(-1, 1)
    return torch.where(denominator > 0, cos, torch.full_like(cos, float("nan")))


def segment_subspace_similarity(Q1: Tensor, Q2: Tensor, k: int) -> Tensor:
    """``phi_ij = ||Q1_i^T Q2_j||_F^2 / k`` for bases of ``k`` orthonormal columns per segment.

    ``Q1`` ``(L, d, n1 k)``, ``Q2`` ``(L, d, n2 k)`` -> ``(L, n1, n2)`` in ``[0, 1]``.
    """
    if Q1.ndim != 3 or Q2.ndim != 3 or Q1.shape[:2] != Q2.shape[:2] or k < 1:
        raise ShapeError(f"expected Q1 (L, d, n1 k) and Q2 (L, d, n2 k), got {tuple(Q1.shape)}, {tuple(Q2.shape)}")
    if Q1.shape[-1] % k or Q2.shape[-1] % k:
        raise ShapeError(f"the column counts {Q1.shape[-1]}, {Q2.shape[-1]} are not multiples of k = {k}")
    L, n1, n2 = Q1.shape[0], Q1.shape[-1] // k, Q2.shape[-1] // k
    G = (Q1.mT @ Q2).reshape(L, n1, k, n2, k)
    return G.square().sum(dim=(2, 4)) / k


def _uniform_width(segments: Tensor, n: int) -> int:
    """``r`` when ``segments`` is ``0 x r, 1 x r, ..., (n-1) x r`` in order, else 0."""
    R = segments.shape[0]
    if n < 1 or R % n:
        return 0
    r = R // n
    expected = torch.arange(n, device=segments.device).repeat_interleave(r)
    return r if torch.equal(segments.to(expected), expected) else 0


def _indicator(segments: Tensor, n: int, like: Tensor) -> Tensor:
    """``(R, n)`` with a 1 at (column, its segment)."""
    if segments.numel() and (int(segments.min()) < 0 or int(segments.max()) >= n):
        raise ShapeError(f"segment indices must lie in 0..{n - 1}")
    E = torch.zeros(segments.shape[0], n, dtype=like.dtype, device=like.device)
    E[torch.arange(segments.shape[0], device=like.device), segments.to(like.device)] = 1
    return E

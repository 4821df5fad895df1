"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024,
arXiv:2410.21228), as pure tensor math.

For one module over a stack of layers, the base weight ``W0`` ``(L, d_out, d_in)``, the update ``dW = s B A``
(``B`` ``(L, d_out, r)``, ``A`` ``(L, r, d_in)``) and the fine-tuned ``W = W0 + dW``:

- ``u_j`` (``j = 1..k``) are the top-k left singular vectors of ``W``, ``u0_i`` all left singular vectors of ``W0``
  (``min(d_out, d_in)`` of them: the thin SVD);
- ``c_j = max_i |u_j^T u0_i|`` (:func:`max_cosine`): how well ``u_j`` is matched by one direction of ``W0``;
- ``u_j`` is an *intruder* when ``c_j < epsilon``: a high-ranking direction of the fine-tuned weight that no
  singular direction of the base resembles;
- ``||P dW||_F / ||dW||_F`` (:func:`projected_update_share`), ``P`` the orthogonal projector onto the intruders'
  ``u_j``: the share of the update that lies along them.

When ``d_out > d_in``, ``W0``'s left singular vectors beyond the ``d_in``-th span its left null space and are not
unique (any orthonormal basis of it is one); the thin SVD leaves them out, so a ``u_j`` there counts as an
intruder. For square weights (attention q, k, v, o) the two coincide.

Nothing here reads files, prints or plots; every function works on the inputs' device and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loralens.errors import ShapeError

__all__ = ["max_cosine", "projected_update_share", "intruder_counts"]


def max_cosine(U: Tensor, U0: Tensor) -> Tensor:
    """``c_j = max_i |u_j^T u0_i|`` for every column ``u_j`` of ``U``.

    Parameters
    ----------
    U : Tensor
        ``(L, d_out, k)`` orthonormal columns (the fine-tuned weight's top-k left singular vectors).
    U0 : Tensor
        ``(L, d_out, n)`` orthonormal columns (the base weight's left singular vectors).

    Returns
    -------
    Tensor
        ``(L, k)`` in ``[0, 1]`` (up to rounding).
    """
    if U.ndim != 3 or U0.ndim != 3 or U.shape[:2] != U0.shape[:2]:
        raise ShapeError(f"U (L, d_out, k) and U0 (L, d_out, n) do not fit: {tuple(U.shape)} and {tuple(U0.shape)}")
    return (U0.mT @ U).abs().amax(dim=-2)


def intruder_counts(c: Tensor, epsilons: Tensor) -> Tensor:
    """Intruders per layer for each threshold: ``#{j : c_j < epsilon}``.

    ``c`` ``(L, k)``, ``epsilons`` ``(E,)`` -> ``(E, L)`` integer counts.
    """
    if c.ndim != 2 or epsilons.ndim != 1:
        raise ShapeError(f"expected c (L, k) and epsilons (E,), got {tuple(c.shape)} and {tuple(epsilons.shape)}")
    return (c.unsqueeze(0) < epsilons.to(c)[:, None, None]).sum(dim=-1)


def projected_update_share(U: Tensor, intruder: Tensor, B: Tensor, A: Tensor, scale: Tensor) -> Tensor:
    """``||P dW||_F / ||dW||_F`` with ``dW = s B A`` and ``P = U_I U_I^T``, ``U_I`` the intruder columns of ``U``.

    Computed from the factors: ``||U_I^T dW||_F`` from ``(U_I^T s B) A`` (``k x d_in``) and ``||dW||_F^2 =
    s^2 tr((B^T B)(A A^T))`` (``r x r``); ``dW`` is never formed.

    Parameters
    ----------
    U : Tensor
        ``(L, d_out, k)`` orthonormal columns.
    intruder : Tensor
        ``(L, k)`` bool: which columns are intruders.
    B, A : Tensor
        ``(L, d_out, r)``, ``(L, r, d_in)``.
    scale : Tensor
        ``(L,)`` the LoRA scaling ``s``.

    Returns
    -------
    Tensor
        ``(L,)`` in ``[0, 1]``; NaN where ``dW = 0`` (an untrained adapter: no share to speak of).
    """
    if U.ndim != 3 or B.ndim != 3 or A.ndim != 3 or intruder.shape != (U.shape[0], U.shape[2]):
        raise ShapeError(
            f"expected U (L, d_out, k), intruder (L, k), B (L, d_out, r), A (L, r, d_in); got {tuple(U.shape)}, "
            f"{tuple(intruder.shape)}, {tuple(B.shape)}, {tuple(A.shape)}"
        )
    sB = B * scale.to(B)[:, None, None]
    along = (U.mT @ sB) @ A  # (L, k, d_in): U^T dW
    on_intruders = (along.square().sum(dim=-1) * intruder.to(along)).sum(dim=-1)
    total = ((sB.mT @ sB) * (A @ A.mT)).sum(dim=(-2, -1))  # tr((sB^T sB)(A A^T)) = ||sB A||_F^2
    share = (on_intruders.clamp(min=0) / total).sqrt()
    return torch.where(total > 0, share.clamp(max=1), torch.full_like(share, float("nan")))

"""DoRA's magnitude and direction (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024,
arXiv:2402.09353), as pure tensor math.

A weight ``W`` stored ``(d_out, d_in)`` (PyTorch's ``nn.Linear``) splits into a magnitude and a direction per
output unit, i.e. per row ``W_n`` (the paper's column norm; PEFT's ``torch.linalg.norm(W, dim=1)``):
``m_n = ||W_n||`` and ``V_n = W_n / ||W_n||``. For the adapted weight with ``W' = W0 + s B A``
(``B`` ``(d_out, r)``, ``A`` ``(r, d_in)``):

- plain LoRA: ``m'_n = ||W'_n||``, direction ``W'_n / ||W'_n||``;
- DoRA: ``m'`` is the trained ``lora_magnitude_vector`` and the direction is that of ``W0 + s B A`` (PEFT merges
  ``m_n (W0 + s B A)_n / ||(W0 + s B A)_n||``).

Per layer, over the ``d_out`` output units (the paper's ``Delta M`` and ``Delta D``, with ``m0_n = ||W0_n||``):

- ``dM = mean_n |m'_n - m0_n|`` (:func:`magnitude_change`);
- ``dD = mean_n (1 - cos(W'_n, W0_n))`` (:func:`direction_change`).

Factored, never forming ``W'``: with ``g_n = s <W0_n A^T, B_n>`` (``= <W0_n, s B_n A>``) and
``h_n = s^2 B_n (A A^T) B_n^T`` (``= ||s B_n A||^2``),

- ``||W'_n||^2 = ||W0_n||^2 + 2 g_n + h_n``;
- ``<W0_n, W'_n> = ||W0_n||^2 + g_n``;

which costs one ``W0 A^T`` product, ``O(d_out d_in r)`` per layer, and no ``d_out x d_in`` temporary besides ``W0``.

Numerical care (:func:`row_statistics`): ``1 - cos`` computed as ``1 - <W0_n, W'_n> / (||W0_n|| ||W'_n||)`` loses
everything for a small update (``1 - cos ~ (||s B_n A|| / ||W0_n||)^2 / 2`` falls below the rounding of ``cos``,
about 1e-16 in float64 and 6e-8 in float32). Instead, with ``a = W0_n``, ``b = s B_n A``, ``c = a + b``:

``1 - cos = (||a||^2 ||c||^2 - <a, c>^2) / (||a|| ||c|| (||a|| ||c|| + <a, c>))``

and the numerator is, by Lagrange's identity, ``||a||^2 ||c||^2 - <a, c>^2 = ||a||^2 ||b||^2 - <a, b>^2 =
||W0_n||^2 h_n - g_n^2`` (the ``||a||^4`` and ``2 ||a||^2 <a, b>`` terms cancel exactly, in algebra rather than in
rounding). The result then has a small *relative* error whatever the update's size. Where ``<a, c> < 0`` (the
update turned the row by more than 90 degrees) the denominator would cancel instead, and the plain
``1 - <a, c> / (||a|| ||c||)``, then between 1 and 2, is exact enough. Likewise ``|m'_n - m0_n|`` of plain LoRA is
taken as ``|2 g_n + h_n| / (||W'_n|| + ||W0_n||)``, not as a difference of two nearly equal norms.

Rows where ``W0_n = 0`` or ``W'_n = 0`` have no cosine: ``1 - cos`` is NaN there, and the layer means leave those
rows out (NaN if no row remains).

Nothing here reads files, prints or plots; every function works on the inputs' device and dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from loralens.errors import ShapeError

__all__ = [
    "RowStatistics",
    "row_statistics",
    "magnitude_change",
    "direction_change",
    "magnitude_direction_change",
    "linear_fit",
]


class RowStatistics(NamedTuple):
    """Per output unit (row) of each layer, all ``(L, d_out)``."""

    base_norm: Tensor  #: ``||W0_n||`` (``m0``)
    adapted_norm: Tensor  #: ``||W0_n + s B_n A||``
    one_minus_cos: Tensor  #: ``1 - cos(W0_n + s B_n A, W0_n)``, stably; NaN where a norm is 0
    norm_change: Tensor  #: ``||W0_n + s B_n A|| - ||W0_n||``, stably


def _check(W0: Tensor, B: Tensor, A: Tensor, scale: Tensor) -> None:
    if W0.ndim != 3 or B.ndim != 3 or A.ndim != 3 or scale.ndim != 1:
        raise ShapeError(
            f"expected W0 (L, d_out, d_in), B (L, d_out, r), A (L, r, d_in), scale (L,); got {tuple(W0.shape)}, "
            f"{tuple(B.shape)}, {tuple(A.shape)}, {tuple(scale.shape)}"
        )
    L, d_out, d_in = W0.shape
    if B.shape[:2] != (L, d_out) or A.shape[0] != L or A.shape[2] != d_in or B.shape[2] != A.shape[1]:
        raise ShapeError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} do not fit W0 {tuple(W0.shape)}: expected (L, d_out, r) "
            "and (L, r, d_in)"
        )
    if scale.shape[0] != L:
        raise ShapeError(f"scale has {scale.shape[0]} entries for {L} layers")


def row_statistics(W0: Tensor, B: Tensor, A: Tensor, scale: Tensor) -> RowStatistics:
    """Row norms of ``W0`` and of ``W0 + s B A`` and the cosine gap between their rows, from the factors.

    Parameters
    ----------
    W0 : Tensor
        ``(L, d_out, d_in)`` base weights, stored (out, in).
    B, A : Tensor
        ``(L, d_out, r)``, ``(L, r, d_in)``.
    scale : Tensor
        ``(L,)`` the LoRA scaling ``s``.

    Returns
    -------
    RowStatistics
        Each field ``(L, d_out)``, in ``W0``'s dtype. See the module docstring for the formulas and their
        numerical care; ``W0 + s B A`` is never formed.
    """
    _check(W0, B, A, scale)
    return _row_statistics(W0, B, A, scale.to(W0))


def _row_statistics(W0: Tensor, B: Tensor, A: Tensor, scale: Tensor) -> RowStatistics:
    s = scale[:, None]  # (L, 1)
    base_sq = torch.linalg.vector_norm(W0, dim=-1).square()  # (L, d_out); no (d_out, d_in) temporary
    g = s * ((W0 @ A.mT) * B).sum(dim=-1)  # (L, d_out): <W0_n, s B_n A>
    h = s.square() * ((B @ (A @ A.mT)) * B).sum(dim=-1)  # (L, d_out): ||s B_n A||^2
    h = h.clamp(min=0)
    adapted_sq = (base_sq + 2 * g + h).clamp(min=0)
    base, adapted = base_sq.sqrt(), adapted_sq.sqrt()
    dot = base_sq + g  # <W0_n, W'_n>
    product = base * adapted
    lagrange = (base_sq * h - g.square()).clamp(min=0)  # ||a||^2 ||c||^2 - <a, c>^2 = ||a||^2 ||b||^2 - <a, b>^2
    stable = lagrange / (product * (product + dot))
    plain = 1 - dot / product
    gap = torch.where(dot >= 0, stable, plain)
    gap = torch.where(product > 0, gap, torch.full_like(gap, float("nan")))
    norm_change = (2 * g + h) / (adapted + base)
    norm_change = torch.where(adapted + base > 0, norm_change, torch.zeros_like(norm_change))
    return RowStatistics(base, adapted, gap, norm_change)


def magnitude_change(stats: RowStatistics, magnitude: Tensor | None = None) -> Tensor:
    """``dM = mean_n |m'_n - m0_n|`` per layer.

    Parameters
    ----------
    stats : RowStatistics
        From :func:`row_statistics`.
    magnitude : Tensor or None
        ``(L, d_out)`` DoRA's trained ``m'`` (``lora_magnitude_vector``); None for plain LoRA, whose
        ``m'_n = ||W0_n + s B_n A||``.

    Returns
    -------
    Tensor
        ``(L,)``.
    """
    if magnitude is None:
        return stats.norm_change.abs().mean(dim=-1)
    if magnitude.shape != stats.base_norm.shape:
        raise ShapeError(
            f"magnitude {tuple(magnitude.shape)} does not fit the weights: expected (L, d_out) = "
            f"{tuple(stats.base_norm.shape)}"
        )
    return (magnitude.to(stats.base_norm) - stats.base_norm).abs().mean(dim=-1)


def direction_change(stats: RowStatistics) -> Tensor:
    """``dD = mean_n (1 - cos(W'_n, W0_n))`` per layer, ``(L,)``; rows without a cosine (a zero row) are left
    out, NaN when none is left. DoRA's direction is that of ``W0 + s B A``, so this holds for both kinds."""
    return stats.one_minus_cos.nanmean(dim=-1)


def magnitude_direction_change(
    W0: Tensor, B: Tensor, A: Tensor, scale: Tensor, magnitude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(dM, dD)``, each ``(L,)``, for ``W' = W0 + s B A`` (plain LoRA, ``magnitude=None``) or DoRA's
    ``m' (W0 + s B A) / ||W0 + s B A||_row`` (``magnitude`` ``(L, d_out)``, the trained ``m'``).

    ``W0`` ``(L, d_out, d_in)``, ``B`` ``(L, d_out, r)``, ``A`` ``(L, r, d_in)``, ``scale`` ``(L,)``. Cost
    ``O(L d_out d_in r)``; see the module docstring.
    """
    _check(W0, B, A, scale)
    if magnitude is not None and magnitude.shape != W0.shape[:2]:
        raise ShapeError(f"magnitude {tuple(magnitude.shape)} does not fit W0 {tuple(W0.shape)}: expected (L, d_out)")
    stats = _row_statistics(W0, B, A, scale.to(W0))
    return magnitude_change(stats, magnitude), direction_change(stats)


def linear_fit(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Least-squares line ``y = slope x + intercept`` and Pearson's ``r`` of the points ``(x_i, y_i)``.

    ``x``, ``y``: ``(N,)``; pairs with a NaN are left out. ``(slope, intercept, r)``; NaN where undefined (fewer
    than two points, or no spread in ``x``; ``r`` also with no spread in ``y``). Computed in float64.
    """
    if x.ndim != 1 or x.shape != y.shape:
        raise ShapeError(f"expected x (N,) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep], y[keep]
    nan = float("nan")
    if x.numel() < 2:
        return nan, nan, nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0:
        return nan, nan, nan
    slope = sxy / sxx
    intercept = float(y.mean()) - slope * float(x.mean())
    r = sxy / (sxx * syy) ** 0.5 if syy > 0 else nan
    return slope, intercept, r

"""The CondLoRA rule (Kim et al. 2024, eqs. 5-7) as the authors' code computes it: pure tensor math.

One pair of trainable matrices per target module *type*, shared by all ``L`` layers, each stored as an
``nn.Linear(d_in, r, bias=False)`` weight: ``theta_A`` ``(r, d_in)`` and ``theta_B`` ``(r, d_in)``. With the stored
base weight ``W_l`` ``(d_out, d_in)`` of layer ``l`` (square: ``d_out = d_in = d``)::

    A_l  = (W_l @ theta_A.T).T     (r, d)        = theta_A @ W_l.T
    B_l  =  W_l @ theta_B.T        (d, r)
    dW_l = (lora_alpha / r) * B_l @ A_l          (d, d)

The paper's eq. 6 writes ``W_l.T`` for ``B``; the authors' code (``linear_for_lora_B(self.weight)``) uses ``W_l``.
This module follows the code. By construction the conversion matrices of a CondLoRA adapter are the shared
matrices themselves, in every layer: ``W_l^-1 A_l.T = theta_A.T`` and ``W_l^-1 B_l = theta_B.T``.

No files, no printing; the ``nn.Module`` that trains it lives in :mod:`loralens.training.condlora`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from loralens.errors import DTypeError, ShapeError

__all__ = [
    "condlora_factors",
    "condlora_delta",
    "lora_parameter_count",
    "condlora_parameter_count",
]


def condlora_factors(W: Tensor, theta_A: Tensor, theta_B: Tensor) -> tuple[Tensor, Tensor]:
    """Every layer's LoRA factors from the shared CondLoRA matrices, with one batched matrix product.

    Parameters
    ----------
    W : Tensor
        ``(L, d, d)`` stacked base weights as ``nn.Linear`` stores them (``(d_out, d_in)``, square), or one ``(d, d)``.
    theta_A, theta_B : Tensor
        ``(r, d)`` each: the weights of the authors' ``linear_for_lora_A`` / ``linear_for_lora_B``.

    Returns
    -------
    (A, B) : tuple of Tensor
        ``A`` ``(L, r, d)`` with ``A[l] = theta_A @ W[l].T``, and ``B`` ``(L, d, r)`` with ``B[l] = W[l] @ theta_B.T``
        (no leading ``L`` for a single ``W``), in the promoted dtype of the inputs. Differentiable in all inputs.

    Raises
    ------
    ShapeError
        ``W`` not square, or a ``theta`` whose shape does not fit it.
    """
    _check(W, theta_A, theta_B)
    dtype = torch.promote_types(torch.promote_types(W.dtype, theta_A.dtype), theta_B.dtype)
    return _factors(W.to(dtype), theta_A.to(dtype), theta_B.to(dtype))


def condlora_delta(W: Tensor, theta_A: Tensor, theta_B: Tensor, scaling: float) -> Tensor:
    """The weight update ``dW[l] = scaling * B[l] @ A[l]`` of every layer.

    Parameters
    ----------
    W : Tensor
        ``(L, d, d)`` (or ``(d, d)``) base weights.
    theta_A, theta_B : Tensor
        ``(r, d)`` each.
    scaling : float
        ``lora_alpha / r``.

    Returns
    -------
    Tensor
        ``(L, d, d)`` (or ``(d, d)``), the same shape as ``W``.
    """
    A, B = condlora_factors(W, theta_A, theta_B)
    return scaling * (B @ A)


def lora_parameter_count(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """Trainable parameters of LoRA: ``sum over (module, layer) of r * (d_in + d_out)``.

    ``shapes`` holds one ``(d_out, d_in)`` per adapted weight (every module of every layer).
    """
    _check_rank(r)
    return sum(r * (d_in + d_out) for d_out, d_in in shapes)


def condlora_parameter_count(module_types: Mapping[str, tuple[int, int]], r: int) -> int:
    """Trainable parameters of CondLoRA: ``sum over module types of 2 * r * d_in`` (``theta_A``, ``theta_B``).

    ``module_types`` maps each module type (e.g. ``query``) to its ``(d_out, d_in)``, the same in every layer;
    the count does not grow with the number of layers.
    """
    _check_rank(r)
    return sum(2 * r * d_in for _, d_in in module_types.values())


def _factors(W: Tensor, theta_A: Tensor, theta_B: Tensor) -> tuple[Tensor, Tensor]:
    """``W`` (..., d, d), thetas (r, d), one dtype -> ``A`` (..., r, d), ``B`` (..., d, r)."""
    r = theta_A.shape[0]
    theta = torch.cat([theta_A, theta_B])  # (2r, d)
    AB = W @ theta.mT  # (..., d, 2r): [W theta_A.T | W theta_B.T], one batched product for both factors
    return AB[..., :r].mT, AB[..., r:]


def _check(W: Tensor, theta_A: Tensor, theta_B: Tensor) -> None:
    if W.ndim not in (2, 3) or W.shape[-1] != W.shape[-2]:
        raise ShapeError(
            f"CondLoRA needs square base weights (L, d, d) or (d, d), got {tuple(W.shape)}; "
            "its rule A_l = theta_A W_l^T only gives an (r, d_in) factor when d_out = d_in"
        )
    d = W.shape[-1]
    for name, theta in (("theta_A", theta_A), ("theta_B", theta_B)):
        if theta.ndim != 2 or theta.shape[1] != d:
            raise ShapeError(
                f"{name} must be (r, {d}) for base weights of shape {tuple(W.shape)}, got {tuple(theta.shape)}"
            )
    if theta_A.shape != theta_B.shape:
        raise ShapeError(f"theta_A {tuple(theta_A.shape)} and theta_B {tuple(theta_B.shape)} must have the same shape")
    for name, t in (("W", W), ("theta_A", theta_A), ("theta_B", theta_B)):
        if not t.dtype.is_floating_point:
            raise DTypeError(f"{name} must be floating point, got {t.dtype}")


def _check_rank(r: int) -> None:
    if r < 1:
        raise ShapeError(f"rank r must be at least 1, got {r}")

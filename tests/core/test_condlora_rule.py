"""The CondLoRA rule against an explicit float64 numpy loop, its conversion-matrix identity, its parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loralens.core.condlora import (
    condlora_delta,
    condlora_factors,
    condlora_parameter_count,
    lora_parameter_count,
)
from loralens.core.conversion import conversion_matrices
from loralens.errors import DTypeError, ShapeError
from test_import_isolation import FORBIDDEN, imported_forbidden


def _case(L: int = 4, d: int = 12, r: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    theta_A = torch.randn(r, d, generator=g, dtype=torch.float64)
    theta_B = torch.randn(r, d, generator=g, dtype=torch.float64)
    return W, theta_A, theta_B


def test_factors_follow_the_authors_code_in_every_layer() -> None:
    W, theta_A, theta_B = _case()
    A, B = condlora_factors(W, theta_A, theta_B)
    assert A.shape == (4, 3, 12) and B.shape == (4, 12, 3)
    Wn, tA, tB = W.numpy(), theta_A.numpy(), theta_B.numpy()
    for layer in range(4):
        # linear_for_lora_A(W).T and linear_for_lora_B(W): nn.Linear(d, r) applied to the rows of W
        np.testing.assert_allclose(A[layer].numpy(), (Wn[layer] @ tA.T).T, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(B[layer].numpy(), Wn[layer] @ tB.T, rtol=1e-13, atol=1e-13)


def test_single_matrix_and_delta() -> None:
    W, theta_A, theta_B = _case(L=2)
    A1, B1 = condlora_factors(W[1], theta_A, theta_B)
    assert A1.shape == (3, 12) and B1.shape == (12, 3)
    dW = condlora_delta(W, theta_A, theta_B, scaling=0.5)
    expected = 0.5 * (W[1].numpy() @ theta_B.numpy().T) @ (theta_A.numpy() @ W[1].numpy().T)
    np.testing.assert_allclose(dW[1].numpy(), expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(A1.numpy(), condlora_factors(W, theta_A, theta_B)[0][1].numpy(), rtol=0, atol=0)


def test_conversion_matrices_of_condlora_are_the_shared_thetas() -> None:
    """W_l^-1 A_l^T = theta_A^T and W_l^-1 B_l = theta_B^T in every layer: its Figure-1 matrix is all ones."""
    W, theta_A, theta_B = _case(L=5, d=16, r=4, seed=3)
    A, B = condlora_factors(W, theta_A, theta_B)
    conv = conversion_matrices(W, A, B)
    for layer in range(5):
        torch.testing.assert_close(conv.A[layer], theta_A.T, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(conv.B[layer], theta_B.T, rtol=1e-10, atol=1e-10)


def test_gradients_reach_both_thetas() -> None:
    W, theta_A, theta_B = _case(L=2, d=5, r=2)
    theta_A.requires_grad_(True)
    theta_B.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: condlora_factors(W, a, b), (theta_A, theta_B))


def test_mixed_dtypes_promote() -> None:
    W, theta_A, theta_B = _case()
    A, B = condlora_factors(W.float(), theta_A, theta_B.float())
    assert A.dtype == B.dtype == torch.float64


def test_bad_shapes_and_dtypes_are_named() -> None:
    W, theta_A, theta_B = _case()
    with pytest.raises(ShapeError, match=r"square base weights .* got \(4, 12, 6\)"):
        condlora_factors(W[..., :6], theta_A, theta_B)
    with pytest.raises(ShapeError, match=r"theta_B must be \(r, 12\)"):
        condlora_factors(W, theta_A, theta_B[:, :5])
    with pytest.raises(ShapeError, match="same shape"):
        condlora_factors(W, theta_A, theta_B[:2])
    with pytest.raises(DTypeError, match="floating point"):
        condlora_factors(W.long(), theta_A, theta_B)


def test_parameter_counts_follow_table_4() -> None:
    # RoBERTa-base, r = 8, query + value in 12 layers: the paper's 294,912 and 24,576.
    square = [(768, 768)] * 24
    assert lora_parameter_count(square, 8) == 294_912
    assert condlora_parameter_count({"query": (768, 768), "value": (768, 768)}, 8) == 24_576
    # the same formula, written out, for non-square weights (Llama's GQA v_proj is 192 x 576)
    shapes = [(576, 576), (192, 576)] * 30
    assert lora_parameter_count(shapes, 4) == sum(4 * (i + o) for o, i in shapes)
    assert condlora_parameter_count({"q_proj": (576, 576), "v_proj": (192, 576)}, 4) == 2 * 4 * 576 * 2
    with pytest.raises(ShapeError, match="at least 1"):
        lora_parameter_count(square, 0)


def test_core_condlora_imports_no_io_or_training_stack(tmp_path) -> None:
    assert imported_forbidden(["loralens.core.condlora"], FORBIDDEN, tmp_path) == []

"""Gaussian draws: the same numbers in every dtype (up to the cast) and on every device; CPU generators only."""

from __future__ import annotations

import pytest
import torch

from loralens.core.random import gaussian


def test_same_numbers_in_float32_and_float64() -> None:
    g64 = gaussian(5, 3, generator=torch.Generator().manual_seed(7))
    g32 = gaussian(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert g64.dtype == torch.float64 and g32.dtype == torch.float32
    torch.testing.assert_close(g32, g64.float(), rtol=0, atol=0)
    ref = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(g64, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_numbers_on_cuda() -> None:
    cpu = gaussian(4, 4, generator=torch.Generator().manual_seed(1))
    cuda = gaussian(4, 4, generator=torch.Generator().manual_seed(1), device="cuda")
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refuses_a_cuda_generator() -> None:
    with pytest.raises(ValueError, match="CPU generator"):
        gaussian(2, generator=torch.Generator(device="cuda"))

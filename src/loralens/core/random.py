"""Gaussian draws that give the same numbers on every device: the one way loralens draws random matrices.

Draws come from a CPU generator in float64 and are then cast to the dtype and moved to the device of the
computation, so a seed gives the same baseline on ``cpu`` and ``cuda`` and, up to the cast, in float32 and float64.
Which generator (which seed) a draw uses is the analyses' business: see
:func:`loralens.analyses.engine.seeded_generator`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gaussian"]


def gaussian(
    *shape: int,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """I.i.d. N(0, 1) entries of ``shape``, drawn in float64 from ``generator`` (a CPU generator; None: torch's
    global one), then cast to ``dtype`` on ``device``."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"gaussian draws from a CPU generator (device-independent numbers), got one on {generator.device}"
        )
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)

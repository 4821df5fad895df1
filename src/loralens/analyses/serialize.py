"""The one serializer: tensors and numbers -> JSON-ready Python values, with one policy for what JSON lacks.

Every result's ``to_dict()`` goes through :func:`json_values`, so that all JSON outputs (the command line's included)
agree:

- floats are rounded to ``digits`` decimal places (10 by default; ``None`` keeps every bit, for quantities such as
  residuals that live far below 1e-10);
- NaN and +-inf become ``null`` (JSON has neither; a NaN is "undefined here", e.g. the mean off-diagonal of a
  single layer, or phi of an untrained factor);
- integer tensors give ints and bool tensors give bools, never floats.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["json_values", "layer_span"]


def json_values(x: Tensor | float | int, digits: int | None = 10) -> Any:
    """``x`` as (nested lists of) JSON values: a tensor of shape ``(a, b, ...)`` -> ``a`` lists of ``b`` ...; a
    0-d tensor or a number -> one value. See the module docstring for rounding and non-finite values."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bool:
            return t.tolist()
        if not (t.is_floating_point() or t.is_complex()):
            return t.tolist()  # ints stay ints
        return _clean(t.double().tolist(), digits)
    if isinstance(x, bool) or isinstance(x, int):
        return x
    return _clean(float(x), digits)


def layer_span(layers: tuple[int, ...] | list[int]) -> str:
    """Layer numbers in a few characters: ``0-5`` for a contiguous run, ``0,2,4`` otherwise."""
    layers = list(layers)
    if not layers:
        return ""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def _clean(value: Any, digits: int | None) -> Any:
    if isinstance(value, list):
        return [_clean(v, digits) for v in value]
    if not math.isfinite(value):
        return None
    return value if digits is None else round(value, digits)

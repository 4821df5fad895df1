"""The one serializer's policy: rounding, NaN and inf -> null, ints and bools kept, nested shapes kept."""

from __future__ import annotations

import json
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from loralens.analyses.serialize import json_values, layer_span


def test_policy() -> None:
    t = torch.tensor([[1 / 3, float("nan")], [float("inf"), -float("inf")]], dtype=torch.float64)
    assert json_values(t) == [[round(1 / 3, 10), None], [None, None]]
    assert json_values(t, digits=None)[0][0] == 1 / 3
    assert json_values(torch.tensor([1, 2, 3])) == [1, 2, 3] and isinstance(json_values(torch.tensor(2)), int)
    assert json_values(torch.tensor([True, False])) == [True, False]
    assert json_values(float("nan")) is None and json_values(0.25) == 0.25 and json_values(3) == 3
    assert json_values(torch.tensor(0.5, dtype=torch.float32)) == 0.5
    json.dumps(json_values(t), allow_nan=False)  # always valid JSON


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=20))
def test_rounded_values_are_finite_or_null(values: list[float]) -> None:
    out = json_values(torch.tensor(values, dtype=torch.float64))
    for x, y in zip(values, out, strict=True):
        assert (y is None) == (not math.isfinite(x))
        if y is not None:
            assert abs(y - x) <= 0.5e-10 * (1 + 1e-6) + 1e-16 * abs(x)


def test_layer_span() -> None:
    assert layer_span((0, 1, 2, 3)) == "0-3"
    assert layer_span([4]) == "4"
    assert layer_span((0, 2, 4)) == "0,2,4"
    assert layer_span(()) == ""

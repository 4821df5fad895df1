"""The public API: every name ``loralens`` exports resolves, lazily, to a documented object."""

from __future__ import annotations

import subprocess
import sys

import pytest

import loralens


@pytest.mark.parametrize("name", loralens.__all__)
def test_every_export_resolves_and_is_documented(name: str) -> None:
    value = getattr(loralens, name)
    assert value is not None
    if callable(value):
        assert (value.__doc__ or "").strip(), f"loralens.{name} has no docstring"


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'compute_everything'"):
        _ = loralens.compute_everything  # type: ignore[attr-defined]


def test_many_adapter_api_is_exported() -> None:
    """The many-adapter path (one LU per base weight, many adapters) is reachable from the top level."""
    from loralens.analyses.conversion import compute_conversions_many
    from loralens.analyses.engine import parse_memory_size
    from loralens.analyses.similarity import layer_similarity_many

    assert loralens.compute_conversions_many is compute_conversions_many
    assert loralens.layer_similarity_many is layer_similarity_many
    assert loralens.parse_memory_size("1.5GB") == parse_memory_size("1.5GB") == 1_500_000_000


def test_import_is_lazy() -> None:
    """``import loralens`` alone loads neither torch nor the loaders: exports are imported on first use."""
    heavy = ("torch", "safetensors", "loralens.analyses.conversion")
    code = f"import sys, loralens; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

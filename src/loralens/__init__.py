"""loralens: look inside trained low-rank adapters.

The Python API (see :mod:`loralens.analysis`)::

    import loralens
    adapter = loralens.load_lora_adapter("path/to/adapter")
    base = loralens.base_for(adapter, "path/to/base")      # or the adapter's recorded base
    conversions = loralens.compute_conversions(base, adapter)
    report = loralens.layer_similarity(conversions)

The names below are imported on first use (PEP 562), so ``import loralens.core.similarity`` loads the numeric
core alone, without the I/O stack (safetensors) that the loaders need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FACTORS": "loralens.analysis",
    "FactorSimilarity": "loralens.analysis",
    "ModuleConversion": "loralens.analysis",
    "SimilarityReport": "loralens.analysis",
    "base_for": "loralens.analysis",
    "compute_conversions": "loralens.analysis",
    "compute_conversions_many": "loralens.analysis",
    "layer_similarity": "loralens.analysis",
    "layer_similarity_many": "loralens.analysis",
    "parse_memory_size": "loralens.analysis",
    "similarity_reports_to_dict": "loralens.analysis",
    "Conversion": "loralens.core.conversion",
    "conversion_matrices": "loralens.core.conversion",
    "pairwise_subspace_similarity": "loralens.core.similarity",
    "random_similarity_expected": "loralens.core.similarity",
    "subspace_similarity": "loralens.core.similarity",
    "LoralensError": "loralens.errors",
    "LoralensWarning": "loralens.errors",
    "NearSingularWarning": "loralens.errors",
    "LoraAdapter": "loralens.io.adapters",
    "load_lora_adapter": "loralens.io.adapters",
    "BaseCheckpoint": "loralens.io.base_weights",
    "open_base": "loralens.io.base_weights",
    "CondLoraAdapter": "loralens.io.condlora",
    "load_condlora_adapter": "loralens.io.condlora",
    "materialise_condlora": "loralens.io.condlora",
    "ComparisonReport": "loralens.compare",
    "ParameterCounts": "loralens.compare",
    "compare_adapters": "loralens.compare",
    "parameter_counts": "loralens.compare",
    "rank_overlap": "loralens.lowrank_analysis",
    "amplification_report": "loralens.lowrank_analysis",
    "spectra_report": "loralens.lowrank_analysis",
}

__all__ = sorted([*_EXPORTS, "examples"])

if TYPE_CHECKING:  # static analysers see ordinary imports
    from loralens import examples
    from loralens.analysis import (
        FACTORS,
        FactorSimilarity,
        ModuleConversion,
        SimilarityReport,
        base_for,
        compute_conversions,
        compute_conversions_many,
        layer_similarity,
        layer_similarity_many,
        parse_memory_size,
        similarity_reports_to_dict,
    )
    from loralens.compare import ComparisonReport, ParameterCounts, compare_adapters, parameter_counts
    from loralens.core.conversion import Conversion, conversion_matrices
    from loralens.core.similarity import (
        pairwise_subspace_similarity,
        random_similarity_expected,
        subspace_similarity,
    )
    from loralens.errors import LoralensError, LoralensWarning, NearSingularWarning
    from loralens.io.adapters import LoraAdapter, load_lora_adapter
    from loralens.io.base_weights import BaseCheckpoint, open_base
    from loralens.io.condlora import CondLoraAdapter, load_condlora_adapter, materialise_condlora
    from loralens.lowrank_analysis import amplification_report, rank_overlap, spectra_report


def __getattr__(name: str) -> Any:
    if name == "examples":
        return importlib.import_module("loralens.examples")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loralens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

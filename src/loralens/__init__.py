"""loralens: look inside trained low-rank adapters.

The Python API (the analyses are in :mod:`loralens.analyses`)::

    import loralens
    adapter = loralens.load_lora_adapter("path/to/adapter")
    base = loralens.base_for(adapter, "path/to/base")      # or the adapter's recorded base
    conversions = loralens.compute_conversions(base, adapter)
    report = loralens.layer_similarity(conversions)
    loralens.build_report(base, adapter).write("results/report")  # everything `loralens report` writes

The names below are imported on first use (PEP 562), so ``import loralens.core.similarity`` loads the numeric
core alone, without the I/O stack (safetensors) that the loaders need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FACTORS": "loralens.analyses.conversion",
    "FactorSimilarity": "loralens.analyses.similarity",
    "ModuleConversion": "loralens.analyses.conversion",
    "SimilarityReport": "loralens.analyses.similarity",
    "adapter_similarity": "loralens.analyses.similarity",
    "base_for": "loralens.analyses.engine",
    "compute_conversions": "loralens.analyses.conversion",
    "compute_conversions_many": "loralens.analyses.conversion",
    "layer_similarity": "loralens.analyses.similarity",
    "layer_similarity_many": "loralens.analyses.similarity",
    "parse_memory_size": "loralens.analyses.engine",
    "similarity_reports_to_dict": "loralens.analyses.similarity",
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
    "ComparisonReport": "loralens.analyses.condlora_vs_lora",
    "ParameterCounts": "loralens.analyses.condlora_vs_lora",
    "compare_adapters": "loralens.analyses.condlora_vs_lora",
    "parameter_counts": "loralens.analyses.condlora_vs_lora",
    "rank_overlap": "loralens.analyses.lowrank",
    "amplification_report": "loralens.analyses.lowrank",
    "spectra_report": "loralens.analyses.lowrank",
    "IntrudersReport": "loralens.analyses.intruders",
    "intruder_dimensions": "loralens.analyses.intruders",
    "DoraReport": "loralens.analyses.dora",
    "DoraSeriesReport": "loralens.analyses.dora",
    "magnitude_direction": "loralens.analyses.dora",
    "magnitude_direction_series": "loralens.analyses.dora",
    "FinetunedAdapter": "loralens.analyses.finetuned",
    "finetuned_adapter": "loralens.analyses.finetuned",
    "ZooReport": "loralens.analyses.zoo",
    "adapter_zoo": "loralens.analyses.zoo",
    "BuiltReport": "loralens.render.build",
    "build_report": "loralens.render.build",
}

__all__ = sorted([*_EXPORTS, "examples"])

if TYPE_CHECKING:  # static analysers see ordinary imports
    from loralens import examples
    from loralens.analyses.condlora_vs_lora import ComparisonReport, ParameterCounts, compare_adapters, parameter_counts
    from loralens.analyses.conversion import FACTORS, ModuleConversion, compute_conversions, compute_conversions_many
    from loralens.analyses.dora import DoraReport, DoraSeriesReport, magnitude_direction, magnitude_direction_series
    from loralens.analyses.engine import base_for, parse_memory_size
    from loralens.analyses.finetuned import FinetunedAdapter, finetuned_adapter
    from loralens.analyses.intruders import IntrudersReport, intruder_dimensions
    from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
    from loralens.analyses.similarity import (
        FactorSimilarity,
        SimilarityReport,
        adapter_similarity,
        layer_similarity,
        layer_similarity_many,
        similarity_reports_to_dict,
    )
    from loralens.analyses.zoo import ZooReport, adapter_zoo
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
    from loralens.render.build import BuiltReport, build_report


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

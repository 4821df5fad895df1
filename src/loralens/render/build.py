"""The whole report from adapters: :func:`build_report` runs every analysis, then renders them.

It is what ``loralens report`` (and ``demo``) writes, from library objects: the base and adapters already loaded,
modules as a list, a torch dtype. Every analysis runs before anything is rendered or written; the result holds
``{file name: writer}`` for :func:`loralens.io.outputs.write_outputs` (``report.json`` among them) and the
``report.json`` data itself.

    >>> import loralens
    >>> from loralens import examples
    >>> adapter = loralens.load_lora_adapter(examples.default_adapter())
    >>> report = loralens.build_report(loralens.base_for(adapter, examples.default_base()), adapter)
    >>> report.write("results/report")        # report.html, the pictures, the tables and report.json
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralens.analyses.condlora_vs_lora import compare_adapters_many, comparisons_to_dict, parameter_counts
from loralens.analyses.engine import ProgressCallback, select_modules
from loralens.analyses.intruders import DEFAULT_EPSILON, DEFAULT_K, intruder_dimensions
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.analyses.provenance import adapter_record
from loralens.analyses.seeds import table2_from_folders, training_speeds
from loralens.analyses.similarity import SimilarityReport, adapter_similarity
from loralens.errors import LoralensError, RankError
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.condlora import CondLoraAdapter
from loralens.io.outputs import Writer, json_writer, write_outputs
from loralens.render.report import DPI, input_identities, report_files

__all__ = ["BuiltReport", "build_report"]


@dataclass(frozen=True)
class BuiltReport:
    """A built report: ``files`` (``{file name: writer}``, ``report.json`` included), ``data`` (what
    ``report.json`` holds) and Figure 1's :class:`~loralens.analyses.similarity.SimilarityReport`."""

    files: dict[str, Writer]
    data: dict[str, Any]
    similarity: SimilarityReport

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` data (JSON-ready)."""
        return self.data

    def write(self, out: str | os.PathLike[str], *, replace: bool = False) -> list[Path]:
        """Write every file into the folder ``out`` atomically (:func:`loralens.io.outputs.write_outputs`)."""
        return write_outputs(Path(out), self.files, replace=replace)


def build_report(
    base: BaseCheckpoint,
    lora: LoraAdapter | Sequence[LoraAdapter],
    condlora: CondLoraAdapter | Sequence[CondLoraAdapter] | None = None,
    *,
    overlap: LoraAdapter | None = None,
    lowrank: bool = True,
    modules: Sequence[str] | None = None,
    seed: int = 0,
    dpi: int = DPI,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    null_draws: int = 20,
    progress: ProgressCallback | None = None,
) -> BuiltReport:
    """Everything ``loralens report`` writes: ``report.html`` (self-contained), pictures, tables, ``report.json``.

    Parameters
    ----------
    base : BaseCheckpoint
        The base of every adapter.
    lora : LoraAdapter or sequence of LoraAdapter
        Figure 1 and the low-rank analyses use the first; several need as many ``condlora`` (e.g. training seeds).
    condlora : CondLoraAdapter or sequence of CondLoraAdapter, optional
        One per LoRA adapter, paired in order: adds Tables 3 and 4 (training speeds from each folder's
        ``metrics.json`` when present), and with several pairs Table 3 over the pairs and Table 2
        (:func:`loralens.analyses.seeds.table2_from_folders`).
    overlap : LoraAdapter, optional
        A second adapter of the same base: adds the rank-subspace overlap of the first LoRA adapter against it.
    lowrank : bool
        Include the LoRA paper's amplification and spectra analyses (``overlap`` is drawn either way).
    modules : sequence of str, optional
        Module names to analyse; default all.
    seed : int
        Seed of every random baseline.
    dpi : int
        Resolution of the PNG files.
    device, dtype, layer_batch
        Where, in which precision and how many layers at a time the analyses run.
    null_draws : int
        Draws of the W-conditioned null (0: off) for Figure 1 and, with CondLoRA adapters, for Table 3; see
        :func:`~loralens.analyses.similarity.adapter_similarity` and
        :func:`~loralens.analyses.condlora_vs_lora.compare_adapters`.
    progress : callable, optional
        ``progress(stage, done, total)`` (:data:`~loralens.analyses.engine.ProgressCallback`): called as each
        analysis starts, ``stage`` ``"report: <analysis>"`` (``"report: similarity (Figure 1)"``, ``"report: LoRA vs
        CondLoRA (Table 3)"``, ``"report: parameters (Table 4)"``, ``"report: amplification"``, ``"report:
        spectra"``, ``"report: overlap"``, ``"report: figures and tables"``), ``done`` the analyses finished of the
        ``total`` this report runs, and once more with ``done == total`` at the end; Figure 1's own stages
        (``"solve"``, ``"similarity"``) pass through.

    Returns
    -------
    BuiltReport
        Its ``data`` is ``report.json``: Figure 1's ``"modules"`` and ``"settings"`` (run settings and inputs
        recorded), ``"inputs"`` (:func:`loralens.render.report.input_identities`), ``"comparison"``, ``"pairs"``,
        ``"parameters"`` and ``"lowrank"`` (None where not computed; with ``lowrank``, ``"amplification"``,
        ``"spectra"`` and ``"intruders"``).
    """
    loras = [lora] if isinstance(lora, LoraAdapter) else list(lora)
    conds = [] if condlora is None else [condlora] if isinstance(condlora, CondLoraAdapter) else list(condlora)
    check_pairs(len(loras), len(conds))
    first = loras[0]
    step = _Steps(progress, conds=bool(conds), lowrank=lowrank, overlap=overlap is not None)
    step("similarity (Figure 1)")
    (sim,) = adapter_similarity(
        base, [first], modules=modules, seed=seed, device=device, dtype=dtype, layer_batch=layer_batch,
        null_draws=null_draws, progress=progress,
    )  # fmt: skip
    comparison = params = seeds = pairs = None
    if conds:
        step("LoRA vs CondLoRA (Table 3)")
        reports = compare_adapters_many(
            base, list(zip(loras, conds, strict=True)), modules=modules, seed=seed, dtype=dtype, device=device,
            null_draws=null_draws,
        )  # fmt: skip
        comparison = reports[0].to_dict()
        step("parameters (Table 4)")
        params = parameter_counts(base, r=conds[0].r, targets=sorted(conds[0].thetas)).to_dict()
        lora_folders, cond_folders = [a.path for a in loras], [c.path for c in conds]
        params["speed"] = training_speeds(lora_folders, cond_folders)
        params["speed_source"] = (
            "Speed: training examples/s recorded in each adapter's metrics.json"
            + (f" (mean over the {len(loras)} pairs)" if len(loras) > 1 else "")
            # the runs' wall clocks include whatever else the machine ran then
            + "; it compares the methods only if their runs had the same machine to themselves "
            "(benchmarks/bench_condlora_training.py times them side by side)."
        )
        if len(reports) > 1:
            pairs = comparisons_to_dict(reports, table2_from_folders(lora_folders, cond_folders))
            seeds = pairs.get("table2")
    low = _lowrank_analyses(
        base, first, overlap, lowrank, modules=modules, seed=seed, device=device, dtype=dtype,
        layer_batch=layer_batch, first_inputs=sim.settings["inputs"]["adapter"], step=step,
    )  # fmt: skip
    step("figures and tables")
    sim_data = sim.to_dict()
    inputs = input_identities(base, first, conds[0] if conds else None, recorded=sim.settings["inputs"])
    files = report_files(
        sim_data, inputs, comparison=comparison, params=params, lowrank=low, seeds=seeds, pairs=pairs, dpi=dpi
    )
    numbers = {
        **sim_data,
        "inputs": inputs,
        "comparison": comparison,
        "pairs": pairs,
        "parameters": params,
        "lowrank": low,
    }
    step.finish()
    return BuiltReport({**files, "report.json": json_writer(numbers)}, numbers, sim)


class _Steps:
    """``step(name)``: report that the analysis ``name`` starts (``progress("report: <name>", done, total)``);
    ``finish()``: all done. Does nothing without a callback."""

    def __init__(self, progress: ProgressCallback | None, *, conds: bool, lowrank: bool, overlap: bool) -> None:
        self._progress = progress
        # similarity, [Table 3, Table 4], [amplification, spectra], [overlap], figures and tables
        self.total = 2 + 2 * conds + 2 * lowrank + overlap
        self.done = 0
        self._name = ""

    def __call__(self, name: str) -> None:
        if self._name:
            self.done += 1
        self._name = name
        if self._progress is not None:
            self._progress(f"report: {name}", self.done, self.total)

    def finish(self) -> None:
        self.done = self.total
        if self._progress is not None:
            self._progress(f"report: {self._name}", self.done, self.total)


def _lowrank_analyses(
    base: BaseCheckpoint,
    lora: LoraAdapter,
    other: LoraAdapter | None,
    default: bool,
    *,
    modules: Sequence[str] | None,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    layer_batch: int | None,
    first_inputs: dict[str, Any],
    step: Callable[[str], None],
) -> dict[str, Any] | None:
    """The LoRA paper's analyses as plain data (``to_dict()``): amplification, spectra and intruder dimensions
    (:func:`loralens.analyses.intruders.intruder_dimensions`, k = 10 capped by the smallest module, epsilon = 0.5)
    when ``default``, the
    overlap of ``lora`` against ``other`` when given; None when neither. Their inputs are the report's own
    (``"inputs"``), so only the overlap records its two adapters (``first_inputs``: ``lora``'s, recorded already)."""
    options: dict[str, Any] = {"modules": modules, "device": device, "dtype": dtype, "record_inputs": False}
    reports: dict[str, Any] = {}
    if default:
        try:
            step("amplification")
            reports["amplification"] = amplification_report(base, lora, seed=seed, layer_batch=layer_batch, **options)
            step("spectra")
            reports["spectra"] = spectra_report(base, lora, layer_batch=layer_batch, **options)
            # intruder dimensions (Shuttleworth et al. 2024) run within the spectra stage: defined on dW = s B A
            # like amplification and spectra (which already refuse DoRA), k capped by the smallest module
            names = select_modules(lora, modules)
            if not any(lora.modules[n].magnitude is not None for n in names):
                k = min(DEFAULT_K, *(min(lora.modules[n].shape) for n in names))
                reports["intruders"] = intruder_dimensions(
                    base, lora, k=k, epsilon=DEFAULT_EPSILON, seed=seed, layer_batch=layer_batch, **options
                )
        except RankError as e:
            raise RankError(
                f"{e}; build the report with lowrank=False to leave the low-rank analyses out",
                e.indices,
                option=tuple(dict.fromkeys((*e.options, "lowrank"))),
            ) from e
    if other is not None:
        step("overlap")
        reports["overlap"] = rank_overlap(lora, other, base=base, **options)
        reports["overlap"].settings["inputs"] = {"adapters": [first_inputs, adapter_record(other)]}
    return {name: analysis.to_dict() for name, analysis in reports.items()} or None


def check_pairs(n_lora: int, n_condlora: int) -> None:
    """Refuse LoRA and CondLoRA adapter counts that do not make a report: at least one LoRA adapter; CondLoRA
    adapters, when given, one per LoRA adapter (paired in order); several LoRA adapters only with their pairs.
    Cheap: callers check before loading anything."""
    if n_lora < 1:
        raise LoralensError("a report needs a LoRA adapter; none given", option="lora")
    if n_condlora and n_condlora != n_lora:
        raise LoralensError(
            f"{n_lora} LoRA and {n_condlora} CondLoRA adapters given; give one CondLoRA adapter per LoRA adapter "
            "(they are paired in order)"
        )
    if not n_condlora and n_lora > 1:
        raise LoralensError(
            f"{n_lora} LoRA adapters given without CondLoRA adapters; several LoRA adapters are reported with their "
            "CondLoRA pairs, one per LoRA adapter in order (the similarity analysis compares several adapters alone)"
        )

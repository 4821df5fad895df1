"""Layer x layer subspace similarity phi of conversion matrices beside its random baseline (the paper's Figure 1).

>>> report = loralens.layer_similarity(conversions)
>>> report.modules["value"]["B"].phi          # (L, L) tensor
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.analyses.conversion import FACTORS, ModuleConversion, compute_conversions_many, least_squares_layers
from loralens.analyses.engine import ProgressCallback, at_model_layers, resolve_device, run_settings
from loralens.analyses.provenance import adapter_record, provenance
from loralens.core.similarity import (
    Side,
    mean_offdiagonal,
    pairwise_basis_similarity,
    product_singular_vectors,
    random_pairwise_similarity,
    random_similarity_expected,
    top_singular_vectors,
)
from loralens.errors import (
    BatchError,
    LoralensError,
    RankError,
)
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint

__all__ = [
    "FactorSimilarity",
    "SimilarityReport",
    "adapter_similarity",
    "layer_similarity",
    "layer_similarity_many",
    "similarity_reports_to_dict",
]


@dataclass(frozen=True)
class FactorSimilarity:
    """Layer x layer phi of one module's conversion matrices of one factor, beside its random baseline.

    ``phi`` and ``random_phi`` are ``(L, L)``; ``random_phi`` comes from Gaussian matrices of the same
    shape (one seeded draw); ``random_expected = max(i, j) / dim`` is the exact expectation.
    """

    phi: Tensor
    mean_offdiag: float
    random_phi: Tensor
    random_mean_offdiag: float
    random_expected: float
    dim: int
    i: int
    j: int


@dataclass(frozen=True)
class SimilarityReport:
    """phi matrices per module and factor, and the settings that made them."""

    modules: dict[str, dict[str, FactorSimilarity]]
    layers: dict[str, tuple[int, ...]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form: ``{"modules": {m: {factor: {...}}}, "settings": {..., "layers": {m: [...]}}}``."""
        return {
            "modules": {
                m: {
                    f: {
                        "phi": _rounded(s.phi),
                        "mean_offdiag": _float(s.mean_offdiag),
                        "random_phi": _rounded(s.random_phi),
                        "random_mean_offdiag": _float(s.random_mean_offdiag),
                        "random_expected": s.random_expected,
                        "dim": s.dim,
                        "i": s.i,
                        "j": s.j,
                    }
                    for f, s in factors.items()
                }
                for m, factors in self.modules.items()
            },
            "settings": {**self.settings, "layers": {m: list(v) for m, v in self.layers.items()}},
        }


def layer_similarity(
    conversions: dict[str, ModuleConversion],
    *,
    i: int | None = None,
    j: int | None = None,
    side: Side = "left",
    factors: Sequence[str] = FACTORS,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> SimilarityReport:
    """Layer x layer phi of the conversion matrices (the paper's Figure 1) with random baselines.

    Parameters
    ----------
    conversions : dict
        From :func:`compute_conversions`.
    i, j : int, optional
        Subspace dimensions; default ``r`` (the smallest rank of the module), as in the paper.
    side : {"left", "right"}
        Singular vectors to compare; the paper uses left.
    factors : sequence of str
        Any of ``"A"``, ``"B"``, ``"BA"``; ``BA`` goes through the factored SVD of ``conv_B @ A``.
    seed : int
        Seed of the Monte-Carlo random baseline.

    Returns
    -------
    SimilarityReport
    """
    return layer_similarity_many([conversions], i=i, j=j, side=side, factors=factors, seed=seed, device=device)[0]


def layer_similarity_many(
    conversions: Sequence[dict[str, ModuleConversion]],
    *,
    i: int | None = None,
    j: int | None = None,
    side: Side = "left",
    factors: Sequence[str] = FACTORS,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
) -> list[SimilarityReport]:
    """:func:`layer_similarity` for several adapters (from :func:`compute_conversions_many`).

    Each report equals the one :func:`layer_similarity` gives for that adapter alone: its random baseline
    comes from a generator seeded with ``seed`` for each adapter, so adapters of the same shapes share their
    baselines, which are then drawn once. The singular vectors of the same module and factor of all adapters
    are computed in one batched call.
    """
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise LoralensError(f"unknown factor {unknown[0]!r}; choose from {', '.join(FACTORS)}")
    for convs in conversions:
        for name, mc in convs.items():
            _check_rank_fits(name, mc, i, j)
    dev = resolve_device(device)
    try:
        batched = _batched_phi(conversions, i, j, side, factors, dev)
    except BatchError:
        batched = {}  # the per-adapter pass below raises the error, naming the adapter's module and layers
    generator = torch.Generator(device=dev)
    baselines: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}  # draw history -> (phi, generator state after)
    reports = []
    for n, convs in enumerate(conversions):
        generator.manual_seed(seed)
        history: tuple[Any, ...] = ()
        modules: dict[str, dict[str, FactorSimilarity]] = {}
        for name, mc in convs.items():
            r = min(mc.ranks)
            ii, jj = (i or r), (j or i or r)
            per_factor = {}
            for factor in factors:
                try:
                    phi, (m, k) = batched.get((n, name, factor)) or _conversion_similarity(
                        mc, factor, ii, jj, side, dev
                    )
                    history += ((len(mc.layers), m, k, ii, jj, side, factor == "BA" and min(mc.ranks), mc.A.dtype),)
                    if history not in baselines:
                        random = _random_similarity(mc, factor, (m, k), ii, jj, side, generator, dev)
                        baselines[history] = (random, generator.get_state())
                    random, state = baselines[history]
                    generator.set_state(state)
                except BatchError as e:
                    raise at_model_layers(e, f"{name} ({factor})", mc.layers, None) from e
                dim = m if side == "left" else k
                per_factor[factor] = FactorSimilarity(
                    phi,
                    float(mean_offdiagonal(phi)),
                    random,
                    float(mean_offdiagonal(random)),
                    random_similarity_expected(ii, jj, dim),
                    dim,
                    ii,
                    jj,
                )
            modules[name] = per_factor
        settings = {
            "side": side,
            "i": i,
            "j": j,
            "i_default": "r (smallest rank of each module)" if i is None else None,
            "factors": list(factors),
            "seed": seed,
            "random_baseline": "Gaussian matrices of the same shape (rank-r products for BA), one seeded draw",
            "conventions": {name: mc.conversion.convention for name, mc in convs.items()},
            "least_squares_layers": {name: least_squares_layers(mc) for name, mc in convs.items()},
        }
        reports.append(SimilarityReport(modules, {name: mc.layers for name, mc in convs.items()}, settings))
        if progress is not None:
            progress("similarity", n + 1, len(conversions))
    return reports


def adapter_similarity(
    base: BaseCheckpoint,
    adapters: Sequence[LoraAdapter],
    *,
    modules: Sequence[str] | None = None,
    i: int | None = None,
    j: int | None = None,
    side: Side = "left",
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    progress: ProgressCallback | None = None,
) -> list[SimilarityReport]:
    """Figure 1 from the adapters themselves: solve (one factorisation per base weight for all ``adapters``,
    :func:`~loralens.analyses.conversion.compute_conversions_many`) and compare (:func:`layer_similarity_many`).

    One report per adapter, whose ``settings`` also record the run (``device``, ``dtype``, and ``max_memory`` in
    bytes when given) and its ``inputs`` (:func:`loralens.analyses.provenance.provenance`: the base's files are
    hashed once for all adapters): what the similarity command prints as JSON.
    """
    if not adapters:
        raise LoralensError("no adapter given")
    convs = compute_conversions_many(
        base,
        adapters,
        modules=modules,
        device=device,
        dtype=dtype,
        layer_batch=layer_batch,
        max_memory=max_memory,
        with_product=False,
        with_residuals=False,
        progress=progress,
    )
    reports = layer_similarity_many(convs, i=i, j=j, side=side, seed=seed, device=device, progress=progress)
    run = run_settings(device, dtype, max_memory=max_memory)
    inputs = provenance(base, adapters[0])
    for k, (report, adapter) in enumerate(zip(reports, adapters, strict=True)):
        own = inputs["adapter"] if k == 0 else adapter_record(adapter)
        report.settings.update(run, inputs={**inputs, "adapter": own})
    return reports


def similarity_reports_to_dict(reports: Sequence[SimilarityReport], adapters: Sequence[str]) -> dict[str, Any]:
    """JSON-ready form of several adapters' reports over one base.

    ``{"adapters": [{"adapter": <label>, "modules": {...}, "layers": {...}, "conventions": {...},
    "least_squares_layers": {...}}, ...], "settings": {...}}``: each entry's ``modules`` is exactly the
    single-adapter ``"modules"`` object of :meth:`SimilarityReport.to_dict`; ``settings`` holds what all adapters
    share (side, i, j, factors, seed, ...). When the reports record their inputs (:func:`adapter_similarity`),
    each entry holds its adapter's (``"inputs": {"adapter": ...}``) and ``settings["inputs"]`` the shared rest
    (base, versions): what the similarity command prints as JSON for several adapters.
    """
    if len(reports) != len(adapters) or not reports:
        raise LoralensError(f"need one label per report, got {len(reports)} reports and {len(adapters)} labels")
    entries = []
    for label, report in zip(adapters, reports, strict=True):
        d = report.to_dict()
        entries.append(
            {
                "adapter": label,
                "modules": d["modules"],
                "layers": d["settings"]["layers"],
                "conventions": d["settings"]["conventions"],
                "least_squares_layers": d["settings"].get("least_squares_layers", {}),
            }
        )
    per_adapter = ("conventions", "least_squares_layers")
    shared = {k: v for k, v in reports[0].settings.items() if k not in per_adapter}
    if isinstance(shared.get("inputs"), dict):  # recorded by adapter_similarity: each adapter's own with its entry
        for entry, report in zip(entries, reports, strict=True):
            entry["inputs"] = {"adapter": report.settings["inputs"].get("adapter")}
        shared["inputs"] = {k: v for k, v in shared["inputs"].items() if k != "adapter"}
    return {"adapters": entries, "settings": shared}


# Stack at most this many elements of conversion matrices into one batched QR/SVD call.
_PHI_BATCH_ELEMENTS = 1 << 24


def _batched_phi(
    conversions: Sequence[dict[str, ModuleConversion]],
    i: int | None,
    j: int | None,
    side: Side,
    factors: Sequence[str],
    dev: torch.device,
) -> dict[tuple[int, str, str], tuple[Tensor, tuple[int, int]]]:
    """phi of every adapter, module and factor, with one QR/SVD call per group of equally shaped stacks.

    Returns ``(adapter index, module, factor) -> (phi (L, L), (m, n))`` as :func:`_conversion_similarity`.
    """
    groups: dict[tuple[Any, ...], list[tuple[int, str]]] = {}
    for n, convs in enumerate(conversions):
        for name, mc in convs.items():
            r = min(mc.ranks)
            shapes = (tuple(mc.conversion.A.shape), tuple(mc.conversion.B.shape), tuple(mc.A.shape))
            for factor in factors:
                key = (name, factor, mc.layers, shapes, i or r, j or i or r, mc.conversion.B.dtype)
                groups.setdefault(key, []).append((n, name))
    out = {}
    for (_, factor, layers, shapes, ii, jj, _), members in groups.items():
        L = len(layers)
        step = max(1, _PHI_BATCH_ELEMENTS // max(1, L * max(shapes[0][1] * shapes[0][2], shapes[1][1] * shapes[1][2])))
        for start in range(0, len(members), step):
            part = [conversions[n][name] for n, name in members[start : start + step]]
            k = max(ii, jj)
            if factor == "BA":
                B = torch.cat([mc.conversion.B for mc in part]).to(dev)
                U = product_singular_vectors(B, torch.cat([mc.A for mc in part]).to(dev), k, side)
                shape = (B.shape[1], part[0].A.shape[2])
            else:
                X = torch.cat([mc.conversion.A if factor == "A" else mc.conversion.B for mc in part]).to(dev)
                U = top_singular_vectors(X, k, side)
                shape = (X.shape[1], X.shape[2])
            # All pairs of layers of all adapters of this part: one batched product (n, L i, d) @ (n, d, L j).
            V = U.reshape(len(part), L, *U.shape[1:])  # (n, L, d, k)
            d = V.shape[2]
            G = V[..., :ii].permute(0, 1, 3, 2).reshape(len(part), L * ii, d) @ V[..., :jj].permute(0, 2, 1, 3).reshape(
                len(part), d, L * jj
            )
            phi = (G.reshape(len(part), L, ii, L, jj).square().sum(dim=(2, 4)) / min(ii, jj)).cpu()  # (n, L, L)
            for q, (n, name) in enumerate(members[start : start + step]):
                out[(n, name, factor)] = (phi[q], shape)
    return out


def _conversion_similarity(
    mc: ModuleConversion, factor: str, i: int, j: int, side: Side, dev: torch.device
) -> tuple[Tensor, tuple[int, int]]:
    """phi (L, L) on the CPU and the shape (m, n) of the compared matrices."""
    c = mc.conversion
    k = max(i, j)
    if factor == "BA":
        U = product_singular_vectors(c.B.to(dev), mc.A.to(dev), k, side)
        shape = (c.B.shape[1], mc.A.shape[2])
    else:
        X = (c.A if factor == "A" else c.B).to(dev)
        U = top_singular_vectors(X, k, side)
        shape = (X.shape[1], X.shape[2])
    return pairwise_basis_similarity(U[..., :i], U[..., :j]).cpu(), shape


def _random_similarity(
    mc: ModuleConversion,
    factor: str,
    shape: tuple[int, int],
    i: int,
    j: int,
    side: Side,
    generator: torch.Generator,
    dev: torch.device,
) -> Tensor:
    rank = min(mc.ranks) if factor == "BA" else None
    dtype = mc.conversion.B.dtype
    return random_pairwise_similarity(
        len(mc.layers), shape, i=i, j=j, side=side, rank=rank, generator=generator, dtype=dtype, device=dev
    ).cpu()


def _check_rank_fits(name: str, mc: ModuleConversion, i: int | None, j: int | None) -> None:
    """Refuse an adapter whose rank r exceeds its base weight's d when phi would use more than d vectors."""
    r, d = max(mc.ranks), min(mc.conversion.A.shape[1], mc.conversion.B.shape[1])  # d = min(d_out, d_in)
    ii = i or min(mc.ranks)
    jj = j or ii
    if r > d and max(ii, jj) > d:
        raise RankError(
            f"module {name!r}: the adapter's rank r = {r} is larger than d = {d} of its base weight (lora_A has {r} "
            f"rows for a base weight of d = {d}), so its conversion matrices have rank at most {d} and phi with "
            f"i = {ii}, j = {jj} would use arbitrary vectors; choose i and j <= {d}, or use an adapter with r <= {d}",
            tuple(mc.layers),
            option=("i", "j"),
        )


def _rounded(t: Tensor) -> list[Any]:
    return [[round(float(x), 10) for x in row] for row in t.tolist()]


def _float(x: float) -> float | None:
    return None if x != x else round(x, 10)  # NaN (a single layer has no off-diagonal) -> null

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

from loralens.analyses.conversion import (
    FACTORS,
    W_NULL_DRAWS,
    ModuleConversion,
    WNullConversions,
    check_null_draws,
    compute_conversions_many,
    least_squares_layers,
)
from loralens.analyses.engine import (
    ProgressCallback,
    at_model_layers,
    resolve_device,
    run_settings,
    seeded_generator,
)
from loralens.analyses.provenance import adapter_record, provenance
from loralens.analyses.serialize import json_values
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
    "WNull",
    "FactorSimilarity",
    "SimilarityReport",
    "adapter_similarity",
    "layer_similarity",
    "layer_similarity_many",
    "similarity_reports_to_dict",
]


#: What the W-null's statistics are, written into the settings of every report that carries it.
W_NULL_STATISTICS = (
    "phi of the W-null conversion matrices computed exactly as the observed phi (same side, i, j); per cell "
    "over the N draws: phi_mean, phi_std (Bessel-corrected), z = (phi - phi_mean) / phi_std where phi_std > 1e-9; "
    "where phi_std <= 1e-9 (no spread, e.g. the diagonal, where phi = 1 in every draw) z = 0 if "
    "|phi - phi_mean| <= 1e-9, else null; one-sided empirical p = (1 + #{draws with null phi >= phi - 1e-9}) / "
    "(N + 1) (ties within 1e-9, the diagonal's rounding, count as reached); mean_offdiag = mean over draws "
    "of each draw's mean off-diagonal phi, mean_offdiag_std its std over draws; "
    "share_of_excess = (mean_offdiag(W-null) - random_mean_offdiag) / (mean_offdiag - random_mean_offdiag), "
    "the share of the observed excess over the "
    "Gaussian baseline that the W-null already reaches (null when |denominator| < 1e-6 or undefined)"
)
# Below this |observed - Gaussian| mean off-diagonal, share_of_excess is undefined (null).
_SHARE_MIN_EXCESS = 1e-6
# Differences of phi (and spreads) up to this are rounding: a null std below it has no spread, and an observed
# phi within it of a null draw ties with it.
_TIE = 1e-9


@dataclass(frozen=True)
class WNull:
    """The W-conditioned null of one module and factor: phi of ``W_l^-1 R_l`` (R Gaussian, shaped as the
    factor's right-hand side), over ``draws`` draws, beside the observed phi (see :data:`W_NULL_STATISTICS`).

    ``phi_mean``, ``phi_std``, ``z`` and ``p`` are ``(L, L)``; ``share_of_excess`` is NaN where undefined.
    """

    draws: int
    phi_mean: Tensor
    phi_std: Tensor
    z: Tensor
    p: Tensor
    mean_offdiag: float
    mean_offdiag_std: float
    share_of_excess: float

    def to_dict(self) -> dict[str, Any]:
        """``{"draws", "mean_offdiag", "mean_offdiag_std", "share_of_excess", "phi_mean", "phi_std", "z", "p"}``."""
        return {
            "draws": self.draws,
            "mean_offdiag": json_values(self.mean_offdiag),
            "mean_offdiag_std": json_values(self.mean_offdiag_std),
            "share_of_excess": json_values(self.share_of_excess),
            "phi_mean": json_values(self.phi_mean),
            "phi_std": json_values(self.phi_std),
            "z": json_values(self.z),
            "p": json_values(self.p),
        }


@dataclass(frozen=True)
class FactorSimilarity:
    """Layer x layer phi of one module's conversion matrices of one factor, beside its random baseline.

    ``phi`` and ``random_phi`` are ``(L, L)``; ``random_phi`` comes from Gaussian matrices of the same
    shape (one seeded draw); ``random_expected = max(i, j) / dim`` is the exact expectation; ``w_null`` the
    W-conditioned null (None when not drawn).
    """

    phi: Tensor
    mean_offdiag: float
    random_phi: Tensor
    random_mean_offdiag: float
    random_expected: float
    dim: int
    i: int
    j: int
    w_null: WNull | None = None


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
                        "phi": json_values(s.phi),
                        "mean_offdiag": json_values(s.mean_offdiag),
                        "random_phi": json_values(s.random_phi),
                        "random_mean_offdiag": json_values(s.random_mean_offdiag),
                        "random_expected": s.random_expected,
                        "dim": s.dim,
                        "i": s.i,
                        "j": s.j,
                        "w_null": None if s.w_null is None else s.w_null.to_dict(),
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
    null_draws: int | None = None,
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
    null_draws : int, optional
        Draws of the W-conditioned null (``FactorSimilarity.w_null``), which the conversions must carry
        (``null_draws`` of :func:`compute_conversions`, with ``null_seed = seed``): None takes what they carry
        (none: no W-null), 0 leaves it out, N >= 2 requires exactly N.

    Returns
    -------
    SimilarityReport
    """
    return layer_similarity_many(
        [conversions], i=i, j=j, side=side, factors=factors, seed=seed, device=device, null_draws=null_draws
    )[0]


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
    null_draws: int | None = None,
) -> list[SimilarityReport]:
    """:func:`layer_similarity` for several adapters (from :func:`compute_conversions_many`).

    Each report equals the one :func:`layer_similarity` gives for that adapter alone: the random baseline of a
    module and factor is seeded by ``seed``, the module's name and the factor
    (:func:`~loralens.analyses.engine.seeded_generator`), so adapters with the same module shapes share it,
    drawn once. The singular vectors of the same module and factor of all adapters
    are computed in one batched call.

    The W-conditioned null (``null_draws``, see :func:`layer_similarity`) comes from the draws the conversions
    carry (:class:`~loralens.analyses.conversion.WNullConversions`); its phi is computed exactly as the observed
    one, a chunk of draws at a time (about ``_PHI_BATCH_ELEMENTS`` numbers of singular vectors per call): ``N``
    times the observed phi's SVD work, thin SVDs of ``(d, r)`` matrices, small beside the solve at model scale.
    """
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise LoralensError(f"unknown factor {unknown[0]!r}; choose from {', '.join(FACTORS)}")
    if null_draws is not None:
        check_null_draws(null_draws)
    for convs in conversions:
        for name, mc in convs.items():
            _check_rank_fits(name, mc, i, j)
            _check_null(name, mc, null_draws, seed)
    dev = resolve_device(device)
    try:
        batched = _batched_phi(conversions, i, j, side, factors, dev)
    except BatchError:
        batched = {}  # the per-adapter pass below raises the error, naming the adapter's module and layers
    baselines: dict[tuple[Any, ...], Tensor] = {}  # adapters of the same module shapes share their draws
    null_phis: dict[tuple[Any, ...], Tensor] = {}  # likewise their W-null (same name, layers, rank: same draws)
    reports = []
    for n, convs in enumerate(conversions):
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
                    rank = min(mc.ranks) if factor == "BA" else None
                    draw = (name, factor, len(mc.layers), m, k, ii, jj, side, rank, mc.conversion.B.dtype)
                    if draw not in baselines:
                        baselines[draw] = random_pairwise_similarity(
                            len(mc.layers), (m, k), i=ii, j=jj, side=side, rank=rank,
                            generator=seeded_generator(seed, name, purpose=f"gaussian:{factor}"),
                            dtype=mc.conversion.B.dtype, device=dev,
                        ).cpu()  # fmt: skip
                    random = baselines[draw]
                    null_phi = None
                    if mc.null is not None and null_draws != 0:
                        # A shared null (square W) has one phi for A and B: computed once, under "B".
                        null_factor = "B" if mc.null.shared and factor == "A" else factor
                        null_key = (
                            name,
                            null_factor,
                            *draw[2:],
                            mc.layers,
                            mc.null.draws,
                            mc.null.seed,
                            mc.null.B.shape,
                        )
                        if null_key not in null_phis:
                            null_phis[null_key] = _null_similarity(mc.null, null_factor, ii, jj, side, dev)
                        null_phi = null_phis[null_key]
                except BatchError as e:
                    raise at_model_layers(e, f"{name} ({factor})", mc.layers, None) from e
                dim = m if side == "left" else k
                mean = float(mean_offdiagonal(phi))
                random_mean = float(mean_offdiagonal(random))
                per_factor[factor] = FactorSimilarity(
                    phi,
                    mean,
                    random,
                    random_mean,
                    random_similarity_expected(ii, jj, dim),
                    dim,
                    ii,
                    jj,
                    None if null_phi is None else w_null_statistics(phi, null_phi, mean, random_mean),
                )
            modules[name] = per_factor
        settings = {
            "side": side,
            "i": i,
            "j": j,
            "i_default": "r (smallest rank of each module)" if i is None else None,
            "factors": list(factors),
            "seed": seed,
            "random_baseline": "Gaussian matrices of the same shape (rank-r products for BA), "
            "one draw seeded by (seed, module, factor)",
            "conventions": {name: mc.conversion.convention for name, mc in convs.items()},
            "least_squares_layers": {name: least_squares_layers(mc) for name, mc in convs.items()},
            "null_draws": _carried_draws(convs, null_draws),
            "w_null_baseline": W_NULL_DRAWS + "; " + W_NULL_STATISTICS,
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
    null_draws: int = 20,
) -> list[SimilarityReport]:
    """Figure 1 from the adapters themselves: solve (one factorisation per base weight for all ``adapters``,
    :func:`~loralens.analyses.conversion.compute_conversions_many`) and compare (:func:`layer_similarity_many`).

    ``null_draws`` (0: off) draws of the W-conditioned null, seeded by ``seed``, are solved on the same
    factorisations and compared like the adapters' factors (``FactorSimilarity.w_null``); see
    :func:`~loralens.analyses.conversion.compute_conversions_many` for their cost.

    One report per adapter, whose ``settings`` also record the run (``device``, ``dtype``, and ``max_memory`` in
    bytes when given) and its ``inputs`` (:func:`loralens.analyses.provenance.provenance`: the base's files are
    hashed once for all adapters): what the similarity command prints as JSON.
    """
    if not adapters:
        raise LoralensError("no adapter given")
    check_null_draws(null_draws)
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
        null_draws=null_draws,
        null_seed=seed,
    )
    reports = layer_similarity_many(
        convs, i=i, j=j, side=side, seed=seed, device=device, progress=progress, null_draws=null_draws
    )
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


def _null_similarity(null: WNullConversions, factor: str, i: int, j: int, side: Side, dev: torch.device) -> Tensor:
    """phi of every draw of the W-null, as :func:`_conversion_similarity` computes the observed one:
    ``(N, L, L)`` on the CPU. Draws go through the SVDs a chunk at a time (``_PHI_BATCH_ELEMENTS``)."""
    N, L, d_in = null.draws, null.A.shape[1], null.rhs_A.shape[2]
    k = max(i, j)
    per_draw = max(1, _PHI_BATCH_ELEMENTS // max(1, 2 * L * max(null.A[0, 0].numel(), null.B[0, 0].numel())))
    out = []
    for s in range(0, N, per_draw):
        n = min(per_draw, N - s)
        if factor == "BA":
            B = null.B[s : s + n].reshape(n * L, *null.B.shape[2:]).to(dev)
            A = null.rhs_A[s : s + n].reshape(n * L, d_in, -1).mT.to(dev)  # (n L, r, d_in)
            U = product_singular_vectors(B, A, k, side)
        else:
            X = null.A if factor == "A" else null.B
            U = top_singular_vectors(X[s : s + n].reshape(n * L, *X.shape[2:]).to(dev), k, side)
        V = U.reshape(n, L, *U.shape[1:])  # (n, L, m, k)
        d = V.shape[2]
        G = V[..., :i].permute(0, 1, 3, 2).reshape(n, L * i, d) @ V[..., :j].permute(0, 2, 1, 3).reshape(n, d, L * j)
        out.append((G.reshape(n, L, i, L, j).square().sum(dim=(2, 4)) / min(i, j)).cpu())
    return torch.cat(out)


def w_null_statistics(phi: Tensor, null_phi: Tensor, mean_offdiag: float, random_mean_offdiag: float) -> WNull:
    """The observed ``phi`` ``(L, L)`` against the W-null's ``null_phi`` ``(N, L, L)`` (N >= 2), as
    :data:`W_NULL_STATISTICS` defines; ``mean_offdiag`` / ``random_mean_offdiag`` are the observed and the
    Gaussian baseline's mean off-diagonal phi."""
    N = null_phi.shape[0]
    phi = phi.to(null_phi.dtype)
    mean = null_phi.mean(dim=0)
    std = null_phi.std(dim=0, correction=1)
    diff = phi - mean
    spread = std > _TIE
    z = torch.where(spread, diff / torch.where(spread, std, torch.ones_like(std)), torch.zeros_like(std))
    z = torch.where(~spread & (diff.abs() > _TIE), torch.full_like(z, float("nan")), z)
    p = (1 + (null_phi >= phi - _TIE).sum(dim=0)).to(null_phi.dtype) / (N + 1)
    per_draw = torch.stack([mean_offdiagonal(x) for x in null_phi])  # (N,), NaN for L = 1
    null_mean, null_std = float(per_draw.mean()), float(per_draw.std(correction=1))
    excess = mean_offdiag - random_mean_offdiag
    share = (null_mean - random_mean_offdiag) / excess if abs(excess) >= _SHARE_MIN_EXCESS else float("nan")
    return WNull(N, mean, std, z, p, null_mean, null_std, share)


def _carried_draws(convs: dict[str, ModuleConversion], null_draws: int | None) -> int:
    """The number of W-null draws a report holds (0 when none)."""
    if null_draws == 0:
        return 0
    carried = {mc.null.draws for mc in convs.values() if mc.null is not None}
    return carried.pop() if len(carried) == 1 else 0


def _check_null(name: str, mc: ModuleConversion, null_draws: int | None, seed: int) -> None:
    """Refuse a requested W-null that the conversions do not carry, or carry with other draws or another seed."""
    if not null_draws:
        return
    have = mc.null
    if have is None or have.draws != null_draws or have.seed != seed:
        got = "no W-null draws" if have is None else f"{have.draws} W-null draws seeded with {have.seed}"
        raise LoralensError(
            f"module {name!r}: asked for {null_draws} W-null draws seeded with {seed}, but its conversions carry "
            f"{got}; compute them with compute_conversions(..., null_draws={null_draws}, null_seed={seed}), or "
            "pass null_draws=None (what they carry) or 0 (none)",
            option="null_draws",
        )


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

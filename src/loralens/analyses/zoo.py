"""Many adapters of one base at once: how alike their updates and their factors' subspaces are, and how they cluster.

    >>> from loralens.analyses.zoo import adapter_zoo
    >>> zoo = adapter_zoo(paths)                   # adapter folders: each layer's factors read when compared
    >>> zoo.modules["value"].cosine_overall        # (N, N)
    >>> zoo.modules["value"].order                 # the adapters in dendrogram order

Per module, for every pair of adapters and every layer they share (:mod:`loralens.core.zoo`):

- ``cosine``: ``<dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F)``, ``dW = s B A``, from the factors;
- ``phi_B``, ``phi_A``: the paper's phi between the top-k left singular vectors of ``B_i`` and ``B_j`` (their
  column spaces) and between the top-k right singular vectors of ``A_i`` and ``A_j`` (row spaces), ``k`` the smallest
  rank among the adapters (all of a rank-k factor's column space when ranks are equal);
- ``overall``: for the cosine, that of the updates concatenated over the shared layers (sum of inner products over
  the product of total norms); for phi, the mean over layers;
- a hierarchical clustering (scipy, average linkage) on ``1 - overall cosine``, with the leaf order.

No base weights are read. The adapters are given loaded (:class:`~loralens.io.adapters.LoraAdapter`) or as folders
or :func:`~loralens.io.adapters.index_lora_adapter` indexes; an indexed adapter's factors are read from its
safetensors file one module-layer at a time (:func:`~loralens.io.adapters.read_layer_factors`) as that layer is
compared, then dropped (a pickled ``.bin`` adapter is held whole: it cannot be read a tensor at a time). Each
layer's ``N x N`` results are computed in tiles of ``block`` adapters, so memory holds one layer's factors of all
adapters (``N r (d_out + d_in)`` numbers, in the compute dtype, plus their ``N k (d_out + d_in)`` singular
vectors), a tile's ``(block r)^2`` products and the results (``3 L N^2`` numbers per module); with indexed
adapters, nothing grows with the number of layers but the results. The numbers are the same either way. Nothing
here prints or writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loralens.analyses.engine import (
    ProgressCallback,
    layer_progress,
    resolve_device,
    run_settings,
    warn_if_dora_product,
)
from loralens.analyses.serialize import json_values, layer_span
from loralens.core.similarity import top_singular_vectors
from loralens.core.zoo import cosine_from_inner_products, segment_subspace_similarity, update_inner_products
from loralens.errors import LoralensError, ModelMismatchError, RankError
from loralens.io.adapters import (
    AdapterModule,
    LoraAdapter,
    LoraAdapterIndex,
    ModuleIndex,
    index_lora_adapter,
    read_layer_factors,
)

__all__ = ["ZOO_DEFINITION", "ZooModule", "ZooReport", "adapter_zoo"]

#: An adapter as the zoo takes it: loaded, indexed (its factors read a layer at a time), or its folder (indexed).
_Adapter = LoraAdapter | LoraAdapterIndex

ZOO_DEFINITION = (
    "cosine: <dW_i, dW_j>_F / (||dW_i||_F ||dW_j||_F) with dW = s B A, from the factors (null where an update is "
    "zero); phi_B / phi_A: ||Q_i^T Q_j||_F^2 / k between the top-k left singular vectors of B (right of A), k the "
    "smallest rank; overall: cosine of the updates concatenated over the shared layers, mean phi over layers; "
    "clustering: scipy average linkage on 1 - overall cosine"
)


@dataclass(frozen=True)
class ZooModule:
    """One module type across N adapters, over the L layers they all have.

    Attributes
    ----------
    name : str
    layers : tuple of int
        The shared model layers.
    k : int
        Rank of the bases compared by phi.
    cosine, phi_B, phi_A : Tensor
        ``(L, N, N)`` per layer.
    cosine_overall, phi_B_overall, phi_A_overall : Tensor
        ``(N, N)``.
    order : tuple of int
        Adapter indices in dendrogram (leaf) order.
    linkage : Tensor
        ``(N - 1, 4)`` scipy linkage matrix of the clustering.
    """

    name: str
    layers: tuple[int, ...]
    k: int
    cosine: Tensor
    phi_B: Tensor
    phi_A: Tensor
    cosine_overall: Tensor
    phi_B_overall: Tensor
    phi_A_overall: Tensor
    order: tuple[int, ...]
    linkage: Tensor


@dataclass(frozen=True)
class ZooReport:
    """Pairwise similarity of N adapters per module, and the settings that made it."""

    adapters: tuple[str, ...]
    modules: dict[str, ZooModule]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"adapters": [...], "modules": {m: {"layers", "k", "cosine": {"overall", "per_layer"},
        "phi_B": {...}, "phi_A": {...}, "order", "linkage"}}, "definition", "settings"}``; NaN -> null."""

        def pair(overall: Tensor, per_layer: Tensor) -> dict[str, Any]:
            return {"overall": json_values(overall, 8), "per_layer": json_values(per_layer, 8)}

        return {
            "adapters": list(self.adapters),
            "modules": {
                name: {
                    "layers": list(m.layers),
                    "k": m.k,
                    "cosine": pair(m.cosine_overall, m.cosine),
                    "phi_B": pair(m.phi_B_overall, m.phi_B),
                    "phi_A": pair(m.phi_A_overall, m.phi_A),
                    "order": list(m.order),
                    "linkage": json_values(m.linkage, 8),
                }
                for name, m in self.modules.items()
            },
            "definition": ZOO_DEFINITION,
            "settings": self.settings,
        }


def adapter_zoo(
    adapters: Sequence[LoraAdapter | LoraAdapterIndex | str | os.PathLike[str]],
    *,
    modules: Sequence[str] | None = None,
    block: int = 256,
    assume_same_base: bool = False,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    progress: ProgressCallback | None = None,
) -> ZooReport:
    """Pairwise update cosines and factor-subspace phi of ``adapters`` per module and layer, and their clustering.

    Parameters
    ----------
    adapters : sequence of LoraAdapter, LoraAdapterIndex or adapter folders
        At least two, of one base (``base_model_name_or_path``) and one set of target modules. Folders are opened
        with :func:`~loralens.io.adapters.index_lora_adapter`; indexed adapters are read one module-layer at a time
        (memory: one layer's factors of all adapters), loaded ones are used as they are. Either gives the same
        numbers.
    modules : sequence of str, optional
        Module names to compare (default: all); each must be in every adapter.
    block : int
        Adapters per tile of the ``N x N`` computation (memory ``~ 2 L (block r)^2`` numbers per tile).
    assume_same_base : bool
        Compare adapters whose configs name their base differently (e.g. a local folder and its hub name); the
        module shapes must still agree.
    device, dtype
        Where and in what precision to compute (float64 or float32).
    progress : callable, optional
        ``progress("layers", layers done, total)`` (:data:`~loralens.analyses.engine.ProgressCallback`) as each
        layer of a module is compared across all adapters, ``total`` counting the shared layers of every module.

    Raises
    ------
    LoralensError
        Fewer than two adapters, a bad ``block`` or dtype, an unknown module.
    ModelMismatchError
        Adapters of different bases, target sets or module shapes, or sharing no layer.
    RankError
        A factor whose rank is below the compared ``k`` (e.g. an untrained, all-zero ``B``).
    """
    if len(adapters) < 2:
        raise LoralensError(f"a zoo needs at least two adapters, got {len(adapters)}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise LoralensError(f"block must be a positive integer, got {block!r}", option="block")
    if dtype not in (torch.float32, torch.float64):
        raise LoralensError(f"the zoo computes in float32 or float64, got {dtype}", option="dtype")
    dev = resolve_device(device)
    opened = [a if isinstance(a, LoraAdapter | LoraAdapterIndex) else index_lora_adapter(a) for a in adapters]
    names = _check_zoo(opened, modules, assume_same_base)
    for adapter in opened:
        # reads .path and .is_dora only, which an index has as a loaded adapter does
        warn_if_dora_product(adapter)
    notes: list[str] = []
    shared = {}
    for name in names:
        layers = sorted(set.intersection(*(set(a.modules[name].layers) for a in opened)))
        if not layers:
            raise ModelMismatchError(f"module {name!r}: the adapters share no layer; compare adapters of one model")
        if any(len(a.modules[name].layers) != len(layers) for a in opened):
            notes.append(f"{name}: compared on the {len(layers)} layers all adapters have ({layer_span(layers)})")
        shared[name] = layers
    advance = layer_progress(progress, sum(len(layers) for layers in shared.values()))
    result = {
        name: _compare_module(opened, name, layers, block, dev, dtype, advance) for name, layers in shared.items()
    }
    settings = {
        "n_adapters": len(opened),
        "bases": sorted({str(a.base_model_name_or_path) for a in opened}),
        "block": block,
        "notes": notes,
        **run_settings(dev, dtype),
    }
    return ZooReport(tuple(str(a.path) for a in opened), result, settings)


def _check_zoo(adapters: Sequence[_Adapter], modules: Sequence[str] | None, assume_same_base: bool) -> list[str]:
    """The module names to compare, after refusing adapters that are not of one base and target set."""
    bases = {str(a.base_model_name_or_path) for a in adapters}
    if len(bases) > 1 and not assume_same_base:
        by_base: dict[str, list[str]] = {}
        for a in adapters:
            by_base.setdefault(str(a.base_model_name_or_path), []).append(str(a.path))
        listing = "; ".join(
            f"{b}: {', '.join(paths[:2])}{' ...' if len(paths) > 2 else ''}" for b, paths in by_base.items()
        )
        raise ModelMismatchError(
            f"the adapters are of different bases ({listing}); compare adapters of one base (or, if these names are "
            "one model, say so: assume_same_base)",
            option="assume_same_base",
        )
    if modules is not None:
        missing = [(str(a.path), m) for a in adapters for m in modules if m not in a.modules]
        if missing:
            path, m = missing[0]
            raise LoralensError(
                f"{path}: no module {m!r} (it has {', '.join(sorted(adapters[0].modules))})", option="modules"
            )
        names = list(dict.fromkeys(modules))
    else:
        targets = {tuple(sorted(a.modules)) for a in adapters}
        if len(targets) > 1:
            first = sorted(adapters[0].modules)
            other = next(a for a in adapters if sorted(a.modules) != first)
            raise ModelMismatchError(
                f"the adapters target different modules: {adapters[0].path} has {', '.join(first)}, {other.path} has "
                f"{', '.join(sorted(other.modules))}; choose the modules they share",
                option="modules",
            )
        names = sorted(adapters[0].modules)
    for name in names:
        shapes = {a.modules[name].shape for a in adapters}
        if len(shapes) > 1:
            raise ModelMismatchError(f"module {name!r} has different shapes across the adapters: {sorted(shapes)}")
    return names


def _compare_module(
    adapters: Sequence[_Adapter],
    name: str,
    layers: list[int],
    block: int,
    dev: torch.device,
    dtype: torch.dtype,
    on_done: Callable[[int], None] | None = None,
) -> ZooModule:
    n, L = len(adapters), len(layers)
    mods = [a.modules[name] for a in adapters]
    positions = [[m.layers.index(layer) for layer in layers] for m in mods]
    k = min(int(m.ranks[p]) for m, pos in zip(mods, positions, strict=True) for p in pos)
    inner = torch.empty(L, n, n, dtype=dtype)
    phi_B = torch.empty(L, n, n, dtype=dtype)
    phi_A = torch.empty(L, n, n, dtype=dtype)
    chunks = [range(start, min(start + block, n)) for start in range(0, n, block)]
    r_max = max(_width(m) for m in mods)
    d_out, d_in = mods[0].shape
    for at, layer in enumerate(layers):
        # one layer of every adapter, read now (indexed adapters) and zero-padded to one width (zero columns of B /
        # rows of A change neither the updates nor their top-k singular vectors): scaled B (n, d_out, r_max) and
        # A (n, r_max, d_in); B is scaled in its stored dtype, then cast, as a stack of the loaded factors would be
        sB = torch.zeros(n, d_out, r_max, dtype=dtype)
        A = torch.zeros(n, r_max, d_in, dtype=dtype)
        for i, (adapter, m, pos) in enumerate(zip(adapters, mods, positions, strict=True)):
            B_i, A_i = _layer_factors(adapter, name, pos[at])
            sB[i, :, : B_i.shape[-1]] = B_i * float(m.scaling[pos[at]])
            A[i, : A_i.shape[0]] = A_i
            del B_i, A_i
        sB, A = sB.to(dev), A.to(dev)
        try:
            QB = top_singular_vectors(sB, k, "left")  # (n, d_out, k): one batched SVD for all adapters
            QA = top_singular_vectors(A, k, "right")  # (n, d_in, k)
        except RankError as e:
            bad = [str(adapters[i].path) for i in e.indices] or ["an adapter"]
            raise RankError(
                f"{bad[0]}: module {name!r} layer {layer}: a factor has rank below {k} (an untrained adapter? PEFT "
                "initialises lora_B to zero)",
                (layer,),
            ) from e
        for I in chunks:
            for J in chunks:
                if J.start < I.start:
                    continue
                tile = update_inner_products(
                    _side(sB[I.start : I.stop]), _rows(A[I.start : I.stop]), _segments(len(I), r_max, dev), len(I),
                    _side(sB[J.start : J.stop]), _rows(A[J.start : J.stop]), _segments(len(J), r_max, dev), len(J),
                )[0].cpu()  # fmt: skip
                qb = segment_subspace_similarity(_side(QB[I.start : I.stop]), _side(QB[J.start : J.stop]), k)[0].cpu()
                qa = segment_subspace_similarity(_side(QA[I.start : I.stop]), _side(QA[J.start : J.stop]), k)[0].cpu()
                for out, value in ((inner, tile), (phi_B, qb), (phi_A, qa)):
                    out[at, I.start : I.stop, J.start : J.stop] = value
                    out[at, J.start : J.stop, I.start : I.stop] = value.mT
        if on_done is not None:
            on_done(1)
    norms_sq = inner.diagonal(dim1=-2, dim2=-1)  # (L, n)
    cosine = cosine_from_inner_products(inner, norms_sq, norms_sq)
    total = norms_sq.sum(dim=0)
    cosine_overall = cosine_from_inner_products(inner.sum(dim=0), total, total)
    order, linkage = _cluster(cosine_overall)
    return ZooModule(
        name,
        tuple(layers),
        k,
        cosine,
        phi_B,
        phi_A,
        cosine_overall,
        phi_B.mean(dim=0),
        phi_A.mean(dim=0),
        order,
        linkage,
    )


def _width(module: AdapterModule | ModuleIndex) -> int:
    """Columns of the module's B as the zoo pads them: a loaded stack's width, else the largest rank."""
    return int(module.B.shape[-1]) if isinstance(module, AdapterModule) else max(module.ranks)


def _layer_factors(adapter: _Adapter, name: str, position: int) -> tuple[Tensor, Tensor]:
    """``B`` ``(d_out, r)`` and ``A`` ``(r, d_in)`` of one layer of a module, as stored (a loaded stack's padding
    kept); an indexed adapter's are read from its file now."""
    if isinstance(adapter, LoraAdapter):
        module = adapter.modules[name]
        return module.B[position], module.A[position]
    factors = read_layer_factors(adapter, name, position)
    return factors.B, factors.A


def _side(X: Tensor) -> Tensor:
    """``(n, d, c)`` -> ``(1, d, n c)``: the n matrices' columns side by side."""
    return X.permute(1, 0, 2).reshape(1, X.shape[1], -1)


def _rows(X: Tensor) -> Tensor:
    """``(n, c, d)`` -> ``(1, n c, d)``: the n matrices' rows stacked."""
    return X.reshape(1, -1, X.shape[-1])


def _segments(n: int, width: int, dev: torch.device) -> Tensor:
    return torch.arange(n, device=dev).repeat_interleave(width)


def _cluster(cosine: Tensor) -> tuple[tuple[int, ...], Tensor]:
    """Average-linkage clustering on ``1 - cosine`` (a zero update, NaN cosine, is at distance 1 from all)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    distance = (1 - cosine.double()).nan_to_num(nan=1.0).clamp(min=0)
    distance = (distance + distance.mT) / 2
    distance.fill_diagonal_(0)
    Z = linkage(squareform(distance.numpy(), checks=False), method="average")
    return tuple(int(i) for i in leaves_list(Z)), torch.from_numpy(Z)

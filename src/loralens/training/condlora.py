"""CondLoRA as an ``nn.Module`` around any ``transformers`` model: train it with any loop, merge it, save and load it.

    from loralens.training.condlora import CondLoraConfig, CondLoraModel
    model = CondLoraModel(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
                          CondLoraConfig(r=8, lora_alpha=8, target_modules=("query", "value"), task_type="SEQ_CLS"))
    ...                                   # train: only theta_A, theta_B per module type and the head require grad
    model.save_pretrained("runs/cond")    # the authors' format (peft_type "ConditionalLORA"), safetensors
    model = CondLoraModel.from_pretrained(fresh_base_model, "runs/cond")

The rule (see :mod:`loralens.core.condlora`): per target module type one ``theta_A``, ``theta_B`` of shape
``(r, d)`` (the authors' ``linear_for_lora_A`` / ``linear_for_lora_B``); in layer ``l`` with the frozen base weight
``W_l`` ``(d, d)``: ``A_l = theta_A @ W_l.T``, ``B_l = W_l @ theta_B.T``, output ``W_l x + (alpha / r) B_l A_l x``.

Efficiency: the factors of all layers of a type are computed once per forward of the wrapped model, by one
batched product over the stacked original weights (a forward pre-hook), then each layer uses its slice; nothing is
kept between forwards, so every step sees the current theta. ``dW`` is never formed while training. The stacked
weights are a copy of the targeted base weights (they also let :meth:`CondLoraModel.unmerge` restore them exactly).

Differences from the authors' fork, on purpose: dropout (``lora_dropout``, default 0) acts on the low-rank branch
only, as in PEFT (their layer also drops the input of the frozen weight); merging computes ``dW`` from the original
weights (theirs, on unmerge, from the merged ones).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional

from loralens.core.condlora import condlora_factors
from loralens.errors import CheckpointError, LoralensError, ModelMismatchError, ShapeError
from loralens.io.base_weights import BaseCheckpoint, open_base
from loralens.io.condlora import (
    CondLoraAdapter,
    condlora_config,
    load_condlora_adapter,
    lora_config_from_condlora,
    lora_tensors_from_condlora,
    theta_key,
    write_condlora_adapter,
    write_lora_adapter,
)
from loralens.io.keys import PEFT_PREFIX
from loralens.io.outputs import Writer

__all__ = ["CondLoraConfig", "CondLoraLinear", "CondLoraModel", "check_square_targets", "export_as_lora"]

#: What PEFT adds to ``modules_to_save`` for sequence classification (the new head), when present.
_SEQ_CLS_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class CondLoraConfig:
    """Settings of a CondLoRA adapter (the paper's, except ``target_modules``, which it fixes to query + value).

    ``modules_to_save``: modules trained and saved in full beside the thetas; None means the classification head
    (``classifier`` or ``score``) for ``task_type="SEQ_CLS"`` and nothing otherwise.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Sequence[str] = ("query", "value")
    modules_to_save: Sequence[str] | None = None
    lora_dropout: float = 0.0
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise LoralensError(f"CondLoRA: r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise LoralensError(f"CondLoRA: lora_alpha must be > 0, got {self.lora_alpha!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise LoralensError(
                f"CondLoRA: target_modules must be a non-empty list of names, got {self.target_modules!r}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoralensError(f"CondLoRA: lora_dropout must be in [0, 1), got {self.lora_dropout}")


class _SharedTheta(nn.Module):
    """One module type's trainable pair, named as in the authors' code, and the stacked original base weights.

    ``linear_for_lora_A`` / ``linear_for_lora_B``: ``nn.Linear(d, r, bias=False)``, weights ``(r, d)``.
    ``W``: ``(L, d, d)`` non-persistent buffer, the base weights of the ``L`` layers in model order.
    """

    W: Tensor  # registered as a buffer in __init__ (declared for type checkers; nn.Module's __getattr__ is untyped)

    def __init__(self, W: Tensor, r: int, scaling: float) -> None:
        super().__init__()
        d = W.shape[-1]
        opts = {"dtype": W.dtype, "device": W.device}
        self.linear_for_lora_A = nn.Linear(d, r, bias=False, **opts)
        self.linear_for_lora_B = nn.Linear(d, r, bias=False, **opts)
        nn.init.kaiming_uniform_(self.linear_for_lora_A.weight, a=math.sqrt(5))  # as LoRA's A
        nn.init.zeros_(self.linear_for_lora_B.weight)  # as LoRA's B: the model starts as the base
        self.register_buffer("W", W.detach().clone(), persistent=False)
        self.scaling = scaling
        self._per_layer: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A`` ``(L, r, d)`` and ``B`` ``(L, d, r)`` from the current thetas (one batched product)."""
        return condlora_factors(self.W, self.linear_for_lora_A.weight, self.linear_for_lora_B.weight)

    def scaled_factors(self) -> tuple[Tensor, Tensor]:
        """``A`` and ``scaling * B``: the scaling applied to the small ``(r, d)`` theta_B, not to activations."""
        return condlora_factors(self.W, self.linear_for_lora_A.weight, self.scaling * self.linear_for_lora_B.weight)

    def refresh(self) -> None:
        A, B = self.scaled_factors()
        self._per_layer = (A.unbind(0), B.unbind(0))  # unbind: one stacked gradient in backward, not L scatters

    def clear(self) -> None:
        self._per_layer = None

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """``(A_l, scaling * B_l)`` of one layer: from this forward's batch, or computed now outside a model forward."""
        if self._per_layer is None:
            A, B = self.scaled_factors()
            return A[index], B[index]
        return self._per_layer[0][index], self._per_layer[1][index]


class CondLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus its layer's CondLoRA update: ``base(x) + scaling * B_l (A_l x)``.

    The second product and the sum are one ``addmm`` into the base output (no ``(tokens, d)`` temporary, no
    separate scaling pass): per layer, the only work beyond the base layer is ``x A_l^T`` and that ``addmm``.
    """

    _shared: _SharedTheta  # set with object.__setattr__ in __init__ (declared for type checkers)

    def __init__(self, base_layer: nn.Linear, shared: _SharedTheta, index: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        object.__setattr__(self, "_shared", shared)  # a plain reference: the thetas are owned by CondLoraModel

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        A, B = self._shared.layer(self.index)  # (r, d_in), scaling * (d_out, r)
        h = x if self.dropout is None else self.dropout(x)
        if h.dtype != A.dtype:
            h = h.to(A.dtype)
        z = functional.linear(h, A)  # (..., r)
        if result.dtype != z.dtype or not result.is_contiguous():
            return result + functional.linear(z, B).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), z.reshape(-1, z.shape[-1]), B.mT)
        return out.view(result.shape)

    def extra_repr(self) -> str:
        return f"layer={self.index}, scaling={self.scaling}"


class CondLoraModel(nn.Module):
    """A ``transformers`` (or any ``nn.Module``) model with CondLoRA on its target modules.

    Every ``nn.Linear`` whose name is a target or ends with ``"." + target`` is wrapped; all of them that share
    the target's last name component (``query``) share one ``theta_A``, ``theta_B``, as in the authors' code.
    All other parameters are frozen, except those of ``modules_to_save``. Call it like the wrapped model.

    Attributes
    ----------
    model : nn.Module
        The wrapped model (its target modules replaced by :class:`CondLoraLinear`); its other attributes
        (``config``, ``generate``) are reachable on the wrapper.
    condlora_config : CondLoraConfig
    condlora : nn.ModuleDict
        Theta key (``query``) -> the shared pair (``linear_for_lora_A``/``B``) and the stacked base weights.
    layer_names : dict
        Theta key -> module names of its layers, in the order of the stacked factors.
    modules_to_save : list of str
        Names of the fully trained modules (e.g. ``classifier``).
    """

    def __init__(self, model: nn.Module, config: CondLoraConfig) -> None:
        super().__init__()
        config.validate()
        self.condlora_config = config
        self.model = model
        targets = _find_targets(model, config.target_modules)
        heads = _find_modules_to_save(model, config)
        for p in model.parameters():
            p.requires_grad_(False)
        self.condlora = nn.ModuleDict()
        self.layer_names: dict[str, list[str]] = {}
        modules = dict(model.named_modules())  # before any replacement
        for key, names in targets.items():
            W = torch.stack([modules[n].weight.detach() for n in names])
            shared = _SharedTheta(W, config.r, config.scaling)
            self.condlora[key] = shared
            self.layer_names[key] = names
            for index, name in enumerate(names):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                wrapped = CondLoraLinear(modules[name], shared, index, config.scaling, config.lora_dropout)
                setattr(parent, child, wrapped)
        self.modules_to_save = heads
        self._merged = False
        for name in heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._hooks = [
            model.register_forward_pre_hook(self._refresh),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped model (``config``, ``generate``, ...), as PEFT's wrappers forward them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def _refresh(self, *_: Any) -> None:
        if not self.merged:
            for shared in self._shared_thetas().values():
                shared.refresh()

    def _clear(self, *_: Any) -> None:
        for shared in self._shared_thetas().values():
            shared.clear()

    # -- inspection -------------------------------------------------------------------------------------------
    def _shared_thetas(self) -> Mapping[str, _SharedTheta]:
        """:attr:`condlora` as typed: every entry is a :class:`_SharedTheta` (``ModuleDict`` yields ``nn.Module``)."""
        return cast("Mapping[str, _SharedTheta]", self.condlora)

    def _wrapped(self) -> Iterator[CondLoraLinear]:
        return (m for m in self.model.modules() if isinstance(m, CondLoraLinear))

    @property
    def merged(self) -> bool:
        """True between :meth:`merge` and :meth:`unmerge` (a flag: no walk over the modules at every forward)."""
        return self._merged

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self, *, include_modules_to_save: bool = False) -> int:
        """Trainable parameters: the thetas alone (the paper's Table 4 count), or with the saved heads."""
        count = sum(p.numel() for p in self.condlora.parameters())
        if include_modules_to_save:
            count += sum(p.numel() for n in self.modules_to_save for p in self.model.get_submodule(n).parameters())
        return count

    @torch.no_grad()
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Theta key -> ``A`` ``(L, r, d)``, ``B`` ``(L, d, r)`` of every layer (detached; order of ``layer_names``)."""
        return {key: shared.factors() for key, shared in self._shared_thetas().items()}

    def thetas(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Theta key -> ``(theta_A, theta_B)``, each ``(r, d)`` (detached)."""
        return {
            key: (s.linear_for_lora_A.weight.detach(), s.linear_for_lora_B.weight.detach())
            for key, s in self._shared_thetas().items()
        }

    def modules_to_save_state(self) -> dict[str, Tensor]:
        """The saved heads' tensors under PEFT's keys (``base_model.model.classifier.weight``)."""
        out = {}
        for name in self.modules_to_save:
            for k, v in self.model.get_submodule(name).state_dict().items():
                out[f"{PEFT_PREFIX}{name}.{k}"] = v.detach()
        return out

    # -- merging ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Add ``dW_l = scaling * B_l A_l`` to every target weight (inference at the base model's cost)."""
        if self.merged:
            return
        for shared in self._shared_thetas().values():
            A, B = shared.factors()
            dW = self.condlora_config.scaling * (B @ A)  # (L, d, d)
            for m in self._wrapped():
                if m._shared is shared:
                    w = m.base_layer.weight
                    w.copy_((shared.W[m.index] + dW[m.index]).to(w.dtype))
                    m.merged = True
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weights exactly (from the stacked copy)."""
        for m in self._wrapped():
            if m.merged:
                m.base_layer.weight.copy_(m._shared.W[m.index])
                m.merged = False
        self._merged = False

    def merge_and_unload(self) -> nn.Module:
        """Merge, put plain ``nn.Linear`` modules back, remove the hooks; return the wrapped model."""
        self.merge()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, CondLoraLinear):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.base_layer)
        for h in self._hooks:
            h.remove()
        return self.model

    # -- files ------------------------------------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        c = self.condlora_config
        return condlora_config(
            r=c.r,
            lora_alpha=c.lora_alpha,
            target_modules=c.target_modules,
            modules_to_save=self.modules_to_save or None,
            base_model_name_or_path=c.base_model_name_or_path or getattr(self.model, "name_or_path", None) or None,
            task_type=c.task_type,
            lora_dropout=c.lora_dropout,
        )

    def save_pretrained(
        self,
        out_dir: str | os.PathLike[str],
        *,
        safe_serialization: bool = True,
        extra_files: Mapping[str, Writer] | None = None,
        replace: bool = False,
    ) -> list[Path]:
        """Write the adapter in the authors' format, atomically (``io.condlora.write_condlora_adapter``);
        ``replace=True`` overwrites a folder loralens wrote before (a checkpoint saved again)."""
        return write_condlora_adapter(
            out_dir,
            self.adapter_config(),
            self.thetas(),
            self.modules_to_save_state(),
            safe_serialization=safe_serialization,
            extra_files=extra_files,
            replace=replace,
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike[str] | CondLoraAdapter, *, is_trainable: bool = False
    ) -> CondLoraModel:
        """Wrap ``model`` with the CondLoRA adapter in ``path`` (authors' format, safetensors or ``.bin``).

        Raises
        ------
        CheckpointError, ModelMismatchError
            From the loader, or when a theta or a saved head does not fit ``model``.
        """
        adapter = path if isinstance(path, CondLoraAdapter) else load_condlora_adapter(path)
        c = adapter.config
        config = CondLoraConfig(
            r=adapter.r,
            lora_alpha=adapter.lora_alpha,
            target_modules=tuple(adapter.target_modules),
            modules_to_save=tuple(adapter.saved_modules),
            lora_dropout=float(c.get("lora_dropout") or 0.0),
            task_type=c.get("task_type"),
            base_model_name_or_path=adapter.base_model_name_or_path,
        )
        wrapper = cls(model, config)
        wrapper._load(adapter)
        if not is_trainable:
            for p in wrapper.parameters():
                p.requires_grad_(False)
            wrapper.eval()
        return wrapper

    @torch.no_grad()
    def _load(self, adapter: CondLoraAdapter) -> None:
        for key, shared in self._shared_thetas().items():
            for theta, stored in zip(
                (shared.linear_for_lora_A.weight, shared.linear_for_lora_B.weight), adapter.thetas[key], strict=True
            ):
                if theta.shape != stored.shape:
                    raise ModelMismatchError(
                        f"{adapter.weights_file}: theta of {key!r} is {tuple(stored.shape)} but the model's {key} "
                        f"needs {tuple(theta.shape)}: the adapter was trained on another base"
                    )
                theta.copy_(stored)
        state = self.model.state_dict()
        for key, value in adapter.modules_to_save.items():
            name = key[len(PEFT_PREFIX) :]
            if name not in state:
                raise ModelMismatchError(
                    f"{adapter.weights_file}: saved tensor {key!r} has no place in the model "
                    f"({type(self.model).__name__}); is the adapter for another model class?"
                )
            if state[name].shape != value.shape:
                raise ModelMismatchError(
                    f"{adapter.weights_file}: saved tensor {key!r} is {tuple(value.shape)} but the model's {name!r} is "
                    f"{tuple(state[name].shape)} (another num_labels?)"
                )
            state[name].copy_(value)


def check_square_targets(base: BaseCheckpoint, targets: Sequence[str]) -> None:
    """Refuse CondLoRA targets whose base weights are not square, from the checkpoint's tensor shapes alone (its
    safetensors headers: nothing is read, no model is loaded), naming each target as given. A target matches the
    2-D ``<target>.weight`` tensors whose name equals it or ends with ``"." + target``, as in the model; one that
    matches none is left to the model's own check.

    Raises
    ------
    ShapeError
        A target whose weights are not square (``option="targets"``).
    """
    for target in targets:
        keys = [k for k in base.keys if k == f"{target}.weight" or k.endswith(f".{target}.weight")]
        bad = sorted(
            {base.shapes[k] for k in keys if len(base.shapes[k]) == 2 and base.shapes[k][0] != base.shapes[k][1]}
        )
        if bad:
            raise ShapeError(_not_square(target, bad, f"{base.root}: "), option="targets")


def _not_square(target: str, shapes: Sequence[tuple[int, ...]], where: str = "") -> str:
    sizes = " and ".join(f"{s[0]} x {s[1]}" for s in shapes)
    return (
        f"{where}CondLoRA needs square weights, but target {target!r} is {sizes} (d_out x d_in): A_l = theta_A W_l^T "
        "is only (r, d_in) when d_out = d_in (the paper's stated limitation); choose square modules such as "
        "query and value"
    )


def _find_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, list[str]]:
    """Theta key -> names of the ``nn.Linear`` modules it adapts, in model order; strict about shapes."""
    found: dict[str, list[str]] = {}
    given: dict[str, str] = {}  # theta key -> the target as the caller named it
    for name, module in model.named_modules():
        hits = [t for t in targets if name == t or name.endswith("." + t)]
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            raise ShapeError(
                f"CondLoRA target {hits[0]!r} matches {name!r}, a {type(module).__name__}; only nn.Linear is supported"
            )
        found.setdefault(theta_key(hits[0]), []).append(name)
        given.setdefault(theta_key(hits[0]), hits[0])
    missing = [t for t in targets if theta_key(t) not in found]
    if missing:
        raise ModelMismatchError(f"CondLoRA target modules {missing} match no module of {type(model).__name__}")
    modules = dict(model.named_modules())
    for key, names in found.items():
        shapes = {tuple(modules[n].weight.shape) for n in names}
        bad = [s for s in shapes if s[0] != s[1]]
        if bad:
            raise ShapeError(_not_square(given[key], sorted(bad)), option="targets")
        if len(shapes) > 1:
            raise ShapeError(f"CondLoRA target {given[key]!r} has layers of different shapes {sorted(shapes)}")
    return found


def _find_modules_to_save(model: nn.Module, config: CondLoraConfig) -> list[str]:
    wanted = config.modules_to_save
    if wanted is None:
        wanted = _SEQ_CLS_HEADS if config.task_type == "SEQ_CLS" else ()
        strict = False
    else:
        strict = True
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for w in wanted:
        hits = [n for n in names if n == w or n.endswith("." + w)]
        if not hits and strict:
            raise ModelMismatchError(f"modules_to_save {w!r} matches no module of {type(model).__name__}")
        # the outermost match only: its parameters include those of any inner match
        found.extend(h for h in hits if not any(h.startswith(o + ".") for o in hits))
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------- export


_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def export_as_lora(
    base: str | os.PathLike[str],
    condlora: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    extra_files: Mapping[str, Writer] | None = None,
    replace: bool = False,
) -> list[Path]:
    """Materialise a CondLoRA adapter as a standard PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Every layer gets ``lora_A.weight = A_l`` ``(r, d)`` and ``lora_B.weight = B_l`` ``(d, r)`` (computed in float64
    from the base weights, stored as the thetas' dtype), with the same ``r`` and ``lora_alpha``, so the LoRA model
    computes the same function; the ``modules_to_save`` tensors are copied. Keys follow the module names of the
    model class of the adapter's ``task_type`` (``AutoModelForSequenceClassification`` for ``SEQ_CLS``), built on the
    meta device from the base's ``config.json`` (no weights are loaded by transformers).

    Returns the written paths (``adapter_config.json``, ``adapter_model.safetensors``, extras).
    """
    base_ckpt = open_base(base)
    adapter = load_condlora_adapter(condlora)
    names = _model_linear_names(base_ckpt.root, adapter.config.get("task_type"))
    tensors = lora_tensors_from_condlora(base_ckpt, adapter, names)
    config = lora_config_from_condlora(adapter)
    return write_lora_adapter(out_dir, config, tensors, extra_files, replace=replace)


def _model_linear_names(root: Path, task_type: str | None) -> list[str]:
    """Names of the ``nn.Linear`` modules of the model PEFT would wrap, from ``config.json`` on the meta device."""
    try:
        import transformers
    except ImportError as e:
        raise LoralensError(f"export needs transformers ({e}); install it with `pip install loralens[train]`") from e
    folder = root if root.is_dir() else root.parent
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json beside the base weights; export needs the model's config")
    auto = getattr(transformers, _AUTO_CLASSES.get(str(task_type), "AutoModel"))
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = auto.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

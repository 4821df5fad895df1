"""PEFT LoRA adapter folders -> typed stacks of factors per module type, and their base weights.

A folder written by PEFT's ``save_pretrained`` holds ``adapter_config.json`` and
``adapter_model.safetensors`` (or the older pickled ``adapter_model.bin``, read with
``weights_only=True``). Factors are paired by parsed key, never by order or shape:
``<module>.lora_A.weight`` (r, d_in) with ``<module>.lora_B.weight`` (d_out, r).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loralens.errors import (
    CheckpointError,
    FanInFanOutWarning,
    InputPathError,
    LoralensError,
    ModelMismatchError,
    UnanalysedTensorsWarning,
)
from loralens.io.base_weights import BaseCheckpoint, check_not_complex, check_weights_file
from loralens.io.files import (
    check_finite,
    check_float,
    read_json,
    read_pickle_state_dict,
    read_safetensors,
    require_regular_file,
    safetensors_shapes,
)
from loralens.io.hub import resolve_adapter
from loralens.io.keys import (
    PEFT_PREFIX,
    ModulePath,
    match_base_weights,
    module_type_names,
    parse_adapter_key,
    parse_module_path,
    peft_pattern_value,
)
from loralens.io.peft_config import check_lora_config

__all__ = [
    "AdapterModule",
    "LoraAdapter",
    "load_lora_adapter",
    "ModuleIndex",
    "LoraAdapterIndex",
    "LayerFactors",
    "index_lora_adapter",
    "read_layer_factors",
    "read_base_weights",
    "base_weight_matrices",
    "stores_transposed",
    "conv1d_module",
]

CONFIG_NAME = "adapter_config.json"
_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: transformers models whose projections are GPT-2's ``Conv1D`` (weight stored (in, out)), and the names those
#: modules have there; every other module of every model is an ``nn.Linear`` (stored (out, in)).
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"})
_CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


class _StatedConfig:
    """What ``adapter_config.json`` states, for :class:`LoraAdapter` and :class:`LoraAdapterIndex` alike."""

    config: dict[str, Any]

    @property
    def fan_in_fan_out(self) -> bool:
        """The flag as adapter_config.json states it (True for GPT-2 style ``Conv1D`` bases, which store weights
        as (in, out)); :func:`stores_transposed` decides, with PEFT's rule, whether a base weight is transposed."""
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None


@dataclass(frozen=True)
class AdapterModule:
    """One module type of an adapter (e.g. every layer's ``query``), stacked over its layers.

    Attributes
    ----------
    name : str
        Short unique name (``query``, ``q_proj``).
    paths : tuple of ModulePath
        Per layer, in increasing layer order.
    A : Tensor
        ``(L, r, d_in)``, as stored (PEFT ``lora_A.weight``).
    B : Tensor
        ``(L, d_out, r)``. Where ``rank_pattern`` gives layers different ranks, ``r`` is the largest
        and lower-rank layers are padded with zero rows of A / columns of B, which changes neither
        ``B @ A`` nor the top ``ranks[l]`` singular subspaces.
    ranks : tuple of int
        True rank per layer.
    scaling : tuple of float
        ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) per layer; ``dW = scaling * B @ A``.
    magnitude : Tensor or None
        ``(L, d_out)`` DoRA magnitude vectors, when the adapter is a DoRA adapter.
    """

    name: str
    paths: tuple[ModulePath, ...]
    A: Tensor
    B: Tensor
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]
    magnitude: Tensor | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(p.layer for p in self.paths)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the base weight this module adapts."""
        return self.B.shape[1], self.A.shape[2]


@dataclass(frozen=True)
class LoraAdapter(_StatedConfig):
    """A loaded PEFT LoRA adapter.

    Attributes
    ----------
    path : Path
        The adapter folder.
    weights_file : Path
        The tensor file read.
    config : dict
        ``adapter_config.json`` as stored.
    modules : dict
        Module name -> :class:`AdapterModule`, in a stable order.
    ignored_keys : tuple of str
        Stored tensors that are not LoRA factors (``modules_to_save`` heads, embedding LoRA, ...).
    """

    path: Path
    weights_file: Path
    config: dict[str, Any]
    modules: dict[str, AdapterModule]
    ignored_keys: tuple[str, ...] = ()

    @property
    def is_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


@dataclass(frozen=True)
class ModuleIndex:
    """One module type of an adapter as :class:`AdapterModule` describes it, without its factors: where to read them.

    Attributes
    ----------
    name : str
        Short unique name (``query``, ``q_proj``).
    paths : tuple of ModulePath
        Per layer, in increasing layer order.
    ranks : tuple of int
        True rank ``r_l`` per layer.
    scaling : tuple of float
        ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) per layer.
    shape : tuple of int
        ``(d_out, d_in)`` of the base weight this module adapts.
    keys : tuple of mapping
        Per layer, factor (``"A"``, ``"B"``, ``"magnitude"`` for DoRA) -> its key in the weights file.
    """

    name: str
    paths: tuple[ModulePath, ...]
    ranks: tuple[int, ...]
    scaling: tuple[float, ...]
    shape: tuple[int, int]
    keys: tuple[Mapping[str, str], ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(p.layer for p in self.paths)

    @property
    def is_dora(self) -> bool:
        return any("magnitude" in k for k in self.keys)


@dataclass(frozen=True)
class LoraAdapterIndex(_StatedConfig):
    """A PEFT LoRA adapter opened without reading its factors (:func:`index_lora_adapter`); read one module-layer's
    factors with :func:`read_layer_factors`.

    Attributes
    ----------
    path, weights_file, config, ignored_keys
        As in :class:`LoraAdapter`.
    modules : dict
        Module name -> :class:`ModuleIndex`, in the order of :class:`LoraAdapter`'s.
    tensors : dict or None
        The factors, held in memory, when the weights file is a pickled ``.bin`` (which cannot be read a tensor at
        a time); None for safetensors, whose tensors are read on demand.
    """

    path: Path
    weights_file: Path
    config: dict[str, Any]
    modules: dict[str, ModuleIndex]
    ignored_keys: tuple[str, ...] = ()
    tensors: dict[str, Tensor] | None = None

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())


@dataclass(frozen=True)
class LayerFactors:
    """One layer of one module of an adapter, as stored (not padded).

    Attributes
    ----------
    A : Tensor
        ``(r, d_in)``.
    B : Tensor
        ``(d_out, r)``.
    magnitude : Tensor or None
        ``(d_out,)`` DoRA magnitude vector.
    """

    A: Tensor
    B: Tensor
    magnitude: Tensor | None = None


def load_lora_adapter(
    path: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> LoraAdapter:
    """Load a PEFT LoRA adapter folder, or the hub repo ``org/name@revision`` (:mod:`loralens.io.hub`; ``offline``
    and ``allow_pickle_download`` as there).

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``layers_to_transform`` and ``fan_in_fan_out``; records DoRA magnitudes.

    Raises
    ------
    InputPathError
        Missing folder, config or weights file.
    CheckpointError
        Invalid config, unknown ``peft_type``, corrupt tensors, unpaired factors, ranks that
        disagree with the config, layers outside ``layers_to_transform``.
    """
    folder, config, weights_file = _open_adapter(path, offline, allow_pickle_download)
    tensors = (
        read_safetensors(weights_file)
        if weights_file.suffix == ".safetensors"
        else read_pickle_state_dict(weights_file)
    )
    _check_tensor_kinds(tensors, weights_file)
    check_finite(tensors, weights_file)
    index, ignored = _index_modules(tensors, config, folder, weights_file)
    modules = {name: _stack_module(mod, tensors, weights_file) for name, mod in index.items()}
    _warn_unanalysed(ignored, config, weights_file)
    return LoraAdapter(folder, weights_file, config, modules, tuple(sorted(ignored)))


def index_lora_adapter(
    path: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> LoraAdapterIndex:
    """Open a PEFT LoRA adapter as :func:`load_lora_adapter` does, reading its config and the safetensors header
    only; :func:`read_layer_factors` then reads one module-layer's factors at a time.

    Every check :func:`load_lora_adapter` makes from keys, shapes and dtypes is made here, with the same errors
    (pairing, ranks against the config, shapes across layers, ``layers_to_transform``, integer or 8-bit dtypes);
    the checks that need the numbers (NaN/Inf, an overflowing scaling) are made as each layer is read. A pickled
    ``adapter_model.bin`` cannot be read a tensor at a time: it is read whole, checked as by
    :func:`load_lora_adapter`, and its factors are held in :attr:`LoraAdapterIndex.tensors`.

    Raises
    ------
    InputPathError, CheckpointError
        As :func:`load_lora_adapter`.
    """
    folder, config, weights_file = _open_adapter(path, offline, allow_pickle_download)
    pickled = weights_file.suffix != ".safetensors"
    tensors = read_pickle_state_dict(weights_file) if pickled else _header_tensors(weights_file)
    _check_tensor_kinds(tensors, weights_file)
    if pickled:
        check_finite(tensors, weights_file)
    modules, ignored = _index_modules(tensors, config, folder, weights_file)
    held = None
    if pickled:  # read whole anyway: keep only the factors, checked as load_lora_adapter checks them
        held = {key: tensors[key] for mod in modules.values() for keys in mod.keys for key in keys.values()}
        for mod in modules.values():
            for position in range(len(mod.paths)):
                _layer_factors(mod, position, held, weights_file)
    _warn_unanalysed(ignored, config, weights_file)
    return LoraAdapterIndex(folder, weights_file, config, modules, tuple(sorted(ignored)), held)


def read_layer_factors(adapter: LoraAdapterIndex, module: str, position: int) -> LayerFactors:
    """One layer's factors of ``module``: ``A`` ``(r_l, d_in)``, ``B`` ``(d_out, r_l)`` (and the DoRA magnitude
    ``(d_out,)``), read from the weights file (only these tensors), as stored.

    ``position`` is the layer's position in ``adapter.modules[module].paths`` (not the model layer). The tensors
    are checked as :func:`load_lora_adapter` checks them (finite, a scaling that cannot overflow) and against the
    shapes indexed (a file rewritten since is refused).

    Raises
    ------
    LoralensError
        An unknown module or a position outside its layers.
    CheckpointError, NonFiniteError
        Damaged tensors, or a weights file changed since it was indexed.
    """
    if module not in adapter.modules:
        raise LoralensError(
            f"{adapter.path}: no module {module!r} (it has {', '.join(adapter.modules)})", option="modules"
        )
    mod = adapter.modules[module]
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(mod.paths):
        raise LoralensError(f"{adapter.path}: module {module!r} has {len(mod.paths)} layers, no position {position!r}")
    keys = mod.keys[position]
    source = adapter.weights_file
    if adapter.tensors is not None:
        return _layer_factors(mod, position, adapter.tensors, source)
    tensors = read_safetensors(source, keys.values())
    _check_tensor_kinds(tensors, source)
    check_finite(tensors, source)
    r, (d_out, d_in) = mod.ranks[position], mod.shape
    expected = {"A": (r, d_in), "B": (d_out, r)}
    for factor, shape in expected.items():
        if tuple(tensors[keys[factor]].shape) != shape:
            raise CheckpointError(
                f"{source}: {keys[factor]!r} is {tuple(tensors[keys[factor]].shape)}, but {shape} when the adapter "
                "was indexed: the file changed since; open the adapter again"
            )
    return _layer_factors(mod, position, tensors, source)


def _open_adapter(
    path: str | os.PathLike[str], offline: bool | None, allow_pickle_download: bool | None
) -> tuple[Path, dict[str, Any], Path]:
    """The adapter's folder, its checked ``adapter_config.json`` and its weights file (not read yet)."""
    folder = adapter_folder(resolve_adapter(path, offline=offline, allow_pickle_download=allow_pickle_download))
    config = read_json(folder / CONFIG_NAME)
    check_lora_config(config, folder / CONFIG_NAME)
    _check_layer_replication(config, folder / CONFIG_NAME)
    weights_file = adapter_weights_file(folder)
    check_weights_file(weights_file)
    return folder, config, weights_file


#: safetensors header dtypes -> torch dtypes (the header's names, as ``safe_open(...).get_slice(k).get_dtype()``).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}


def _header_tensors(weights_file: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a ``meta`` tensor (its shape and dtype, no data), from the header.

    A dtype missing from :data:`_SAFETENSORS_DTYPES` is read for real, so the checks name it as for a loaded file.
    """
    specs = safetensors_shapes(weights_file)
    unknown = [key for key, (_, dtype) in specs.items() if dtype not in _SAFETENSORS_DTYPES]
    read = read_safetensors(weights_file, unknown) if unknown else {}
    return {
        key: read[key] if key in read else torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")
        for key, (shape, dtype) in specs.items()
    }


def _check_tensor_kinds(tensors: Mapping[str, Tensor], weights_file: Path) -> None:
    """Refuse an empty adapter file and complex, integer or 8-bit tensors (dtypes only: ``meta`` tensors do)."""
    if not tensors:
        raise CheckpointError(f"{weights_file}: the adapter holds no tensors")
    check_not_complex(dict(tensors), weights_file)
    check_float(dict(tensors), weights_file)


def _index_modules(
    tensors: Mapping[str, Tensor], config: dict[str, Any], folder: Path, weights_file: Path
) -> tuple[dict[str, ModuleIndex], list[str]]:
    """The adapter's modules (keys paired by parsed name, shapes and ranks checked) and the keys left out.

    ``tensors`` may be ``meta`` tensors: only keys, shapes and dtypes are used.
    """
    factors: dict[ModulePath, dict[str, str]] = {}
    ignored = []
    for key in tensors:
        parsed = parse_adapter_key(key)
        module = parse_module_path(parsed[0]) if parsed else None
        if parsed is None or module is None:
            ignored.append(key)
            continue
        factors.setdefault(module, {})[parsed[1]] = key
    if not factors:
        named = sorted({m.group(1) for k in tensors if (m := _NAMED_FACTOR.search(k))})
        if named:  # model.state_dict() of a PeftModel keeps the adapter name; save_pretrained strips it
            raise CheckpointError(
                f"{weights_file}: the LoRA keys carry an adapter name ({', '.join(map(repr, named[:3]))}, e.g. "
                "'lora_A.default.weight'): a model.state_dict(), not what PEFT saves; re-save the adapter with "
                "model.save_pretrained(folder)"
            )
        raise CheckpointError(
            f"{weights_file}: no LoRA factors (keys '<module>.lora_A.weight') among {len(tensors)} tensors"
        )

    by_type: dict[tuple[str, str, str], list[ModulePath]] = {}
    for module in sorted(factors):
        by_type.setdefault(module.module_type, []).append(module)
    names = module_type_names(by_type)
    modules = {
        names[t]: _index_module(names[t], paths, factors, tensors, config, weights_file)
        for t, paths in sorted(by_type.items(), key=lambda item: names[item[0]])
    }
    _check_layers_to_transform(modules, config, folder / CONFIG_NAME)
    return modules, ignored


#: The heads PEFT itself adds to ``modules_to_save`` for sequence classification: saved alone, they warn nothing.
_TASK_HEADS = ("classifier", "score")


def _warn_unanalysed(ignored: Sequence[str], config: dict[str, Any], weights_file: Path) -> None:
    """One :class:`UnanalysedTensorsWarning` naming the modules whose stored tensors the analyses leave out
    (``ignored``: keys that are not LoRA factors inside numbered layers). A classification head that PEFT saves
    (``modules_to_save`` ``classifier`` / ``score``, outside the layers) warns nothing on its own."""
    saved = [str(m) for m in config.get("modules_to_save") or () if isinstance(m, str)]
    lora_outside: set[str] = set()
    in_layers: set[str] = set()
    heads: set[str] = set()
    other: set[str] = set()
    for key in ignored:
        parsed = parse_adapter_key(key)
        module = (parsed[0] if parsed else key.rpartition(".")[0] or key).removeprefix(PEFT_PREFIX)
        if parsed is not None:
            lora_outside.add(module)
            continue
        owner = next((m for m in saved if f".{m}." in f".{module}."), None)
        if owner is None:
            other.add(module)
        elif parse_module_path(module) is not None:
            in_layers.add(module)
        else:
            heads.add(module if owner not in _TASK_HEADS else owner)
    if not (lora_outside or in_layers or other or heads - set(_TASK_HEADS)):
        return
    parts = []
    if lora_outside:
        parts.append(f"LoRA factors of {', '.join(sorted(lora_outside))} (outside the numbered layers)")
    if in_layers:
        parts.append(
            f"{', '.join(sorted(in_layers))} saved in full (modules_to_save) inside the layers: the adapted model "
            "uses these trained copies, the analyses the base's weights"
        )
    if heads:
        parts.append(f"{', '.join(sorted(heads))} saved in full (modules_to_save; trained copies, not LoRA updates)")
    if other:
        parts.append(f"other tensors of {', '.join(sorted(other))}")
    warnings.warn(
        UnanalysedTensorsWarning(
            f"{weights_file}: {len(ignored)} stored tensors are not analysed: {'; '.join(parts)}; the analyses cover "
            "the LoRA factors inside the numbered layers"
        ),
        stacklevel=3,
    )


def read_base_weights(
    base: BaseCheckpoint, adapter: LoraAdapter, module: str, layers: slice = slice(None)
) -> tuple[Tensor, tuple[str, ...]]:
    """The base weights a module of the adapter modifies, stacked as ``(L, d_out, d_in)``.

    Weights are matched by layer index and module path (:func:`~loralens.io.keys.match_base_weights`),
    transposed from ``Conv1D``'s (in, out) where :func:`stores_transposed` says so, and checked
    against the factors' shapes. ``layers`` selects a batch of the module's layers, so a large model
    can be processed a few layers at a time. Returns the weights (as stored dtype, on CPU) and their keys.

    Raises
    ------
    ModelMismatchError
        The base lacks the module, or its weight does not fit the adapter's factors.
    """
    matrices, keys = base_weight_matrices(base, adapter, module, layers)
    return torch.stack(matrices), keys


def base_weight_matrices(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    module: str,
    layers: slice | Sequence[int] = slice(None),
    *,
    check_finite: bool = True,
) -> tuple[list[Tensor], tuple[str, ...]]:
    """As :func:`read_base_weights`, unstacked: one ``(d_out, d_in)`` tensor per layer, memory-mapped.

    Nothing is copied: the tensors view the checkpoint's memory-mapped bytes (``.mT`` views for
    ``fan_in_fan_out``), which a solver copies straight into its working buffer. ``layers`` is a slice
    of, or a list of positions in, the module's stack of layers. ``check_finite=False`` leaves the NaN/Inf
    scan to the caller (see :meth:`BaseCheckpoint.read`).
    """
    mod = adapter.modules[module]
    paths = mod.paths[layers] if isinstance(layers, slice) else tuple(mod.paths[k] for k in layers)
    keys = match_base_weights(paths, base.keys)
    weights = base.read([keys[p] for p in paths], check_finite=check_finite)
    d_out, d_in = mod.shape
    transposed = stores_transposed(base, adapter, module)
    matrices = []
    for p in paths:
        W = weights[keys[p]]
        if transposed:
            W = W.mT
        if tuple(W.shape) != (d_out, d_in):
            hint = " (or fan_in_fan_out is wrong in adapter_config.json)" if W.shape == (d_in, d_out) else ""
            raise ModelMismatchError(
                f"{adapter.path}: module {module!r} layer {p.layer} has A (r, {d_in}) and B ({d_out}, r), but base "
                f"weight {keys[p]!r} in {base.root} is {tuple(W.shape)}: the adapter was trained on another base{hint}"
            )
        matrices.append(W)
    return matrices, tuple(keys[p] for p in paths)


def stores_transposed(base: BaseCheckpoint, adapter: LoraAdapter, module: str) -> bool:
    """Whether ``base`` stores the weights of the adapter's ``module`` as (in, out), by PEFT's own rule.

    PEFT (``tuners/lora/layer.py``, ``dispatch_default``) does not trust ``fan_in_fan_out``: on an ``nn.Linear``
    it warns and sets the flag to False, on a ``Conv1D`` to True. loralens has no module classes, only the base's
    ``config.json``; ``Conv1D`` exists only in the models of :data:`_CONV1D_MODEL_TYPES`, as the modules named in
    :data:`_CONV1D_MODULES`. Where the flag says otherwise, the layout wins and a
    :class:`~loralens.errors.FanInFanOutWarning` says so, once per base and adapter. Without a ``model_type``
    (no config.json beside the weights) the flag is all there is, and is followed.
    """
    stated = adapter.fan_in_fan_out
    model_type = (base.config or {}).get("model_type")
    if not isinstance(model_type, str):
        return stated
    conv1d = conv1d_module(model_type, adapter.modules[module].paths[0].tail)
    seen = ("fan_in_fan_out", str(adapter.path), str(stated))
    if conv1d != stated and seen not in base.warned:
        base.warned.add(seen)
        layout = "GPT-2 Conv1D, stored (in, out)" if conv1d else "nn.Linear, stored (out, in)"
        warnings.warn(
            f"{adapter.path / CONFIG_NAME}: fan_in_fan_out is {str(stated).lower()}, but {module!r} of a "
            f"{model_type!r} base is {layout}; the flag is ignored, as PEFT does when it loads the adapter",
            FanInFanOutWarning,
            stacklevel=3,
        )
    return conv1d


def conv1d_module(model_type: object, tail: str) -> bool:
    """Whether the module at ``tail`` (the path inside a layer, ``attn.c_attn``) of a ``model_type`` model is GPT-2's
    ``Conv1D``, whose weight is stored (in, out); every other module is an ``nn.Linear``, stored (out, in)."""
    return (
        isinstance(model_type, str) and model_type in _CONV1D_MODEL_TYPES and tail.rsplit(".", 1)[-1] in _CONV1D_MODULES
    )


def adapter_folder(
    path: Path, kind: str = "adapter", hint: str = "a PEFT adapter folder (save_pretrained output)"
) -> Path:
    """The folder of an adapter given as its folder or as one of its files; ``kind`` names it in messages
    (``"CondLoRA adapter"``) and ``hint`` says what a folder without a config was expected to be."""
    try:
        if not path.exists():
            raise InputPathError(f"{path}: no such {kind} folder")
        if path.is_file():
            if path.name in (CONFIG_NAME, *_WEIGHT_NAMES):
                return path.parent
            article = "an" if kind[:1].lower() in "aeiou" else "a"
            raise InputPathError(f"{path}: expected {article} {kind} folder (with {CONFIG_NAME}), got a file")
        if not (path / CONFIG_NAME).exists():
            raise InputPathError(f"{path}: no {CONFIG_NAME}; is this {hint}?")
        require_regular_file(path / CONFIG_NAME)
    except PermissionError as e:
        raise InputPathError(
            f"{path}: permission denied on {e.filename or path}: this user may not open the {kind} folder; give "
            "it read permission (chmod a+rX) or use a copy you own"
        ) from e
    return path


def adapter_weights_file(folder: Path) -> Path:
    """The adapter tensor file in ``folder``: safetensors when present, else the ``.bin`` pickle."""
    for name in _WEIGHT_NAMES:  # safetensors first: it cannot carry code
        if (folder / name).exists():
            return require_regular_file(folder / name)
    raise InputPathError(f"{folder}: no adapter weights ({' or '.join(_WEIGHT_NAMES)})")


def _index_module(
    name: str,
    paths: list[ModulePath],
    factors: dict[ModulePath, dict[str, str]],
    tensors: Mapping[str, Tensor],
    config: dict[str, Any],
    source: Path,
) -> ModuleIndex:
    """One module type's layers paired and checked from the factors' shapes (``factors``: path -> factor -> key)."""
    layers = [p.layer for p in paths]
    if len(set(layers)) != len(layers):
        raise CheckpointError(f"{source}: module {name!r} appears twice in one layer")
    keys: list[Mapping[str, str]] = []
    ranks, scaling = [], []
    shape: tuple[int, int] | None = None
    for p in paths:
        f = factors[p]
        if "A" not in f or "B" not in f:
            missing = "lora_A" if "A" not in f else "lora_B"
            raise CheckpointError(f"{source}: {p.dotted} has no {missing}.weight; the adapter file is incomplete")
        A, B = tensors[f["A"]], tensors[f["B"]]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"{source}: {p.dotted}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "are not (r, in) and (out, r)"
            )
        if shape is not None and (B.shape[0], A.shape[1]) != shape:
            raise CheckpointError(f"{source}: module {name!r} changes shape across layers at layer {p.layer}")
        shape = (B.shape[0], A.shape[1])
        if 0 in (*A.shape, *B.shape):  # rank 0 (lora_A (0, in)) or an empty layer: no adapter to analyse
            raise CheckpointError(
                f"{source}: {p.dotted}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are empty (rank 0 or "
                "a zero-size dimension); the adapter file is damaged or was saved empty: re-save it"
            )
        r = A.shape[0]
        expected_r = int(peft_pattern_value(config.get("rank_pattern"), p.dotted, config.get("r", r)))
        if r != expected_r:
            raise CheckpointError(f"{source}: {p.dotted} has rank {r} but adapter_config.json says {expected_r}")
        alpha = float(peft_pattern_value(config.get("alpha_pattern"), p.dotted, config.get("lora_alpha", r)))
        ranks.append(r)
        scaling.append(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
        keys.append({factor: f[factor] for factor in ("A", "B", "magnitude") if factor in f})
    with_magnitude = sum("magnitude" in k for k in keys)
    if 0 < with_magnitude < len(keys):
        raise CheckpointError(f"{source}: module {name!r} has DoRA magnitudes in some layers only")
    assert shape is not None  # paths is never empty: one entry per parsed key
    return ModuleIndex(name, tuple(paths), tuple(ranks), tuple(scaling), shape, tuple(keys))


def _layer_factors(module: ModuleIndex, position: int, tensors: Mapping[str, Tensor], source: Path) -> LayerFactors:
    """The factors of one indexed layer from ``tensors`` (read), with the scaling checked against overflow."""
    keys = module.keys[position]
    A, B = tensors[keys["A"]], tensors[keys["B"]]
    _check_update_size(module.scaling[position], A, B, module.paths[position], source)
    magnitude = tensors[keys["magnitude"]].reshape(-1) if "magnitude" in keys else None
    return LayerFactors(A, B, magnitude)


def _stack_module(module: ModuleIndex, tensors: Mapping[str, Tensor], source: Path) -> AdapterModule:
    """An indexed module's layers read from ``tensors`` and stacked, lower ranks zero-padded to the largest."""
    layers = [_layer_factors(module, position, tensors, source) for position in range(len(module.paths))]
    r_max = max(module.ranks)
    A_stack = torch.stack([torch.nn.functional.pad(f.A, (0, 0, 0, r_max - f.A.shape[0])) for f in layers])
    B_stack = torch.stack([torch.nn.functional.pad(f.B, (0, r_max - f.B.shape[1])) for f in layers])
    magnitude = torch.stack([f.magnitude for f in layers if f.magnitude is not None]) if module.is_dora else None
    return AdapterModule(module.name, module.paths, A_stack, B_stack, module.ranks, module.scaling, magnitude)


#: ``...query.lora_A.default.weight``: a factor key with PEFT's in-memory adapter name still in it.
_NAMED_FACTOR = re.compile(r"\.lora_[AB]\.([^.]+)\.weight$")


def _check_update_size(scale: float, A: Tensor, B: Tensor, path: ModulePath, source: Path) -> None:
    """Refuse a scaling that makes ``s B A`` overflow float32 (the smallest compute dtype): an absurd lora_alpha
    (1e308) would otherwise turn every update into inf/NaN and be reported as an untrained, all-zero adapter.
    ``|s| ||B||_F ||A||_F`` bounds ``||s B A||_F``, so nothing below the limit can overflow."""
    bound = abs(scale) * float(torch.linalg.matrix_norm(B.double())) * float(torch.linalg.matrix_norm(A.double()))
    if not bound < torch.finfo(torch.float32).max:
        raise CheckpointError(
            f"{source}: {path.dotted}: the scaling alpha / r = {scale:.3g} makes the update s B A overflow "
            f"(norm up to {bound:.3g}); fix lora_alpha (or alpha_pattern) in adapter_config.json"
        )


def _check_layer_replication(config: dict[str, Any], path: Path) -> None:
    """Refuse ``layer_replication``: PEFT then stacks copies of base layers into a deeper model, so the adapter's
    layer l is not the base's layer l, and pairing them by index would give numbers of the wrong weights."""
    value = config.get("layer_replication")
    if value:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise CheckpointError(
            f"{path}: layer_replication {shown} is not supported: the adapter's layers are copies of base layers "
            "in another order, so they cannot be paired with the base's layers by index"
        )


def _check_layers_to_transform(modules: dict[str, ModuleIndex], config: dict[str, Any], path: Path) -> None:
    allowed = config.get("layers_to_transform")
    if allowed is None:
        return
    allowed_set = {allowed} if isinstance(allowed, int) else set(allowed)
    for mod in modules.values():
        extra = sorted(set(mod.layers) - allowed_set)
        if extra:
            raise CheckpointError(
                f"{path}: module {mod.name!r} has layers {extra} outside layers_to_transform {sorted(allowed_set)}"
            )

"""CondLoRA adapter folders in the format of the authors' code (a PEFT fork): read, write, materialise, export.

A folder holds ``adapter_config.json`` (``"peft_type": "ConditionalLORA"``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ``use_x``, ``lora_x_scaling``, ...) and ``adapter_model.safetensors`` or
the pickled ``adapter_model.bin`` the authors' code writes (read with ``weights_only=True`` only; safetensors wins
when both exist). Tensor keys::

    <target>.linear_for_lora_A      (r, d_in)   theta_A of every layer's <target> module
    <target>.linear_for_lora_B      (r, d_in)   theta_B
    base_model.model.<module path>.<param>      modules_to_save (e.g. the classifier head), stored as trained

``<target>`` is the module's own attribute name (``query``), the key by which the authors share one pair of
matrices across all layers. Input-conditioned variants (``use_x`` other than ``"none"``) are not the paper's method
and are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loralens.core.condlora import condlora_factors
from loralens.errors import CheckpointError, ModelMismatchError
from loralens.io.adapters import AdapterModule, LoraAdapter, adapter_folder, adapter_weights_file
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.files import check_finite, check_float, read_json, read_pickle_state_dict, read_safetensors
from loralens.io.hub import resolve_adapter
from loralens.io.keys import PEFT_PREFIX, ModulePath, match_base_weights, module_type_names, parse_module_path
from loralens.io.outputs import Writer, json_writer, safetensors_writer, write_outputs

__all__ = [
    "CONDLORA_PEFT_TYPE",
    "CondLoraAdapter",
    "condlora_config",
    "condlora_tensors",
    "load_condlora_adapter",
    "write_condlora_adapter",
    "theta_key",
    "target_module_paths",
    "materialise_condlora",
    "lora_tensors_from_condlora",
    "lora_config_from_condlora",
    "write_lora_adapter",
]

#: ``peft_type`` of the authors' fork.
CONDLORA_PEFT_TYPE = "ConditionalLORA"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_FACTOR_SUFFIX = {"A": ".linear_for_lora_A", "B": ".linear_for_lora_B"}
_INPUT_CONDITIONED_KEY = "linear_for_lora_x"


@dataclass(frozen=True)
class CondLoraAdapter:
    """A loaded CondLoRA adapter.

    Attributes
    ----------
    path : Path
        The adapter folder.
    weights_file : Path
        The tensor file read.
    config : dict
        ``adapter_config.json`` as stored.
    thetas : dict
        Target name (``query``) -> ``(theta_A, theta_B)``, each ``(r, d_in)`` as stored.
    modules_to_save : dict
        Other stored tensors under their full key (``base_model.model.classifier.weight``).
    """

    path: Path
    weights_file: Path
    config: dict[str, Any]
    thetas: dict[str, tuple[Tensor, Tensor]]
    modules_to_save: dict[str, Tensor]

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.r))

    @property
    def scaling(self) -> float:
        """``lora_alpha / r``, as the authors' code scales ``B_l @ A_l``."""
        return self.lora_alpha / self.r

    @property
    def target_modules(self) -> list[str]:
        return list(self.config["target_modules"])

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def saved_modules(self) -> list[str]:
        """Modules whose tensors the file stores (``classifier``; ``classifier.dense``, ``classifier.out_proj``).

        The authors' configs may say ``modules_to_save: null`` (PEFT adds the head for ``SEQ_CLS`` by itself) or
        list heads a model lacks (``score``); the stored keys are what there is to load.
        """
        return sorted({k[len(PEFT_PREFIX) :].rsplit(".", 1)[0] for k in self.modules_to_save})


def theta_key(target: str) -> str:
    """The name a target's thetas are stored under: its last component (``attention.self.query`` -> ``query``)."""
    return target.rsplit(".", 1)[-1]


def condlora_config(
    *,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    lora_dropout: float = 0.0,
) -> dict[str, Any]:
    """``adapter_config.json`` in the authors' format (every field their ``ConditionalLoraConfig`` has)."""
    return {
        "peft_type": CONDLORA_PEFT_TYPE,
        "task_type": task_type,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "lora_dropout": float(lora_dropout),
        "target_modules": list(target_modules),
        "modules_to_save": list(modules_to_save) if modules_to_save is not None else None,
        "base_model_name_or_path": base_model_name_or_path,
        "use_x": "none",
        "lora_x_scaling": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }


def condlora_tensors(
    thetas: Mapping[str, tuple[Tensor, Tensor]], modules_to_save: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The tensors of an adapter file under the authors' keys (``query.linear_for_lora_A``, ...)."""
    out = {}
    for target, (theta_A, theta_B) in thetas.items():
        out[target + _FACTOR_SUFFIX["A"]] = theta_A
        out[target + _FACTOR_SUFFIX["B"]] = theta_B
    for key, value in (modules_to_save or {}).items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"modules_to_save tensor {key!r} must be named '{PEFT_PREFIX}<module path>.<param>'")
        out[key] = value
    return out


def write_condlora_adapter(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    thetas: Mapping[str, tuple[Tensor, Tensor]],
    modules_to_save: Mapping[str, Tensor] | None = None,
    *,
    safe_serialization: bool = True,
    extra_files: Mapping[str, Writer] | None = None,
    replace: bool = False,
) -> list[Path]:
    """Write a CondLoRA folder atomically: ``adapter_config.json`` + ``adapter_model.safetensors``
    (``adapter_model.bin``, a ``torch.save`` pickle as the authors' code writes, with ``safe_serialization=False``),
    plus ``extra_files`` (name -> writer) in the same atomic step. ``replace``: replace an existing folder that
    loralens wrote (see :func:`~loralens.io.outputs.write_outputs`)."""
    _check_config(dict(config), Path(out_dir) / CONFIG_NAME)
    tensors = {k: v.detach().cpu().contiguous() for k, v in condlora_tensors(thetas, modules_to_save).items()}
    files: dict[str, Writer] = {CONFIG_NAME: json_writer(dict(config))}
    if safe_serialization:
        files[SAFETENSORS_NAME] = safetensors_writer(tensors, {"format": "pt"})
    else:
        files[BIN_NAME] = lambda path: torch.save(tensors, path)
    files.update(extra_files or {})
    return write_outputs(Path(out_dir), files, replace=replace)


def load_condlora_adapter(
    path: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> CondLoraAdapter:
    """Load a CondLoRA folder written by the authors' code or by loralens, or the hub repo ``org/name@revision``
    (:mod:`loralens.io.hub`; ``offline`` and ``allow_pickle_download`` as there: the authors' code saves ``.bin``).

    Raises
    ------
    InputPathError
        Missing folder, config or weights file.
    CheckpointError
        Another ``peft_type``, ``use_x`` other than ``"none"``, corrupt or unsafe tensors (a pickle holding
        anything but tensors is refused without running it), missing or unexpected keys, shapes that disagree
        with ``r`` or with each other.
    """
    local = resolve_adapter(path, what="CondLoRA adapter", offline=offline, allow_pickle_download=allow_pickle_download)
    folder = adapter_folder(local, "CondLoRA adapter", "a CondLoRA adapter folder")
    config_path = folder / CONFIG_NAME
    config = read_json(config_path)
    _check_config(config, config_path)
    weights_file = adapter_weights_file(folder)
    tensors = (
        read_safetensors(weights_file)
        if weights_file.suffix == ".safetensors"
        else read_pickle_state_dict(weights_file)
    )
    if not tensors:
        raise CheckpointError(f"{weights_file}: the adapter holds no tensors")
    for key, t in tensors.items():  # float8 passes check_float, but torch.isfinite is not implemented for it
        if t.is_floating_point() and t.dtype.itemsize == 1:
            raise CheckpointError(
                f"{weights_file}: tensor {key!r} has dtype {t.dtype}; quantized weights must be dequantized first"
            )
    check_float(tensors, weights_file)
    check_finite(tensors, weights_file)
    thetas, extra = _split_tensors(tensors, config, weights_file)
    return CondLoraAdapter(folder, weights_file, config, thetas, extra)


def target_module_paths(
    targets: Sequence[str], names: Iterable[str], where: str | os.PathLike[str] = "the adapter"
) -> dict[str, dict[tuple[str, str, str], list[ModulePath]]]:
    """Which of ``names`` (dotted module paths) each of ``targets`` modifies.

    A name matches a target ``t`` when it equals ``t`` or ends with ``"." + t``, as PEFT matches ``target_modules``;
    only names inside a numbered layer count. Returns ``{theta key: {module type: [ModulePath per layer, sorted]}}``
    (the theta key is the target's last component, see :func:`theta_key`).

    Raises
    ------
    ModelMismatchError
        A target that matches nothing (``where`` names the adapter or base in the message).
    """
    parsed = [p for p in (parse_module_path(n) for n in names) if p is not None]
    out: dict[str, dict[tuple[str, str, str], list[ModulePath]]] = {}
    for target in targets:
        hits = [p for p in parsed if p.dotted == target or p.dotted.endswith("." + target)]
        if not hits:
            raise ModelMismatchError(
                f"{where}: target module {target!r} matches no weight of the base model inside a numbered layer; "
                "is it for another base, or is the module name misspelt?"
            )
        groups = out.setdefault(theta_key(target), {})
        for p in sorted(set(hits)):
            paths = groups.setdefault(p.module_type, [])
            if p not in paths:
                paths.append(p)
    return out


def materialise_condlora(
    base: BaseCheckpoint,
    adapter: CondLoraAdapter,
    *,
    dtype: torch.dtype = torch.float64,
) -> LoraAdapter:
    """Every layer's ``A_l``, ``B_l`` of a CondLoRA adapter on ``base``, as a :class:`LoraAdapter`.

    The result has one :class:`AdapterModule` per module type (``A`` ``(L, r, d)``, ``B`` ``(L, d, r)``, paths as
    the base names them), so every LoRA analysis applies to it unchanged. Its conversion matrices are
    ``theta_A.T`` and ``theta_B.T`` in every layer. Computed in ``dtype`` from the stored base weights.

    Raises
    ------
    ModelMismatchError
        A target missing from the base, or a base weight whose shape does not fit ``theta``.
    """
    weight_owners = [k[: -len(".weight")] for k in base.keys if k.endswith(".weight") and len(base.shapes[k]) == 2]
    modules: dict[str, AdapterModule] = {}
    per_target = target_module_paths(adapter.target_modules, weight_owners, adapter.path)
    all_types = {t: key for key, groups in per_target.items() for t in groups}
    names = module_type_names(all_types)
    for key, groups in per_target.items():
        theta_A, theta_B = (t.to(dtype) for t in adapter.thetas[key])
        for module_type, paths in groups.items():
            W = _read_stack(base, paths, adapter, key).to(dtype)
            A, B = condlora_factors(W, theta_A, theta_B)
            L = len(paths)
            modules[names[module_type]] = AdapterModule(
                names[module_type], tuple(paths), A, B, (adapter.r,) * L, (adapter.scaling,) * L
            )
    return LoraAdapter(adapter.path, adapter.weights_file, adapter.config, dict(sorted(modules.items())))


def lora_tensors_from_condlora(
    base: BaseCheckpoint, adapter: CondLoraAdapter, module_names: Iterable[str]
) -> dict[str, Tensor]:
    """PEFT LoRA tensors equal to the CondLoRA adapter: ``A_l``, ``B_l`` of every layer plus ``modules_to_save``.

    Parameters
    ----------
    base : BaseCheckpoint
        The base the adapter was trained on (its weights give ``W_l``).
    adapter : CondLoraAdapter
    module_names : iterable of str
        Module names of the model PEFT will load the result into (``model.named_modules()``), which fix the keys:
        ``base_model.model.<module name>.lora_A.weight`` ``(r, d)`` and ``...lora_B.weight`` ``(d, r)``. A task
        model's names (``bert.encoder.layer.0...``) may carry a prefix the base checkpoint lacks; weights are paired
        by layer index and inner path.

    Returns
    -------
    dict
        Float32 tensors (the dtype of the thetas), computed in float64.
    """
    out: dict[str, Tensor] = {}
    for key, groups in target_module_paths(adapter.target_modules, module_names, adapter.path).items():
        theta_A, theta_B = adapter.thetas[key]
        for paths in groups.values():
            W = _read_stack(base, paths, adapter, key).double()
            A, B = condlora_factors(W, theta_A.double(), theta_B.double())
            for layer, p in enumerate(paths):
                out[f"{PEFT_PREFIX}{p.dotted}.lora_A.weight"] = A[layer].to(theta_A.dtype).contiguous()
                out[f"{PEFT_PREFIX}{p.dotted}.lora_B.weight"] = B[layer].to(theta_B.dtype).contiguous()
    out.update(adapter.modules_to_save)
    return out


def lora_config_from_condlora(adapter: CondLoraAdapter) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (as ``adapter_config.json``) with the CondLoRA adapter's r, alpha, targets and heads."""
    c = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": c.get("task_type"),
        "r": adapter.r,
        "lora_alpha": c.get("lora_alpha", adapter.r),
        "lora_dropout": float(c.get("lora_dropout", 0.0) or 0.0),
        "target_modules": adapter.target_modules,
        "modules_to_save": adapter.saved_modules or None,
        "base_model_name_or_path": c.get("base_model_name_or_path"),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
    }


def write_lora_adapter(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    extra_files: Mapping[str, Writer] | None = None,
    *,
    replace: bool = False,
) -> list[Path]:
    """Write a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) atomically."""
    files: dict[str, Writer] = {
        CONFIG_NAME: json_writer(dict(config)),
        SAFETENSORS_NAME: safetensors_writer(tensors, {"format": "pt"}),
        **(extra_files or {}),
    }
    return write_outputs(Path(out_dir), files, replace=replace)


def _read_stack(base: BaseCheckpoint, paths: list[ModulePath], adapter: CondLoraAdapter, key: str) -> Tensor:
    """``(L, d, d)`` base weights of ``paths``, checked against the target's theta ``(r, d)``."""
    keys = match_base_weights(paths, base.keys)
    weights = base.read([keys[p] for p in paths])
    d = adapter.thetas[key][0].shape[1]
    for p in paths:
        shape = tuple(weights[keys[p]].shape)
        if shape != (d, d):
            raise ModelMismatchError(
                f"{adapter.path}: target {key!r} has theta (r, {d}) but base weight {keys[p]!r} in {base.root} is "
                f"{shape}; CondLoRA needs square ({d}, {d}) weights: the adapter was trained on another base"
            )
    return torch.stack([weights[keys[p]] for p in paths])


def _check_config(config: dict[str, Any], path: Path) -> None:
    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != CONDLORA_PEFT_TYPE.upper():
        lora = peft_type.upper() == "LORA"
        hint = " (a PEFT LoRA adapter: load it as a LoRA adapter, load_lora_adapter)" if lora else ""
        raise CheckpointError(
            f"{path}: peft_type {peft_type or None!r} is not {CONDLORA_PEFT_TYPE!r}{hint}",
            option="lora" if lora else None,
        )
    use_x = config.get("use_x", "none")
    if use_x not in (None, "none"):
        raise CheckpointError(
            f"{path}: use_x {use_x!r} is an input-conditioned CondLoRA variant that is not part of the paper; "
            'loralens reads only adapters with "use_x": "none"'
        )
    x_scaling = config.get("lora_x_scaling") or 0.0
    if not isinstance(x_scaling, int | float) or isinstance(x_scaling, bool) or x_scaling != 0.0:
        raise CheckpointError(f"{path}: lora_x_scaling is {x_scaling!r} but use_x is 'none'; set it to 0.0")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{path}: 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < float("inf"):
        raise CheckpointError(f"{path}: 'lora_alpha' must be a positive finite number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(
            f"{path}: target_modules is the regular expression {targets!r}; list the module names instead "
            '(e.g. ["query", "value"])'
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise CheckpointError(f"{path}: 'target_modules' must be a non-empty list of module names, got {targets!r}")
    if config.get("fan_in_fan_out"):
        raise CheckpointError(f"{path}: fan_in_fan_out (GPT-2 Conv1D) CondLoRA adapters are not supported")


def _split_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any], source: Path
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """Thetas per target and the other (modules_to_save) tensors; strict about keys and shapes."""
    if _INPUT_CONDITIONED_KEY in tensors:
        raise CheckpointError(
            f"{source}: holds {_INPUT_CONDITIONED_KEY!r}, an input-conditioned (use_x) CondLoRA; not supported"
        )
    factors: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        for factor, suffix in _FACTOR_SUFFIX.items():
            if key.endswith(suffix) and "." not in key[: -len(suffix)]:
                factors.setdefault(key[: -len(suffix)], {})[factor] = tensor
                break
        else:
            if key.startswith(PEFT_PREFIX):
                extra[key] = tensor
            else:
                unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensors {sorted(unexpected)[:3]}; a CondLoRA file holds "
            f"'<target>.linear_for_lora_A', '<target>.linear_for_lora_B' and '{PEFT_PREFIX}...' modules_to_save tensors"
        )
    wanted = {theta_key(t) for t in config["target_modules"]}
    missing = sorted(wanted - set(factors))
    if missing:
        raise CheckpointError(f"{source}: no thetas for target modules {missing} listed in {CONFIG_NAME}")
    stray = sorted(set(factors) - wanted)
    if stray:
        raise CheckpointError(
            f"{source}: thetas for {stray}, which are not in target_modules {config['target_modules']}"
        )
    r = config["r"]
    thetas = {}
    for target in sorted(factors):
        f = factors[target]
        for factor, suffix in _FACTOR_SUFFIX.items():
            if factor not in f:
                raise CheckpointError(f"{source}: {target}{suffix} is missing; the adapter file is incomplete")
        A, B = f["A"], f["B"]
        for factor, t in (("A", A), ("B", B)):
            if t.ndim != 2 or t.shape[0] != r:
                raise CheckpointError(
                    f"{source}: {target}{_FACTOR_SUFFIX[factor]} has shape {tuple(t.shape)}, expected (r={r}, d_in) "
                    f"as {CONFIG_NAME} says"
                )
        if A.shape != B.shape:
            raise CheckpointError(
                f"{source}: {target}: linear_for_lora_A {tuple(A.shape)} and linear_for_lora_B {tuple(B.shape)} differ"
            )
        thetas[target] = (A, B)
    return thetas, extra

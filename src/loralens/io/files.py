"""Reading tensor and JSON files safely, with errors that name the file and the fix.

safetensors files are memory-mapped and only the requested tensors are read. ``.bin`` files are
pickles: they are opened only with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from loralens.errors import CheckpointError, InputPathError, NonFiniteError

__all__ = [
    "os_error_fix",
    "os_error_reason",
    "read_json",
    "require_regular_file",
    "safetensors_keys",
    "safetensors_shapes",
    "read_safetensors",
    "read_pickle_state_dict",
    "check_finite",
    "check_float",
]

# torch.load(weights_only=True) could be bypassed before 2.6 (CVE-2025-32434).
_MIN_TORCH_FOR_PICKLES = (2, 6)


#: Largest JSON file read (a config, a shard index, metrics.json): real ones are kilobytes, a shard index of a
#: very large model a few MiB; anything bigger is not one of them and would only cost memory and time.
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Deepest nesting accepted in a JSON file; configs are a few levels deep. Deeper ones would exhaust Python's
#: recursion limit in the parser (or later, when the config is written back into a report).
MAX_JSON_DEPTH = 64


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path``: at most :data:`MAX_JSON_BYTES`, nested at most :data:`MAX_JSON_DEPTH` deep.

    Every JSON file loralens reads (adapter_config.json, a base's config.json and shard index, CondLoRA
    configs, metrics.json) comes through here.
    """
    _check_file(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)  # not stat: a pipe or /proc file reports no size
    except OSError as e:
        raise InputPathError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB, too large for a JSON config; "
            "check that it is the right file"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e}); fix or re-save the file") from e
    except RecursionError as e:
        raise CheckpointError(_too_deep(path)) from e
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise CheckpointError(_too_deep(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _too_deep(path: Path) -> str:
    return f"{path}: invalid JSON (nested more than {MAX_JSON_DEPTH} levels deep); fix or re-save the file"


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists/objects deeper than ``limit`` levels (iteratively: no recursion limit)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


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
    try:
        mmap = zipfile.is_zipfile(path)  # the legacy non-zip format cannot be memory-mapped
    except zipfile.BadZipFile as e:  # a damaged zip directory (e.g. "spans multiple disks") raises here already
        raise _corrupt(path, e) from e
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


def os_error_reason(e: OSError) -> str:
    """What an OSError means for the user and what to do, for a message after the path: ``file name too long
    (...); choose a shorter name``. The system's own words for errors without a known fix."""
    fix = os_error_fix(e)
    words = e.strerror or type(e).__name__
    if e.errno == errno.ENAMETOOLONG:
        return f"{words.lower()}: the system allows {_name_max()} bytes per name; choose a shorter name or path"
    return f"{words.lower()}; {fix}" if fix else words.lower()


def os_error_fix(e: OSError) -> str | None:
    """What to do about an OSError (a full disk, no permission, a file-size limit), or None when there is no
    general advice for it."""
    return _OS_ERROR_FIXES.get(e.errno or 0)


_OS_ERROR_FIXES = {
    errno.EACCES: "give your user read (and, for outputs, write) permission, or use a copy you own",
    errno.EPERM: "give your user read (and, for outputs, write) permission, or use a copy you own",
    errno.ENOSPC: "free space on that disk or choose a folder on another one",
    errno.EDQUOT: "free space within your disk quota or choose a folder on another disk",
    errno.EFBIG: "a file-size limit was reached (ulimit -f, or the file system's own); raise it or write elsewhere",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ELOOP: "a symbolic link points back to itself; fix the link",
    errno.EIO: "the disk or network file system failed; retry, or copy the files to a local disk",
}


def _name_max() -> int:
    try:
        return os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_file(path: Path) -> None:
    try:
        if not path.exists():
            raise InputPathError(f"{path}: no such file")
        if path.is_dir():
            raise InputPathError(f"{path}: expected a file, found a folder")
        require_regular_file(path)
    except OSError as e:  # a name too long, a folder on the way without permission
        raise InputPathError(f"{path}: cannot read ({os_error_reason(e)})") from e


def require_regular_file(path: Path) -> Path:
    """Raise InputPathError unless ``path`` (after symbolic links) is a regular file.

    A FIFO blocks the reader until someone writes to it, and a device such as /dev/zero or /dev/urandom
    never ends: reading either would hang the run, so they are refused by their kind before any read.
    """
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
    raise InputPathError(f"{path}: is a {kind}, not a regular file; point to the checkpoint's own file")


_FILE_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({detail}); re-download or re-save it")

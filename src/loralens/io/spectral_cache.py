"""An on-disk cache of base weights' singular triplets, so that a base's SVDs are computed once.

The analyses that need a base weight's spectrum (``amplification``, ``spectra``: W's top-r triplets;
``intruders``: W0's full thin SVD) ask :class:`SpectralCache` first. An entry is one safetensors file per
(weight file, tensor, k, dtype, method): its tensors (``U`` ``(d_out, k)``, ``S`` ``(k,)``, ``V`` ``(d_in, k)``,
those the caller stored) and, in its metadata, every field of the :class:`SpectralKey` it was made for.

- **Keyed by content**: ``file_digest`` is the weight file's SHA-256 (the SHA-256 of its header for
  safetensors files over 1 GiB), computed by the caller with the provenance hashing
  (:func:`loralens.analyses.provenance.file_record`); a changed checkpoint gets new entries.
- **Never trusted**: :meth:`SpectralCache.get` checks the metadata against the key, the parts' shapes and dtype,
  finiteness, and that ``S`` is non-negative and descending; an entry that fails (truncated, another key's,
  wrong shapes) is ignored, logged at WARNING level on this module's logger (no Python warning), and rebuilt by
  the caller's :meth:`~SpectralCache.put`.
- **Atomic writes**: written under a temporary name in the entry's folder and moved into place with
  ``os.replace``, so a reader never sees half a file; a failed write (read-only or full disk) is logged and the
  analysis goes on without the cache.
- **safetensors only** (never pickle): reading an entry cannot run code.

The default folder is :func:`default_cache_dir` (``platformdirs.user_cache_dir("loralens")`` when platformdirs is
installed, else ``$XDG_CACHE_HOME/loralens`` or ``~/.cache/loralens``); entries live in its ``spectral-v1``
subfolder. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "CACHE_VERSION",
    "SpectralKey",
    "SpectralCache",
    "default_cache_dir",
    "open_spectral_cache",
    "cached_stack",
]

logger = logging.getLogger(__name__)

#: Subfolder of the cache directory; bump when the entry format changes (old entries are then never read).
CACHE_VERSION = "spectral-v1"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class SpectralKey:
    """What one cached entry is the spectrum of.

    Attributes
    ----------
    file_digest : str
        SHA-256 (hex) of the weight file holding the tensor (of its header for a safetensors file over 1 GiB).
    tensor : str
        The tensor's key in the checkpoint.
    shape : tuple of int
        ``(d_out, d_in)``.
    k : int
        Triplets kept: ``U`` ``(d_out, k)``, ``S`` ``(k,)``, ``V`` ``(d_in, k)``.
    dtype : {"float32", "float64"}
        The precision they were computed in.
    method : str
        How: ``"exact"`` (dense SVD) or ``"engine"`` (:func:`loralens.core.spectral.top_singular_triplets`).
    """

    file_digest: str
    tensor: str
    shape: tuple[int, int]
    k: int
    dtype: str
    method: str

    def metadata(self) -> dict[str, str]:
        """The key as the entry's safetensors metadata (strings)."""
        return {name: json.dumps(value) for name, value in asdict(self).items()}

    def filename(self) -> str:
        """``<sha256 of the key>.safetensors``."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest() + ".safetensors"

    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        d_out, d_in = self.shape
        return {"U": (d_out, self.k), "S": (self.k,), "V": (d_in, self.k)}


class SpectralCache:
    """Singular triplets of base weights in ``root / CACHE_VERSION``, one safetensors file per :class:`SpectralKey`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / CACHE_VERSION

    def path(self, key: SpectralKey) -> Path:
        return self.folder / key.filename()

    def get(self, key: SpectralKey, parts: Sequence[str] = ("U", "S", "V")) -> dict[str, Tensor] | None:
        """The entry's ``parts`` (CPU tensors in ``key.dtype``), or None when it is missing or fails a check."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys() if name in parts}
        except Exception as e:  # a truncated or garbled file: safetensors, OS or JSON errors alike
            logger.warning("ignoring unreadable spectral cache entry %s (%s); recomputing it", path, e)
            return None
        problem = _check_entry(key, meta, tensors, parts)
        if problem is not None:
            logger.warning("ignoring spectral cache entry %s: %s; recomputing it", path, problem)
            return None
        return {p: tensors[p] for p in parts}

    def put(self, key: SpectralKey, tensors: Mapping[str, Tensor]) -> None:
        """Store ``tensors`` (a subset of U, S, V with the key's shapes) atomically; a failed write is only logged."""
        data = {name: t.detach().to("cpu", _DTYPES[key.dtype]).contiguous() for name, t in tensors.items()}
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
            os.close(fd)
            tmp = Path(name)
            save_file(data, str(tmp), metadata=key.metadata())
            tmp.replace(self.path(key))  # atomic (os.replace)
            tmp = None
        except Exception as e:  # OSError, or safetensors' own error type for a full disk
            logger.warning("could not write the spectral cache entry for %s into %s (%s)", key.tensor, self.folder, e)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _check_entry(
    key: SpectralKey, meta: Mapping[str, str], tensors: Mapping[str, Tensor], parts: Sequence[str]
) -> str | None:
    """Why an entry cannot be used for ``key``, or None."""
    if meta != key.metadata():
        return "its metadata does not match the key"
    shapes = key.part_shapes()
    dtype = _DTYPES.get(key.dtype)
    for p in parts:
        t = tensors.get(p)
        if t is None:
            return f"no tensor {p!r}"
        if tuple(t.shape) != shapes[p] or t.dtype != dtype:
            return f"{p} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shapes[p]}"
        if not bool(torch.isfinite(t).all()):
            return f"{p} holds NaN or Inf"
    S = tensors.get("S")
    if "S" in parts and S is not None and ((S < 0).any() or (S[1:] > S[:-1]).any()):
        return "S is not non-negative and descending"
    return None


def default_cache_dir() -> Path:
    """``platformdirs.user_cache_dir("loralens")`` if platformdirs is installed, else ``$XDG_CACHE_HOME/loralens``,
    else ``~/.cache/loralens``."""
    try:
        import platformdirs
    except ImportError:
        xdg = os.environ.get("XDG_CACHE_HOME")
        return (Path(xdg) if xdg else Path.home() / ".cache") / "loralens"
    return Path(platformdirs.user_cache_dir("loralens"))


def open_spectral_cache(cache: bool = True, cache_dir: str | os.PathLike[str] | None = None) -> SpectralCache | None:
    """The cache to use: None when ``cache`` is false, else in ``cache_dir`` (default :func:`default_cache_dir`)."""
    if not cache:
        return None
    return SpectralCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())


def cached_stack(
    cache: SpectralCache | None,
    keys: Sequence[SpectralKey | None],
    parts: Sequence[str],
    compute: Callable[[list[int]], Mapping[str, Tensor]],
    *,
    device: torch.device,
) -> dict[str, Tensor]:
    """``parts`` for a stack of matrices, stacked ``(n, ...)`` on ``device``: cached entries where valid, the rest
    from ``compute(positions)`` (stacked over those positions, in their order; every part it returns is stored,
    so it may return more than ``parts``, e.g. ``V`` for a later caller).

    ``keys[i]`` None (no cache, or a file without a digest) means always computed. Nothing is read when ``cache``
    is None.
    """
    found: dict[int, dict[str, Tensor]] = {}
    if cache is not None:
        for i, key in enumerate(keys):
            if key is not None and (entry := cache.get(key, parts)) is not None:
                found[i] = entry
    missing = [i for i in range(len(keys)) if i not in found]
    if missing:
        fresh = compute(missing)
        for j, i in enumerate(missing):
            found[i] = {p: fresh[p][j] for p in parts}
            key = keys[i]
            if cache is not None and key is not None:
                cache.put(key, {p: t[j] for p, t in fresh.items()})
    return {p: torch.stack([found[i][p].to(device) for i in range(len(keys))]) for p in parts}

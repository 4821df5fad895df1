"""Writing results so that nothing half-written is ever left behind.

Each file is written to a temporary name in its final folder, flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows). A new output folder is assembled under a
temporary name and renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from loralens.errors import InputPathError

__all__ = ["write_outputs", "safetensors_writer", "json_writer", "json_text", "sha256_file"]

Writer = Callable[[Path], None]


def json_text(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def safetensors_writer(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Writer:
    """A writer that saves contiguous CPU copies of ``tensors`` as safetensors."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(data, str(path), metadata=dict(metadata or {}))


def json_writer(obj: Any) -> Writer:
    text = json_text(obj)
    return lambda path: path.write_text(text, encoding="utf-8")


def write_outputs(out_dir: Path, files: Mapping[str, Writer]) -> list[Path]:
    """Write ``files`` (name -> writer) into ``out_dir`` atomically; return the final paths.

    A folder that does not exist yet appears complete or not at all. In an existing folder each file is
    replaced atomically and other files are left alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputPathError(f"{out_dir}: the output path is a file; pass a folder")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not out_dir.exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
            staging.chmod(0o777 & ~_UMASK)
            try:
                for name, write in files.items():
                    _write_synced(staging / name, write)
                staging.replace(out_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            for name, write in files.items():
                fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
                os.close(fd)
                tmp = Path(tmp_name)
                try:
                    _write_synced(tmp, write)
                    tmp.replace(out_dir / name)
                finally:
                    tmp.unlink(missing_ok=True)
    except OSError as e:
        raise InputPathError(f"{out_dir}: cannot write the results ({e.strerror or e}); nothing was changed") from e
    return [out_dir / name for name in files]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, write: Writer) -> None:
    write(path)
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    # mkstemp/mkdtemp make private files; results get the permissions of any file the user creates.
    path.chmod(0o666 & ~_UMASK)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

"""Writing results so that nothing half-written is ever left behind.

An output is a folder: its files are written and flushed under a temporary folder name beside it,
which is then renamed into place whole (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from loralens.errors import InputPathError, OutputExistsError, OutputPathError
from loralens.io.files import os_error_fix

__all__ = [
    "MARKER",
    "bytes_writer",
    "check_output_folder",
    "interrupt_on_termination",
    "remove_stale_staging",
    "write_outputs",
    "safetensors_writer",
    "json_writer",
    "json_text",
    "sha256_file",
]

#: Writes one output file at the given path; whatever it returns (e.g. a byte count) is ignored.
Writer = Callable[[Path], object]


def json_text(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def safetensors_writer(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Writer:
    """A writer that saves contiguous CPU copies of ``tensors`` as safetensors."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(data, str(path), metadata=dict(metadata or {}))


def bytes_writer(data: bytes) -> Writer:
    """A writer of raw bytes (a rendered PNG or SVG)."""
    return lambda path: path.write_bytes(data)


def json_writer(obj: Any) -> Writer:
    text = json_text(obj)
    return lambda path: path.write_text(text, encoding="utf-8")


#: Hidden file in every folder loralens writes: it lets ``replace=True`` tell a folder it may
#: replace from one that holds somebody's other files.
MARKER = ".loralens-output"


def write_outputs(
    out_dir: Path, files: Mapping[str, Writer], *, replace: bool = False, inputs: Iterable[Path | str | None] = ()
) -> list[Path]:
    """Write ``files`` (name -> writer) as the folder ``out_dir``, atomically; return the final paths.

    The new folder is assembled under a temporary name beside ``out_dir`` and renamed into place, so the path
    shows either a complete output or none, whatever interrupts the run. A missing or empty ``out_dir`` is
    simply created. An existing one with content is refused (OutputExistsError) unless ``replace`` is true
    *and* it is a folder loralens wrote (it holds :data:`MARKER`, or only files named in ``files``); then the
    old folder is renamed aside, the new one into place, and the old one deleted: an interruption between
    the two renames leaves no output at ``out_dir`` (and the previous one beside it), never a mixture.
    """
    out_dir = Path(out_dir)
    existing = check_output_folder(out_dir, replace=replace, names=files)
    parent = out_dir.parent
    # Both names are fixed before either folder exists: a signal can then never fall between a folder appearing
    # and the clean-up below knowing of it (a name returned by mkdtemp, or by the swap, could be lost that way).
    staging = _free_name(out_dir, ".tmp")
    previous = _free_name(out_dir, ".old")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o777)
        staging.chmod(0o777 & ~_UMASK)
        for name, write in {**files, MARKER: json_writer({"loralens_output": sorted(files)})}.items():
            _write_synced(staging / name, write)
        if existing:
            _swap_into_place(staging, out_dir, previous)
        else:
            staging.replace(out_dir)  # onto a missing or empty folder: one rename
    except OSError as e:
        fix = os_error_fix(e)
        raise InputPathError(
            f"{out_dir}: cannot write the results ({e.strerror or e}); nothing was changed{f'; {fix}' if fix else ''}"
        ) from e
    finally:
        _remove_leftovers(staging, previous)
    return [out_dir / name for name in files]


def check_output_folder(
    out_dir: Path, *, replace: bool = False, names: Iterable[str] = (), inputs: Iterable[Path | str | None] = ()
) -> bool:
    """Raise unless :func:`write_outputs` may write the folder ``out_dir``; return whether it has content.

    Commands call this before their work, so a refused output costs nothing. ``names``: the files about
    to be written (an unmarked folder holding only those may be replaced). ``inputs``: the files and folders
    the run reads (strings that are not existing paths, such as hub names, are skipped); an output folder that
    is one of them, holds one or lies inside one is refused whatever ``replace`` says, so results can never
    overwrite what they were computed from.
    """
    out_dir = Path(out_dir)
    _check_output_path(out_dir)
    _refuse_input_overlap(out_dir, inputs)
    remove_stale_staging(out_dir)
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not existing:
        return False
    if not replace:
        raise OutputExistsError(
            f"{out_dir}: the output folder exists; replace it or choose a new one", option="replace"
        )
    foreign = sorted(set(existing) - set(names) - {MARKER})
    if MARKER not in existing and foreign:
        raise OutputExistsError(
            f"{out_dir}: not replacing a folder that holds files loralens did not write "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
        )
    return True


def _check_output_path(out_dir: Path) -> None:
    """Say what is wrong with an output path before any work: it must be a folder that can be made here."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputPathError(f"{out_dir}: the output path is a dangling symbolic link; remove it or choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir}: the output path is a file; pass a folder")
    resolved = out_dir.resolve()
    if out_dir.name in ("", ".", "..") or resolved in (Path(resolved.anchor), Path.cwd().resolve()):
        raise OutputPathError(
            f"{out_dir}: the output must be a folder of its own (it is replaced whole); name a new or empty one"
        )
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{out_dir}: {parent} is a file, so no folder can be made under it")
            break


def _refuse_input_overlap(out_dir: Path, inputs: Iterable[Path | str | None]) -> None:
    out = out_dir.resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(given)
        if not path.exists():
            continue  # a hub name, or a file already reported missing elsewhere
        path = path.resolve()
        if path == out or out in path.parents or path in out.parents:
            where = "is" if path == out else ("holds" if out in path.parents else "lies inside")
            raise OutputPathError(
                f"{out_dir}: the output folder {where} the input {given}; write the results to another folder"
            )


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete staging folders an earlier, killed run of the same output left beside ``out_dir``; return them.

    Staging and set-aside folders are named ``.<out name>.<8 random characters>.tmp`` / ``.old`` (mkdtemp's
    names). A run that is still writing holds its staging folder for seconds; one older than
    :data:`STALE_AFTER_S` can only be debris of a run killed outright (SIGKILL, power loss). A previous output set aside
    by an interrupted swap (``.old``) is put back when ``out_dir`` itself is gone, instead of deleted.
    """
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    removed = []
    now = time.time()
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    try:
        candidates = sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []
    for path in candidates:
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            if now - path.stat().st_mtime < STALE_AFTER_S:
                continue
            if path.name.endswith(".old") and not out_dir.exists() and (path / MARKER).is_file():
                path.replace(out_dir)
                continue
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
    return removed


#: Seconds after which a staging folder beside an output counts as left by a dead run.
STALE_AFTER_S = 600.0


def _free_name(out_dir: Path, suffix: str) -> Path:
    """A path beside ``out_dir`` named ``.<out name>.<8 random characters><suffix>`` that nothing holds yet."""
    while True:
        token = "".join(secrets.choice(_NAME_CHARACTERS) for _ in range(8))
        path = out_dir.parent / f".{out_dir.name}.{token}{suffix}"
        if not os.path.lexists(path):
            return path


# the characters of mkdtemp's names, which remove_stale_staging recognises
_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _swap_into_place(staging: Path, out_dir: Path, previous: Path) -> None:
    """Rename ``staging`` to ``out_dir``, and the folder there aside to the free name ``previous``."""
    with _signals_held():  # Ctrl-C cannot fall between the two renames (SIGKILL can: then the old folder is beside)
        out_dir.replace(previous)
        try:
            staging.replace(out_dir)
        except OSError:
            previous.replace(out_dir)  # put the previous output back
            raise


def _remove_leftovers(*paths: Path) -> None:
    """Delete ``paths`` (those that exist), even when a Ctrl-C/SIGTERM arrives meanwhile; it is raised after."""
    try:
        with _signals_held():  # a second signal cannot cut the clean-up short and leave debris
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:  # one that arrived just before the handlers were held: finish, then stop
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        raise


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP (``kill``, a closed terminal, a scheduler's time limit) raise KeyboardInterrupt,
    as Ctrl-C does, so that a write in progress unwinds and removes its staging folder instead of leaving it.

    For programs (the CLI calls it at start); a library import never changes signal handling. Main thread only.
    """
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.default_int_handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the block; one that arrives meanwhile is delivered right after it.

    Without this a KeyboardInterrupt can land between two statements (after the first rename has returned and
    before anything could undo it), which no try/except closes. The Python-level handlers are swapped for one
    that only notes the signal: a signal mask would not do, since the kernel hands a process-directed signal to
    any thread that does not block it (torch's, for one), and Python then raises in the main thread all the
    same. Only the main thread can change handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not None:  # None: a handler installed outside Python
            previous[sig] = signal.signal(sig, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for number in caught:
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, write: Writer) -> None:
    try:
        write(path)
    except SafetensorError as e:  # safetensors reports a full disk or a file-size limit as its own error type
        number = str(e).rpartition("(os error ")[2].rstrip(")")  # "... I/O error: File too large (os error 27)"
        code = int(number) if number.isdigit() else errno.EIO
        raise OSError(code, os.strerror(code) if number.isdigit() else str(e), str(path)) from e
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    # mkstemp/mkdtemp make private files; results get the permissions of any file the user creates.
    path.chmod(0o666 & ~_UMASK)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

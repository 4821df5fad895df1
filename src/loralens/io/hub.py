"""Inputs named the way PEFT and transformers name them: a local folder or file, else a Hugging Face Hub repo id.

Every input (a base, a LoRA or CondLoRA adapter) goes through :func:`parse_repo_spec` and :class:`HubRepo`: a
path that exists is used as it is; otherwise ``org/name`` or ``name``, with an optional ``@revision`` (a branch,
a tag or a commit hash), is resolved by ``huggingface_hub``: the local cache first, the network only when allowed.
Downloads fetch single files (``hf_hub_download``), never a whole repository: an adapter's config and weights
file; a base's ``config.json``, its shard index, the safetensors headers of its shards (a ranged read, a few
kilobytes each) and, when a tensor is first read, the one shard that holds it.

Offline (``offline=True``, or ``HF_HUB_OFFLINE=1`` in the environment) nothing touches the network; a name that
is not cached is an error that says how to fetch it. ``.bin`` weights are pickles: loralens reads them only with
``torch.load(weights_only=True)``, but never downloads one unless ``allow_pickle_download=True``.

:func:`hub_settings` sets the defaults of those parameters for a block of code (the command line sets them
once for a whole command); a parameter passed explicitly always wins. A download over
:data:`DOWNLOAD_NOTICE_BYTES` is announced before it starts, through the ``on_download`` callback when one is
set, else as a :class:`LargeDownloadWarning`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralens.errors import CheckpointError, InputPathError, LoralensError, LoralensWarning

__all__ = [
    "DOWNLOAD_NOTICE_BYTES",
    "HubRef",
    "HubRepo",
    "HubSettings",
    "LargeDownloadWarning",
    "hub_cache_dir",
    "hub_ref_of",
    "hub_settings",
    "is_offline",
    "parse_repo_spec",
]

#: Downloads larger than this (1 GB) are announced before they start.
DOWNLOAD_NOTICE_BYTES = 10**9

#: ``org/name`` or ``name`` (huggingface_hub's rules: letters, digits, ``-_.``, at most 96 each), then
#: ``@revision`` (a branch, tag or commit; branch names may hold ``/``).
_REPO_SPEC = re.compile(r"(?P<repo>(?:[\w.-]{1,96}/)?[\w.-]{1,96})(?:@(?P<revision>[\w./-]{1,256}))?", re.ASCII)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class LargeDownloadWarning(LoralensWarning):
    """A file over :data:`DOWNLOAD_NOTICE_BYTES` is about to be downloaded (shown when no callback is set)."""


#: ``on_download(repo_id, filename, size_in_bytes)``: called before each download over the notice size.
DownloadCallback = Callable[[str, str, int], None]


@dataclass(frozen=True)
class HubSettings:
    """Defaults for hub inputs; see :func:`hub_settings`."""

    offline: bool | None = None
    allow_pickle_download: bool = False
    on_download: DownloadCallback | None = None


_SETTINGS: contextvars.ContextVar[HubSettings | None] = contextvars.ContextVar("loralens_hub_settings", default=None)


@contextlib.contextmanager
def hub_settings(
    *,
    offline: bool | None = None,
    allow_pickle_download: bool = False,
    on_download: DownloadCallback | None = None,
) -> Iterator[HubSettings]:
    """Within the block, hub inputs use these defaults (a parameter given to a loader still wins).

    ``offline=None`` follows ``HF_HUB_OFFLINE``; ``on_download`` replaces the :class:`LargeDownloadWarning`.
    """
    settings = HubSettings(offline, allow_pickle_download, on_download)
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


def current_settings() -> HubSettings:
    """The defaults in force (:func:`hub_settings`)."""
    return _SETTINGS.get() or HubSettings()


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else the :func:`hub_settings` default, else ``HF_HUB_OFFLINE`` (read at each call)."""
    if offline is None:
        offline = current_settings().offline
    if offline is not None:
        return offline
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if name in os.environ:
            return os.environ[name].upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (``HF_HUB_CACHE``, ``HF_HOME``/hub), else
    huggingface_hub's default. Read at each call: huggingface_hub reads these variables once, at its import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def parse_repo_spec(spec: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``spec`` reads as a hub repo id (``org/name@rev``), else None.

    Names huggingface_hub would refuse (``--`` or ``..`` inside, a leading or trailing ``.`` or ``-``, a path
    starting with ``/``, ``~`` or ``.``) are not repo ids: they stay local paths.
    """
    text = os.fspath(spec)
    m = _REPO_SPEC.fullmatch(text)
    if m is None:
        return None
    repo = m["repo"]
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if any(part[:1] in ".-" or part[-1:] in ".-" for part in repo.split("/")):
        return None
    return repo, m["revision"]


@dataclass(frozen=True)
class HubRef:
    """Where a hub input came from: the repo, the revision asked for (``main`` by default), the commit it named."""

    repo_id: str
    revision: str
    commit_hash: str

    def record(self) -> dict[str, str]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit_hash": self.commit_hash}


def hub_ref_of(path: Path) -> HubRef | None:
    """The :class:`HubRef` of a folder or file inside a hub-cache snapshot (``models--org--name/snapshots/<commit>``),
    else None. The revision is the branch or tag of the cache that points at that commit, else the commit itself."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            repo_id = parts[i - 1][len("models--") :].replace("--", "/")
            commit = parts[i + 1]
            refs = Path(*parts[:i]) / "refs"
            named = []
            with contextlib.suppress(OSError):
                named = sorted(
                    str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file() and p.read_text().strip() == commit
                )
            revision = "main" if "main" in named else (named[0] if named else commit)
            return HubRef(repo_id, revision, commit)
    return None


@dataclass
class HubRepo:
    """One repo at one commit: fetch its files one at a time.

    The first file fixes the commit (``revision`` resolved by the cache or the hub); every later file is
    fetched at that commit, so all files of an input come from one snapshot. ``what`` names the input in
    messages (``"base"``, ``"adapter"``) and ``option`` is the parameter the errors concern.
    """

    repo_id: str
    revision: str | None = None
    offline: bool | None = None
    allow_pickle_download: bool | None = None
    what: str = "input"
    option: str | None = None
    commit_hash: str | None = field(default=None, init=False)
    _snapshot: Path | None = field(default=None, init=False, repr=False)
    _ref_cached: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.offline = is_offline(self.offline)
        if self.allow_pickle_download is None:
            self.allow_pickle_download = current_settings().allow_pickle_download

    @property
    def name(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def ref(self) -> HubRef:
        if self.commit_hash is None:
            raise LoralensError(f"{self.name}: no file fetched yet")
        return HubRef(self.repo_id, self.revision or "main", self.commit_hash)

    @property
    def snapshot(self) -> Path:
        """The snapshot folder of the resolved commit (some of its files may not be downloaded yet)."""
        if self._snapshot is None:
            self.locate()
        assert self._snapshot is not None
        return self._snapshot

    # ------------------------------------------------------------------ resolution

    def locate(self) -> Path:
        """Fix the commit without downloading anything but the first file found: offline, from the cache alone;
        online, by fetching ``config.json`` (or ``adapter_config.json``). Returns the snapshot folder."""
        if self._snapshot is not None:
            return self._snapshot
        if self.offline:
            revision = self._cached_revision()
            self.commit_hash, self._snapshot = revision.commit_hash, Path(revision.snapshot_path)
            return self._snapshot
        for probe in ("adapter_config.json", "config.json"):
            if self.fetch(probe, required=False) is not None:
                assert self._snapshot is not None
                return self._snapshot
        raise InputPathError(
            f"{self.what} {self.name!r}: the hub repo has neither config.json nor adapter_config.json; give a "
            "model or adapter repo",
            option=self.option,
        )

    def _cached_revision(self) -> Any:
        """The cached revision of this repo that ``revision`` names (a branch, tag or commit), through
        huggingface_hub's scan of the cache; a one-line error when the repo or the revision is not cached."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        cache = hub_cache_dir()
        wanted = self.revision or "main"
        try:
            repos = [r for r in scan_cache_dir(cache).repos if r.repo_id == self.repo_id and r.repo_type == "model"]
        except CacheNotFound:
            repos = []
        if not repos:
            raise InputPathError(
                f"{self.what} {self.name!r}: no such folder, and the name is not in the local Hugging Face cache "
                f"({cache}) while offline; fetch it first (huggingface_hub.hf_hub_download({self.repo_id!r}, "
                "filename)) or allow downloads (offline=False, HF_HUB_OFFLINE unset)",
                option="offline",
            )
        revisions = repos[0].revisions
        for rev in revisions:
            if wanted == rev.commit_hash or wanted in rev.refs:
                return rev
        known = sorted({ref for rev in revisions for ref in rev.refs}) + sorted(
            rev.commit_hash[:12] for rev in revisions
        )
        raise InputPathError(
            f"{self.what} {self.name!r}: revision {wanted!r} is not in the local Hugging Face cache ({cache}), "
            f"which holds {', '.join(known) or 'no revision'}; fetch it first (huggingface_hub.hf_hub_download("
            f"{self.repo_id!r}, filename, revision={wanted!r})) or allow downloads (offline=False, HF_HUB_OFFLINE "
            "unset)",
            option="offline",
        )

    # ------------------------------------------------------------------ files

    def has(self, filename: str) -> bool:
        """Whether the repo holds ``filename`` at the resolved commit (offline: whether it is cached)."""
        if self.offline:
            return (self.snapshot / filename).is_file()
        return self._dry_run(filename, required=False) is not None

    def cached(self, filename: str) -> Path | None:
        """The local copy of ``filename`` at the resolved commit, if it is cached; no network."""
        path = self.snapshot / filename
        return path if path.is_file() else None

    def fetch(self, filename: str, *, required: bool = True) -> Path | None:
        """The local path of ``filename``, from the cache or downloaded (when allowed); None when the repo does not
        hold it and ``required`` is False."""
        if self._snapshot is not None and (self._snapshot / filename).is_file():
            return self._snapshot / filename
        if self.offline:
            if (self.locate() / filename).is_file():
                return self.locate() / filename
            if required:
                raise self._not_cached(filename)
            return None
        info = self._dry_run(filename, required=required)
        if info is None:
            return None
        if filename.endswith(".bin") and info.will_download and not self.allow_pickle_download:
            raise CheckpointError(
                f"{self.what} {self.name!r}: {filename} is a pickle, and a crafted pickle runs code when loaded; "
                "loralens reads .bin files only with torch.load(weights_only=True), but downloads one only when "
                "asked to (allow_pickle_download=True); prefer a safetensors revision of the repo",
                option="allow_pickle_download",
            )
        if info.will_download and info.file_size is not None and info.file_size > DOWNLOAD_NOTICE_BYTES:
            self._announce(filename, info.file_size)
        # The first download names the revision, so that huggingface_hub records it in the cache's refs (for
        # offline runs later); it must land on the commit the dry run saw.
        path = Path(self._download(filename, dry_run=False, by_name=not self._ref_cached))
        if self._snapshot is not None and not path.is_relative_to(self._snapshot):
            raise InputPathError(
                f"{self.what} {self.name!r}: the revision moved to another commit while loralens was fetching "
                f"{filename}; run again",
                option=self.option,
            )
        self._ref_cached = True
        return path

    def _dry_run(self, filename: str, *, required: bool) -> Any:
        from huggingface_hub.errors import EntryNotFoundError

        try:
            info = self._download(filename, dry_run=True)
        except EntryNotFoundError:
            if required:
                raise InputPathError(
                    f"{self.what} {self.name!r}: the hub repo holds no {filename} at commit {self.commit_hash}",
                    option=self.option,
                ) from None
            return None
        if self.commit_hash is None:
            self.commit_hash = info.commit_hash
            local = Path(info.local_path)
            self._snapshot = local.parents[len(Path(filename).parts) - 1]
        return info

    def _download(self, filename: str, *, dry_run: bool, by_name: bool = False) -> Any:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision if by_name or self.commit_hash is None else self.commit_hash,
                cache_dir=hub_cache_dir(),
                endpoint=_endpoint(),
                local_files_only=bool(self.offline),
                dry_run=dry_run,
            )
        except LocalEntryNotFoundError as e:  # huggingface_hub wraps what the hub answered as its cause
            cause = e.__cause__
            if isinstance(cause, EntryNotFoundError):
                raise cause from None
            if isinstance(cause, RepositoryNotFoundError | RevisionNotFoundError):
                raise self._translate(cause) from cause
            raise InputPathError(
                f"{self.what} {self.name!r}: {filename} is not in the local Hugging Face cache ({hub_cache_dir()}) "
                f"and the hub cannot be reached ({_one_line(cause or e)}); connect, or allow no downloads "
                "(offline=True) and fetch it where the hub can be reached",
                option=self.option,
            ) from e
        except EntryNotFoundError:
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise self._translate(e) from e
        except (HfHubHTTPError, OSError) as e:
            raise InputPathError(
                f"{self.what} {self.name!r}: fetching {filename} failed: {_one_line(e)}", option=self.option
            ) from e

    def _translate(self, e: Exception) -> InputPathError:
        from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

        if isinstance(e, GatedRepoError):
            return InputPathError(
                f"{self.what} {self.name!r}: the hub repo is gated; accept its terms on the hub and log in "
                "(huggingface_hub.login, or `hf auth login`)",
                option=self.option,
            )
        if isinstance(e, RevisionNotFoundError):
            return InputPathError(
                f"{self.what} {self.name!r}: the hub repo has no revision {self.revision!r}; give a branch, tag or "
                "commit it has",
                option=self.option,
            )
        return InputPathError(
            f"{self.what} {self.name!r}: no such folder, and no such repo on the hub (or it is private: log in "
            "with huggingface_hub.login)",
            option=self.option,
        )

    def remote_safetensors_header(self, filename: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, safetensors dtype name) of a shard on the hub, from a ranged read of its header
        (the shard itself is not downloaded)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, SafetensorsParsingError

        try:
            meta = HfApi(endpoint=_endpoint()).parse_safetensors_file_metadata(
                self.repo_id, filename, revision=self.commit_hash or self.revision
            )
        except SafetensorsParsingError as e:
            raise CheckpointError(f"{self.what} {self.name!r}: {filename}: {_one_line(e)}") from e
        except (HfHubHTTPError, OSError) as e:
            raise InputPathError(
                f"{self.what} {self.name!r}: reading the header of {filename} failed: {_one_line(e)}",
                option=self.option,
            ) from e
        return {name: (tuple(info.shape), info.dtype) for name, info in meta.tensors.items()}

    def _not_cached(self, filename: str) -> InputPathError:
        revision = f", revision={self.revision!r}" if self.revision else ""
        return InputPathError(
            f"{self.what} {self.name!r}: {filename} is not in the local Hugging Face cache ({hub_cache_dir()}) "
            f"while offline; fetch it first (huggingface_hub.hf_hub_download({self.repo_id!r}, {filename!r}"
            f"{revision})) or allow downloads (offline=False, HF_HUB_OFFLINE unset)",
            option="offline",
        )

    def _announce(self, filename: str, size: int) -> None:
        callback = current_settings().on_download
        if callback is not None:
            callback(self.repo_id, filename, size)
        else:
            warnings.warn(
                LargeDownloadWarning(f"{self.what} {self.name!r}: downloading {filename} ({size / 1e9:.1f} GB)"),
                stacklevel=3,
            )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def resolve_input(
    spec: str | os.PathLike[str],
    *,
    what: str,
    option: str | None = None,
    offline: bool | None = None,
    allow_pickle_download: bool | None = None,
) -> Path | HubRepo:
    """A path that exists (``~`` expanded), else the :class:`HubRepo` the spec names; a name that is neither is
    returned as its path, for the caller's own "no such folder" error."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    parsed = parse_repo_spec(spec)
    if parsed is None:
        return path
    return HubRepo(parsed[0], parsed[1], offline, allow_pickle_download, what=what, option=option)


#: The files of an adapter repo, in the order they are tried (safetensors first: it cannot carry code).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def resolve_adapter(
    spec: str | os.PathLike[str],
    *,
    what: str = "adapter",
    option: str | None = None,
    offline: bool | None = None,
    allow_pickle_download: bool | None = None,
) -> Path:
    """The local folder of an adapter: ``spec`` itself when it exists, else the snapshot of the hub repo it names
    with ``adapter_config.json`` and one weights file fetched (safetensors preferred; a ``.bin`` only when
    ``allow_pickle_download``). A spec that is neither comes back as its path (the loader names the problem)."""
    found = resolve_input(spec, what=what, option=option, offline=offline, allow_pickle_download=allow_pickle_download)
    if isinstance(found, Path):
        return found
    repo = found
    config = repo.fetch("adapter_config.json", required=False)
    if config is None and repo.offline:
        raise repo._not_cached("adapter_config.json")
    if config is None:
        raise InputPathError(
            f"{what} {repo.name!r}: the hub repo holds no adapter_config.json; is it a PEFT adapter repo?",
            option=option,
        )
    for name in ADAPTER_WEIGHTS:
        if repo.fetch(name, required=False) is not None:
            break
    else:
        if repo.offline:
            raise repo._not_cached(" or ".join(ADAPTER_WEIGHTS))
    return config.parent

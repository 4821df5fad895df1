"""Hub inputs (#17): repo ids resolved by huggingface_hub, from its cache or from a local fake hub over HTTP.

The fake hub is python's http.server in a thread, answering what ``hf_hub_download`` and huggingface_hub's
safetensors header read ask for: HEAD and GET (with Range) on ``/{repo}/resolve/{revision}/{filename}``, with the
``X-Repo-Commit`` and ``ETag`` headers and the ``X-Error-Code`` of a missing repo, revision or file. Caches are
filled by huggingface_hub itself (``hf_hub_download`` from the fake hub), so they are laid out exactly as it lays
them out: blobs, snapshots linking into them, ``refs/main`` and a tag.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants

import checkpoints
from clitools import run_cli
from loralens.analyses.provenance import provenance
from loralens.errors import CheckpointError, InputPathError
from loralens.io import hub
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base, resolve_base
from loralens.io.hub import LargeDownloadWarning, hub_settings, parse_repo_spec

QUERY0 = "encoder.layer.0.attention.self.query.weight"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


@dataclass
class FakeHub:
    """Repos -> commits -> files; refs (branches, tags) -> commits. ``requests`` logs what was asked."""

    url: str = ""
    commits: dict[str, dict[str, dict[str, bytes]]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def add(self, repo: str, folder: Path, *, ref: str = "main", commit: str | None = None) -> str:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = (
            commit
            or hashlib.sha1(b"".join(k.encode() + hashlib.sha256(v).digest() for k, v in files.items())).hexdigest()
        )
        self.commits.setdefault(repo, {})[commit] = files
        self.refs.setdefault(repo, {})[ref] = commit
        return commit

    def downloads(self) -> list[str]:
        """Files fetched whole (GET without Range)."""
        return [f for method, f, rng in self.requests if method == "GET" and rng is None]


def _handler(fake: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            m = _RESOLVE.match(urllib.parse.urlparse(self.path).path)
            if m is None:
                return self._error(404, "RepoNotFound")
            repo, revision = m["repo"], urllib.parse.unquote(m["revision"])
            filename = urllib.parse.unquote(m["filename"])
            rng = self.headers.get("Range")
            fake.requests.append((self.command, filename, rng))
            if repo not in fake.commits:
                return self._error(404, "RepoNotFound")
            commit = fake.refs[repo].get(revision, revision)
            if commit not in fake.commits[repo]:
                return self._error(404, "RevisionNotFound")
            data = fake.commits[repo][commit].get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", commit)
            status, payload = 200, data
            if rng is not None:
                start, _, end = rng.removeprefix("bytes=").partition("-")
                payload = data[int(start) : min(int(end) + 1, len(data))]
                status = 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(payload)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{int(start) + len(payload) - 1}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake hub on localhost, HF_ENDPOINT pointing at it, the cache under tmp_path, the network allowed."""
    fake = FakeHub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # huggingface_hub read the variable at import
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def _cache(fake: FakeHub, repo: str, revision: str | None = None) -> None:
    """Fill the cache the way huggingface_hub does: hf_hub_download of every file of ``revision``."""
    commit = fake.refs[repo].get(revision or "main", revision or "main")
    for name in fake.commits[repo][commit]:
        huggingface_hub.hf_hub_download(repo, name, revision=revision, endpoint=fake.url, cache_dir=hub.hub_cache_dir())


@pytest.fixture(scope="module")
def sharded_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.bert_base(tmp_path_factory.mktemp("sharded"), layers=2, hidden=32, fmt="sharded")


@pytest.fixture(scope="module")
def bert_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.bert_base(tmp_path_factory.mktemp("bert-v1"), layers=2, hidden=32, seed=7)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("roberta-base", ("roberta-base", None)),
        ("meta-llama/Llama-2-7b-hf", ("meta-llama/Llama-2-7b-hf", None)),
        ("org/my-lora@v1.0", ("org/my-lora", "v1.0")),
        ("org/my-lora@refs/pr/1", ("org/my-lora", "refs/pr/1")),
        ("/abs/folder", None),
        ("./rel", None),
        ("~/x", None),
        ("a/b/c", None),
        ("org--x/y", None),
        ("a..b", None),
    ],
)
def test_repo_specs(spec: str, want: tuple[str, str | None] | None) -> None:
    assert parse_repo_spec(spec) == want


# ------------------------------------------------------------------------------------ offline, by name


def test_offline_by_name_and_revision(fake_hub: FakeHub, tiny_bert: Path, bert_v1: Path) -> None:
    main = fake_hub.add("acme/tiny-bert", tiny_bert)
    v1 = fake_hub.add("acme/tiny-bert", bert_v1, ref="v1")
    _cache(fake_hub, "acme/tiny-bert")
    _cache(fake_hub, "acme/tiny-bert", "v1")
    fake_hub.requests.clear()
    cache = hub.hub_cache_dir() / "models--acme--tiny-bert"
    assert (cache / "refs" / "main").read_text() == main and (cache / "refs" / "v1").read_text() == v1
    assert (cache / "snapshots" / main / "model.safetensors").is_symlink()

    plain = open_base(tiny_bert)
    base = open_base("acme/tiny-bert", offline=True)
    assert base.hub is not None and base.hub.record() == {"repo_id": "acme/tiny-bert", "revision": "main",
                                                          "commit_hash": main}  # fmt: skip
    assert base.shapes == plain.shapes
    torch.testing.assert_close(base.read([QUERY0])[QUERY0], plain.read([QUERY0])[QUERY0], rtol=0, atol=0)

    tagged = open_base("acme/tiny-bert@v1", offline=True)
    assert tagged.hub is not None and tagged.hub.commit_hash == v1
    by_commit = open_base(f"acme/tiny-bert@{v1}", offline=True)
    want = open_base(bert_v1).read([QUERY0])[QUERY0]
    for b in (tagged, by_commit):
        torch.testing.assert_close(b.read([QUERY0])[QUERY0], want, rtol=0, atol=0)
    assert not torch.equal(want, plain.read([QUERY0])[QUERY0])
    with hub_settings(offline=True):  # the CLI's way: a default for everything inside
        assert resolve_base("acme/tiny-bert") == cache / "snapshots" / main
    assert fake_hub.requests == []  # offline never touched the network


def test_offline_follows_hf_hub_offline(fake_hub: FakeHub, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add("acme/tiny-bert", tiny_bert)
    _cache(fake_hub, "acme/tiny-bert")
    fake_hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert open_base("acme/tiny-bert").shapes[QUERY0] == (32, 32)
    assert fake_hub.requests == []


def test_missing_name_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(
        InputPathError, match=r"'roberta-base'.*not in the local Hugging Face cache.*hf_hub_download"
    ) as e:
        open_base("roberta-base", offline=True)
    assert "\n" not in str(e.value) and e.value.option == "offline"
    with pytest.raises(InputPathError, match="no such folder.*not in the local Hugging Face cache") as e:
        load_lora_adapter("org/my-lora", offline=True)
    assert "\n" not in str(e.value) and e.value.option == "offline"


def test_missing_revision_offline_names_the_cached_ones(fake_hub: FakeHub, tiny_bert: Path) -> None:
    main = fake_hub.add("acme/tiny-bert", tiny_bert)
    _cache(fake_hub, "acme/tiny-bert")
    with pytest.raises(InputPathError, match=rf"revision 'v9' is not in the local.*holds main, {main[:12]}") as e:
        open_base("acme/tiny-bert@v9", offline=True)
    assert "\n" not in str(e.value) and e.value.option == "offline"


def test_missing_repo_and_revision_online(fake_hub: FakeHub, tiny_bert: Path) -> None:
    fake_hub.add("acme/tiny-bert", tiny_bert)
    with pytest.raises(InputPathError, match="no such repo on the hub") as e:
        open_base("acme/nothing")
    assert e.value.option == "base"
    with pytest.raises(InputPathError, match="has no revision 'v9'"):
        open_base("acme/tiny-bert@v9")


# ----------------------------------------------------------------------------- downloads: only what is needed


def test_sharded_base_downloads_only_the_shards_read(fake_hub: FakeHub, sharded_bert: Path) -> None:
    """Checked against the fake hub over HTTP: headers by ranged reads, then one shard for one tensor."""
    fake_hub.add("acme/sharded", sharded_bert)
    index = open_base(sharded_bert)
    shards = sorted(p.name for p in index.weight_files)
    assert len(shards) > 2
    base = open_base("acme/sharded")
    assert base.shapes == index.shapes and base.keys == index.keys
    assert fake_hub.downloads() == ["config.json", "model.safetensors.index.json"]
    ranged = {f for method, f, rng in fake_hub.requests if rng is not None}
    assert ranged == set(shards)  # every shard's header, none of their data

    got = base.read([QUERY0])[QUERY0]
    needed = index.files[QUERY0].name
    assert fake_hub.downloads() == ["config.json", "model.safetensors.index.json", needed]
    torch.testing.assert_close(got, index.read([QUERY0])[QUERY0], rtol=0, atol=0)
    snapshot = base._repo.snapshot if base._repo else None
    assert snapshot is not None and sorted(p.name for p in snapshot.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", needed]
    )

    # offline afterwards: the cached shard reads, an uncached one says what to fetch
    offline = open_base("acme/sharded", offline=True)
    torch.testing.assert_close(offline.read([QUERY0])[QUERY0], got, rtol=0, atol=0)
    other = next(k for k, f in index.files.items() if f.name != needed)
    with pytest.raises(InputPathError, match=rf"{index.files[other].name} is not in the local Hugging Face cache"):
        offline.read([other])
    with pytest.raises(InputPathError, match="while offline"):
        _ = offline.shapes[other]


def test_resolve_base_fetches_every_shard(fake_hub: FakeHub, sharded_bert: Path) -> None:
    fake_hub.add("acme/sharded", sharded_bert)
    folder = resolve_base("acme/sharded")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in sharded_bert.iterdir())


def test_bin_base_is_not_downloaded_unasked(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add("acme/pickled", checkpoints.bert_base(tmp_path / "bin", layers=2, hidden=32, fmt="bin"))
    with pytest.raises(CheckpointError, match="pickle.*runs code.*allow_pickle_download=True") as e:
        open_base("acme/pickled")
    assert e.value.option == "allow_pickle_download"
    assert "pytorch_model.bin" not in fake_hub.downloads()
    base = open_base("acme/pickled", allow_pickle_download=True)
    assert base.shapes[QUERY0] == (32, 32)
    assert "pytorch_model.bin" in fake_hub.downloads()


def test_large_downloads_are_announced(fake_hub: FakeHub, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add("acme/tiny-bert", tiny_bert)
    monkeypatch.setattr(hub, "DOWNLOAD_NOTICE_BYTES", 1000)
    seen: list[tuple[str, str, int]] = []
    with hub_settings(on_download=lambda *a: seen.append(a)):
        open_base("acme/tiny-bert").read([QUERY0])
    size = (tiny_bert / "model.safetensors").stat().st_size
    assert seen == [("acme/tiny-bert", "model.safetensors", size)]
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.hub_cache_dir().parent / "hub2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_base("acme/tiny-bert").read([QUERY0])
    assert [type(w.message) for w in caught] == [LargeDownloadWarning]


# ------------------------------------------------------------------------------------------------ adapters


def test_adapter_repo_fetches_config_and_weights(fake_hub: FakeHub, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    fake_hub.add("org/my-lora", tiny_bert_adapter)
    fake_hub.add("acme/tiny-bert", tiny_bert)
    adapter = load_lora_adapter("org/my-lora")
    assert sorted(fake_hub.downloads()) == ["adapter_config.json", "adapter_model.safetensors"]
    local = load_lora_adapter(tiny_bert_adapter)
    assert list(adapter.modules) == list(local.modules)
    torch.testing.assert_close(adapter.modules["query"].A, local.modules["query"].A, rtol=0, atol=0)

    base = open_base("acme/tiny-bert")
    assert {f["name"] for f in provenance(base, adapter)["base"]["files"]} == {"config.json"}  # nothing read yet
    base.read([QUERY0])
    record = provenance(base, adapter)
    commit = fake_hub.refs["org/my-lora"]["main"]
    assert record["adapter"]["hub"] == {"repo_id": "org/my-lora", "revision": "main", "commit_hash": commit}
    assert record["base"]["hub"]["repo_id"] == "acme/tiny-bert"
    assert record["adapter"]["sha256"] == hashlib.sha256((tiny_bert_adapter / "adapter_model.safetensors")
                                                         .read_bytes()).hexdigest()  # fmt: skip
    assert {f["name"] for f in record["base"]["files"]} == {"config.json", "model.safetensors"}
    assert "hub" not in provenance(open_base(tiny_bert), local)["adapter"]

    fake_hub.requests.clear()
    assert load_lora_adapter("org/my-lora", offline=True).path == adapter.path
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_conversion_offline_from_the_cache(
    fake_hub: FakeHub, tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path
) -> None:
    """``loralens --offline conversion --base <cached repo> --adapter <cached adapter repo> --json``."""
    base_commit = fake_hub.add("acme/tiny-bert", tiny_bert)
    fake_hub.add("org/my-lora", tiny_bert_adapter)
    _cache(fake_hub, "acme/tiny-bert")
    _cache(fake_hub, "org/my-lora")
    fake_hub.requests.clear()
    out = tmp_path / "out"
    argv = ["conversion", "--base", "acme/tiny-bert", "--adapter", "org/my-lora", "--out", out, "--json"]
    done = run_cli("--offline", *argv)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]
    inputs = json.loads((out / "conversion.json").read_text())["inputs"]
    assert inputs["base"]["hub"] == {"repo_id": "acme/tiny-bert", "revision": "main", "commit_hash": base_commit}
    assert inputs["adapter"]["hub"]["repo_id"] == "org/my-lora"
    assert fake_hub.requests == []


def test_cli_offline_error_is_one_line_with_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    done = run_cli("--offline", "conversion", "--base", "acme/none", "--adapter", "org/none", "--out", tmp_path / "o")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "leave out --offline" in done.stderr, done.stderr


def test_cli_pickle_download_needs_the_flag(fake_hub: FakeHub, tmp_path: Path, tiny_bert_adapter: Path) -> None:
    fake_hub.add("acme/pickled", checkpoints.bert_base(tmp_path / "bin", layers=2, hidden=32, fmt="bin"))
    fake_hub.add("org/my-lora", tiny_bert_adapter)
    args = ["conversion", "--base", "acme/pickled", "--adapter", "org/my-lora", "--out", tmp_path / "o"]
    refused = run_cli(*args)
    assert refused.returncode == 2 and "pass --allow-pickle-download" in refused.stderr, refused.stderr
    done = run_cli("--allow-pickle-download", *args)
    assert done.returncode == 0, done.stderr

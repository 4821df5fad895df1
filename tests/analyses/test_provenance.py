"""Provenance and reproducibility: every output names its inputs by SHA-256, and reruns are byte-identical."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoints
import loralens
from loralens.analyses import provenance as provenance_module
from loralens.analyses.provenance import file_record, provenance


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_provenance_hashes_every_input_file(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    sharded = checkpoints.bert_base(tmp_path / "sharded", fmt="sharded")
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    record = provenance(loralens.open_base(sharded), adapter)
    base_files = {f["name"]: f for f in record["base"]["files"]}
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert set(base_files) == {*shards, "model.safetensors.index.json", "config.json"}
    for name, f in base_files.items():
        assert f["sha256"] == _sha(sharded / name) and f["bytes"] == (sharded / name).stat().st_size
    adapter_files = {f["name"]: f["sha256"] for f in record["adapter"]["files"]}
    assert adapter_files == {
        n: _sha(tiny_bert_adapter / n) for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert record["versions"]["loralens"] == loralens.__version__ and record["versions"]["torch"]


def test_large_files_are_identified_by_header(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_bert / "model.safetensors"
    monkeypatch.setattr(provenance_module, "FULL_HASH_LIMIT", 16)  # every real file is "large" now
    record = file_record(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert record == {
        "name": "model.safetensors",
        "bytes": len(data),
        "sha256": None,
        "header_sha256": hashlib.sha256(data[8 : 8 + n]).hexdigest(),
    }


def _cli(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "loralens", *map(str, args)], capture_output=True, timeout=300)


def test_same_inputs_and_seed_give_byte_identical_outputs(
    tmp_path: Path, minilm_path: Path, vader_adapter: Path
) -> None:
    common = ("--base", minilm_path, "--adapter", vader_adapter, "--device", "cpu")
    first, second = (_cli("similarity", *common, "--seed", "3", "--json") for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    settings = json.loads(first.stdout)["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "float64" and settings["seed"] == 3
    assert settings["inputs"]["versions"]["loralens"] == loralens.__version__
    other_seed = _cli("similarity", *common, "--seed", "4", "--json")
    assert other_seed.stdout != first.stdout  # the seed really reaches the random baseline

    for out in ("a", "b"):
        proc = _cli("conversion", *common, "--out", tmp_path / out)
        assert proc.returncode == 0, proc.stderr
    for name in ("conversion.json", "conversion.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

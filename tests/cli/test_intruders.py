"""``loralens intruders`` end to end on the real MiniLM and the shipped adapter: ``--json`` equals the Python API's
``to_dict()``, ``--out`` writes its files whole, bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from clitools import run_cli
from loralens.analyses.intruders import intruder_dimensions
from loralens.examples import default_adapter
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base
from loralens.io.outputs import MARKER


def _json(proc) -> dict:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_intruders_json_and_files_equal_the_api(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "intruders"
    adapter = default_adapter()
    data = _json(run_cli("intruders", "--base", minilm_path, "--adapter", adapter, "--k", "6", "--device", "cpu",
                         "--json", "--out", out))  # fmt: skip
    api = intruder_dimensions(
        open_base(minilm_path),
        load_lora_adapter(adapter),
        k=6,
        device="cpu",
        max_memory="2GB",  # the default budget
    ).to_dict()
    assert data.pop("outputs") == [str(out / n) for n in ("intruders.json", "intruders.png", "intruders.svg")]
    assert data == json.loads(json.dumps(api))
    assert json.loads((out / "intruders.json").read_text()) == data
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "intruders.json", "intruders.png", "intruders.svg"])
    table = run_cli("intruders", "--base", minilm_path, "--adapter", adapter, "--modules", "value", "--device", "cpu")
    assert table.returncode == 0 and "Intruder dimensions" in table.stdout and "query" not in table.stdout


def test_intruders_bad_input_is_one_line(minilm_path: Path) -> None:
    for args, words in (
        (["--k", "999"], "k = 999 exceeds min(d_out, d_in) = 384"),
        (["--modules", "key"], "no module"),
    ):
        proc = run_cli("intruders", "--base", minilm_path, "--adapter", default_adapter(), *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_intruders_cache_options(minilm_path: Path, tmp_path: Path) -> None:
    """--cache-dir keeps W0's thin SVDs (#15); a cached, a warm and a --no-cache run give the same JSON."""
    args = ("intruders", "--base", minilm_path, "--adapter", default_adapter(), "--json", "--modules", "value")
    cold = _json(run_cli(*args, "--cache-dir", tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("spectral-v1/*.safetensors"))) == 6  # one per layer of value
    warm = _json(run_cli(*args, "--cache-dir", tmp_path / "c"))
    fresh = _json(run_cli(*args, "--no-cache", "--cache-dir", tmp_path / "none"))
    assert cold["modules"] == warm["modules"] == fresh["modules"]
    assert not (tmp_path / "none").exists()

"""``loralens dora`` end to end on the real MiniLM and the shipped adapters: ``--json`` equals the Python API's
``to_dict()`` (one adapter and a series), ``--out`` writes its files whole, bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clitools import record_progress, run_cli
from loralens.analyses.dora import magnitude_direction, magnitude_direction_series
from loralens.examples import default_adapter
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base
from loralens.io.outputs import MARKER
from test_schemas import assert_valid


def _json(proc) -> dict:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dora_json_and_files_equal_the_api(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "dora"
    adapter = default_adapter()
    data = _json(run_cli("dora", "--base", minilm_path, "--adapter", adapter, "--device", "cpu", "--json",
                         "--out", out))  # fmt: skip
    api = magnitude_direction(open_base(minilm_path), load_lora_adapter(adapter), device="cpu", max_memory="2GB")
    assert data.pop("outputs") == [str(out / n) for n in ("dora.json", "dora.png", "dora.svg")]
    assert data == json.loads(json.dumps(api.to_dict()))
    assert json.loads((out / "dora.json").read_text()) == data
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "dora.json", "dora.png", "dora.svg"])
    table = run_cli("dora", "--base", minilm_path, "--adapter", adapter, "--modules", "value", "--device", "cpu")
    assert table.returncode == 0 and "DoRA magnitude and direction" in table.stdout and "query" not in table.stdout


def test_dora_series_of_checkpoints(minilm_path: Path) -> None:
    adapters = [default_adapter(0), default_adapter(1)]
    argv = ["dora", "--base", minilm_path, "--adapter", adapters[0], "--adapter", adapters[1], "--device", "cpu"]
    data = _json(run_cli(*argv, "--modules", "query", "--layer-batch", "2", "--json"))
    assert_valid("dora", data)
    api = magnitude_direction_series(open_base(minilm_path), [load_lora_adapter(a) for a in adapters],
                                     modules=["query"], device="cpu", max_memory="2GB")  # fmt: skip
    assert data == json.loads(json.dumps(api.to_dict()))
    table = run_cli(*argv)
    assert table.returncode == 0 and "all checkpoints" in table.stdout


def test_dora_bad_input_is_one_line(minilm_path: Path) -> None:
    for args, words in (
        (["--modules", "key"], "no module"),
        (["--max-memory", "1kB"], "max_memory"),
        (["--dtype", "float16"], "float16"),
    ):
        proc = run_cli("dora", "--base", minilm_path, "--adapter", default_adapter(), *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_dora_passes_its_progress_bar(minilm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs the analysis under the delayed progress bar (none with --quiet, nor when piped); a series
    counts the layers of all its checkpoints on one bar."""
    import loralens.cli.dora

    record = record_progress(monkeypatch, loralens.cli.dora)
    argv = ["dora", "--base", minilm_path, "--modules", "query", "--layer-batch", "3", "--device", "cpu", "--json"]
    proc = run_cli(*argv, "--adapter", default_adapter(0), "--adapter", default_adapter(1))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert record.calls == [("layers", k, 12) for k in (3, 6, 9, 12)]  # 2 checkpoints x 6 layers of query, 3 at a time
    proc = run_cli(*argv, "--adapter", default_adapter(0), "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert record.quiet_flags == [False, True]

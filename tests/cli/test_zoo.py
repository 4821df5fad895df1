"""``loralens zoo`` end to end on the shipped adapters: ``--json`` equals the Python API's ``to_dict()``, ``--out``
writes its files, a folder named twice counts once, bad input is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clitools import record_progress, run_cli
from loralens.analyses.zoo import adapter_zoo
from loralens.examples import default_adapter
from loralens.io.adapters import load_lora_adapter


def _json(proc) -> dict:  # type: ignore[no-untyped-def]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_zoo_json_and_files_equal_the_api(tmp_path: Path) -> None:
    folders = [default_adapter(seed) for seed in (0, 1, 2)]
    out = tmp_path / "zoo"
    data = _json(run_cli("zoo", "--adapters-from", str(folders[0]) + "*", "--device", "cpu", "--json", "--out", out))
    api = adapter_zoo([load_lora_adapter(f) for f in folders], device="cpu").to_dict()
    outputs = data.pop("outputs")
    assert data == json.loads(json.dumps(api))
    assert sorted(Path(p).name for p in outputs) == ["zoo-query.png", "zoo-query.svg", "zoo-value.png",
                                                      "zoo-value.svg", "zoo.json"]  # fmt: skip
    again = _json(run_cli("zoo", "--adapter", folders[0], "--adapter", folders[1], "--adapter", folders[2],
                          "--adapter", folders[0], "--modules", "value", "--device", "cpu", "--json"))  # fmt: skip
    assert again["adapters"] == [str(f) for f in folders]  # the repeated folder counted once
    assert again["modules"]["value"] == data["modules"]["value"]


def test_zoo_bad_input_is_one_line(tmp_path: Path) -> None:
    cases = (
        (["--adapter", default_adapter()], "at least two adapters"),
        (["--adapters-from", str(tmp_path)], "no adapter folders"),
        (["--adapter", default_adapter(), "--adapter", default_adapter(1), "--modules", "key"], "--modules"),
    )
    for args, words in cases:
        proc = run_cli("zoo", *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_zoo_passes_its_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs the zoo under the delayed progress bar (none with --quiet, nor when piped) and the bar
    counts the compared layers."""
    import loralens.cli.zoo

    record = record_progress(monkeypatch, loralens.cli.zoo)
    args = ["zoo", "--adapter", default_adapter(0), "--adapter", default_adapter(1), "--device", "cpu", "--json"]
    for extra in ([], ["--quiet"], ["-q"]):
        proc = run_cli(*args, "--modules", "query", *extra)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert record.quiet_flags == [False, True, True]
    assert record.calls == [("layers", k, 6) for k in range(1, 7)] * 3  # MiniLM: 6 layers of query, each run


def test_zoo_reads_each_layer_of_the_folders_when_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command opens the folders without reading their factors and streams them: each adapter's factors are
    read one module-layer at a time (#16), never a whole adapter."""
    import loralens.analyses.zoo
    import loralens.io.adapters

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the zoo command loaded an adapter whole")

    reads: list[tuple[str, str, int]] = []
    real = loralens.analyses.zoo.read_layer_factors

    def recording(adapter: Any, module: str, position: int) -> Any:
        reads.append((str(adapter.path), module, position))
        return real(adapter, module, position)

    monkeypatch.setattr(loralens.io.adapters, "load_lora_adapter", refuse)
    monkeypatch.setattr(loralens.analyses.zoo, "read_layer_factors", recording)
    folders = [default_adapter(0), default_adapter(1)]
    proc = run_cli("zoo", "--adapter", folders[0], "--adapter", folders[1], "--modules", "query", "--device", "cpu",
                   "--json", "--quiet")  # fmt: skip
    api = adapter_zoo([load_lora_adapter(f) for f in folders], modules=["query"], device="cpu").to_dict()
    assert _json(proc) == json.loads(json.dumps(api))
    assert reads == [(str(f), "query", p) for p in range(6) for f in folders]

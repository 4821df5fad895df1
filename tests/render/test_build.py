"""build_report's progress: one call as each analysis starts, counts increasing to the total; the CLI passes its
delayed progress bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from clitools import record_progress, run_cli
from loralens.analyses.engine import base_for
from loralens.io.adapters import load_lora_adapter
from loralens.render.build import build_report


@pytest.mark.slow  # builds a whole report or several figures: make test runs it, test-fast does not
def test_progress_counts_each_analysis(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    adapter = load_lora_adapter(tiny_bert_adapter)
    build_report(
        base_for(adapter, tiny_bert), adapter, overlap=adapter, device="cpu", null_draws=0,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )  # fmt: skip
    steps = [c for c in calls if c[0].startswith("report: ")]
    assert [s for s, _, _ in steps] == [
        "report: similarity (Figure 1)",
        "report: amplification",
        "report: spectra",
        "report: overlap",
        "report: figures and tables",
        "report: figures and tables",
    ]
    assert [d for _, d, _ in steps] == [0, 1, 2, 3, 4, 5] and {t for _, _, t in steps} == {5}
    assert any(stage == "solve" for stage, _, _ in calls)  # Figure 1's own progress passes through


@pytest.mark.slow  # builds a whole report or several figures: make test runs it, test-fast does not
def test_the_report_command_passes_its_progress_bar(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loralens.cli.figures

    record = record_progress(monkeypatch, loralens.cli.figures)
    args = ["report", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--device", "cpu", "--no-lowrank"]
    proc = run_cli(*args, "--null-draws", "0", "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    assert record.quiet_flags == [False]
    assert [(s, d, t) for s, d, t in record.calls if s.startswith("report: ")] == [
        ("report: similarity (Figure 1)", 0, 2),
        ("report: figures and tables", 1, 2),
        ("report: figures and tables", 2, 2),
    ]

"""The command line: outputs, --json, and one-line errors with exit code 2 (those through a real subprocess)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from clitools import run_cli, run_cli_subprocess


def test_similarity_json_on_the_real_adapter(minilm_path: Path, vader_adapter: Path) -> None:
    proc = run_cli("similarity", "--base", minilm_path, "--adapter", vader_adapter, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"modules", "settings"}
    assert set(out["modules"]) == {"query", "value"}
    for factors in out["modules"].values():
        assert set(factors) == {"A", "B", "BA"}
        for f in factors.values():
            assert len(f["phi"]) == 6 and all(len(row) == 6 for row in f["phi"])
            assert len(f["random_phi"]) == 6
            assert f["random_expected"] == pytest.approx(8 / 384)
            assert f["phi"][2][2] == pytest.approx(1.0)
            assert 0 <= f["mean_offdiag"] <= 1
            w = f["w_null"]  # the W-conditioned null, 20 draws by default
            assert w["draws"] == 20 and len(w["phi_mean"]) == len(w["p"]) == len(w["z"]) == 6
            assert f["random_expected"] < w["mean_offdiag"] < 1 and w["mean_offdiag_std"] > 0
            assert all(0 < p <= 1 for row in w["p"] for p in row) and None not in sum(w["z"], [])
    settings = out["settings"]
    assert settings["side"] == "left" and settings["device"] == "cpu" and settings["dtype"] == "float64"
    assert settings["layers"] == {"query": list(range(6)), "value": list(range(6))}
    assert settings["inputs"]["adapter"]["sha256"]
    assert settings["null_draws"] == 20 and "seeded_generator" in settings["w_null_baseline"]


def test_similarity_table_and_options(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    proc = run_cli(
        "similarity",
        "--base",
        tiny_bert,
        "--adapter",
        tiny_bert_adapter,
        "--modules",
        "value",
        "--i",
        "2",
        "--j",
        "3",
        "--side",
        "left",
    )
    assert proc.returncode == 0, proc.stderr
    assert "value" in proc.stdout and "query" not in proc.stdout
    assert "random" in proc.stdout and "0.0938" in proc.stdout  # max(2, 3) / 32
    assert "W-null" in proc.stdout and "share of excess" in proc.stdout and " +- " in proc.stdout


def test_piped_output_is_neither_wrapped_nor_cut(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """Piped stdout (run_cli's is not a terminal) gets whole lines: no table cell cut to an ellipsis, no path
    broken at 80 columns."""
    deep = tmp_path / ("a-long-folder-name-" * 5) / "adapter"
    shutil.copytree(tiny_bert_adapter, deep)
    proc = run_cli("similarity", "--base", tiny_bert, "--adapter", deep)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) > 80  # the table is wider than a terminal's default
    header = next(line for line in proc.stdout.splitlines() if "share of excess" in line)
    assert "W-null" in header
    out = deep.parent / "conversion-output"
    proc = run_cli("conversion", "--base", tiny_bert, "--adapter", deep, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert any(line.endswith(str(out / "conversion.json")) for line in proc.stdout.splitlines()), proc.stdout


def test_similarity_says_which_matrices_it_does_not_print(tmp_path: Path) -> None:
    base = checkpoints.bert_base(tmp_path / "deep", layers=18, hidden=16, heads=2)
    adapter = checkpoints.lora_adapter(base, tmp_path / "lora", arch="bert", r=2, targets=["value"])
    proc = run_cli("similarity", "--base", base, "--adapter", adapter, "--null-draws", "0")
    assert proc.returncode == 0, proc.stderr
    assert "phi matrices of value not printed (over 16 layers): --json has them" in proc.stdout
    assert "L17" not in proc.stdout


def test_conversion_explains_least_squares_residuals(tmp_path: Path, tiny_bert: Path) -> None:
    adapter = checkpoints.lora_adapter(tiny_bert, tmp_path / "ffn", arch="bert", r=2, targets=["intermediate.dense"])
    proc = run_cli("conversion", "--base", tiny_bert, "--adapter", adapter, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    # tiny_bert's intermediate.dense is 128 x 32: a random factor leaves sqrt(1 - 32/128) = 0.87 outside W's range
    assert "not square: no inverse exists" in proc.stdout and "a random factor gives about 0.87" in proc.stdout


def test_similarity_null_draws_option(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    flags = ("--base", tiny_bert, "--adapter", tiny_bert_adapter, "--modules", "value", "--device", "cpu")
    off = json.loads(run_cli("similarity", *flags, "--null-draws", "0", "--json").stdout)
    three = json.loads(run_cli("similarity", *flags, "--null-draws", "3", "--json").stdout)
    assert off["settings"]["null_draws"] == 0 and off["modules"]["value"]["A"]["w_null"] is None
    assert three["modules"]["value"]["A"]["w_null"]["draws"] == 3
    for f in ("A", "B", "BA"):  # the W-null is additive: the paper's numbers do not move
        for key in ("phi", "random_phi", "mean_offdiag", "random_mean_offdiag"):
            assert off["modules"]["value"][f][key] == three["modules"]["value"][f][key]
    proc = run_cli("similarity", *flags, "--null-draws", "-2")
    assert proc.returncode == 2 and "null_draws must be 0" in proc.stderr and "--null-draws" in proc.stderr


def test_base_defaults_to_the_adapter_config(tmp_path: Path, tiny_bert: Path) -> None:
    adapter = checkpoints.lora_adapter(tiny_bert, tmp_path / "a", arch="bert", base_name=str(tiny_bert))
    proc = run_cli("similarity", "--adapter", adapter, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["inputs"]["base"]["path"] == str(tiny_bert)


def test_conversion_writes_safetensors_and_json(tmp_path: Path, minilm_path: Path, vader_adapter: Path) -> None:
    out = tmp_path / "results"
    proc = run_cli("conversion", "--base", minilm_path, "--adapter", vader_adapter, "--out", out)
    assert proc.returncode == 0, proc.stderr
    tensors = load_file(out / "conversion.safetensors")
    assert sorted(tensors) == sorted(f"{m}.{f}" for m in ("query", "value") for f in ("A", "B", "BA"))
    assert tensors["value.A"].shape == (6, 384, 8) and tensors["value.B"].shape == (6, 384, 8)
    assert tensors["value.BA"].shape == (6, 384, 384) and tensors["value.A"].dtype == torch.float64
    summary = json.loads((out / "conversion.json").read_text())
    value = summary["modules"]["value"]
    assert value["convention"] == "solve" and value["layers"] == list(range(6))
    assert value["shapes"]["A"] == [6, 384, 8] and value["scaling"] == [1.0] * 6
    assert max(value["residual_B"]) < 1e-10 and min(value["condition_1norm_estimate"]) > 1
    assert "solve" in summary["conventions"]
    assert sorted(p.name for p in out.iterdir()) == [".loralens-output", "conversion.json", "conversion.safetensors"]


def test_conversion_json_and_rerun_needs_force(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    out = tmp_path / "o"
    argv = ["conversion", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out, "--json"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"] == [str(out / "conversion.safetensors"), str(out / "conversion.json")]
    before = (out / "conversion.json").read_bytes()
    refused = run_cli(*argv)
    assert refused.returncode == 2 and "pass --force" in refused.stderr and refused.stdout == ""
    assert (out / "conversion.json").read_bytes() == before
    forced = run_cli(*argv, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == [".loralens-output", "conversion.json", "conversion.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or old folder left beside it


def test_help_explains() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0 and "conversion" in proc.stdout and "similarity" in proc.stdout
    proc = run_cli("similarity", "--help")
    assert "--side" in proc.stdout and "Figure 1" in proc.stdout


def test_help_fits_one_screen_grouped(monkeypatch: pytest.MonkeyPatch) -> None:
    """`loralens --help` at 80 columns: one line per command, in four groups, under 40 lines in all."""
    monkeypatch.setenv("COLUMNS", "80")
    text = run_cli("--help").stdout
    lines = text.splitlines()
    assert len(lines) < 40, text
    panels = [line.split("─ ")[1].split(" ")[0] for line in lines if line.startswith("╭─ ")]
    assert panels == ["Options", "Analysis", "Report", "Training", "CondLoRA"]
    commands = [line.split()[1] for line in lines if line.startswith("│ ") and not line.startswith("│ -")]
    expected = ["conversion", "similarity", "overlap", "amplification", "spectra", "intruders", "zoo", "dora",
                "demo", "figure", "report", "train", "reproduce", "compare", "params", "export"]  # fmt: skip
    assert commands == expected, text  # a wrapped summary would add a continuation line here


def test_in_process_runner_matches(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    result = run_cli("similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["modules"]["query"]["A"]["i"] == 4


def _bad_inputs(tmp: Path, tiny_bert: Path, adapter: Path, minilm: Path) -> list[tuple[str, list[str | Path], str]]:
    """(case, argv, expected words in the one-line error)."""
    cases: list[tuple[str, list[str | Path], str]] = [
        ("missing adapter", ["similarity", "--base", tiny_bert, "--adapter", tmp / "nope"], "no such adapter folder"),
        ("missing base", ["similarity", "--base", tmp / "nobase", "--adapter", adapter], "not a folder"),
        ("adapter of another base", ["similarity", "--base", minilm, "--adapter", adapter], "another base"),
        ("i above rank", ["similarity", "--base", tiny_bert, "--adapter", adapter, "--i", "9"], "exceeds the rank"),
        ("unknown module", ["similarity", "--base", tiny_bert, "--adapter", adapter, "--modules", "key"], "matches no"),
        (
            "output is a file",
            ["conversion", "--base", tiny_bert, "--adapter", adapter, "--out", tmp / "f.txt"],
            "is a file",
        ),
    ]
    (tmp / "f.txt").write_text("x")

    nan = tmp / "nan-adapter"
    shutil.copytree(adapter, nan)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file(tensors | {key: torch.full_like(tensors[key], float("nan"))}, str(nan / "adapter_model.safetensors"))
    cases.append(("NaN in adapter", ["similarity", "--base", tiny_bert, "--adapter", nan], "NaN or Inf"))

    singular = tmp / "singular-base"
    shutil.copytree(tiny_bert, singular)
    base = load_file(tiny_bert / "model.safetensors")
    k = "encoder.layer.0.attention.self.query.weight"
    base[k] = torch.zeros_like(base[k])
    save_file(base, str(singular / "model.safetensors"))
    cases.append(("singular W0", ["similarity", "--base", singular, "--adapter", adapter], "singular at layers [0]"))

    truncated = tmp / "truncated-base"
    shutil.copytree(tiny_bert, truncated)
    checkpoints.truncate_file(truncated / "model.safetensors", 1000)
    cases.append(("truncated base", ["similarity", "--base", truncated, "--adapter", adapter], "corrupt or truncated"))
    return cases


@pytest.mark.slow  # tens of seconds: make test runs it, make test-fast does not
def test_bad_input_gives_one_line_and_exit_2(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, minilm_path: Path
) -> None:
    for case, argv, words in _bad_inputs(tmp_path, tiny_bert, tiny_bert_adapter, minilm_path):
        proc = run_cli_subprocess(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (case, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr)
        assert words in lines[0], (case, lines[0])
        assert "Traceback" not in proc.stderr and proc.stdout == "", case
    assert not (tmp_path / "f.txt.tmp").exists()


def test_similarity_json_is_the_python_apis_to_dict(minilm_path: Path) -> None:
    """``similarity --json`` is ``adapter_similarity(...)``'s to_dict() for one adapter and
    ``similarity_reports_to_dict`` for several: run settings and inputs recorded by the library."""
    import loralens
    from loralens.analyses.similarity import adapter_similarity, similarity_reports_to_dict
    from loralens.examples import default_adapter
    from loralens.io.outputs import json_text

    folders = [default_adapter(0), default_adapter(1)]
    loras = [loralens.load_lora_adapter(f) for f in folders]
    base = loralens.base_for(loras[0], minilm_path)
    flags = ("--base", minilm_path, "--modules", "value", "--max-memory", "1GB", "--json", "--device", "cpu")
    reports = adapter_similarity(base, loras, modules=["value"], device="cpu", max_memory="1GB")

    proc = run_cli("similarity", "--adapter", folders[0], *flags)
    assert proc.returncode == 0, proc.stderr
    one = json.loads(proc.stdout)
    (alone,) = adapter_similarity(base, loras[:1], modules=["value"], device="cpu", max_memory="1GB")
    assert one == json.loads(json_text(alone.to_dict()))
    assert one["settings"]["max_memory"] == 10**9 and one["settings"]["dtype"] == "float64"
    proc = run_cli("similarity", "--adapter", folders[0], "--adapter", folders[1], *flags)
    assert proc.returncode == 0, proc.stderr
    many = json.loads(proc.stdout)
    assert many == json.loads(json_text(similarity_reports_to_dict(reports, [str(f) for f in folders])))
    assert [e["inputs"]["adapter"]["path"] for e in many["adapters"]] == [str(f) for f in folders]
    assert "adapter" not in many["settings"]["inputs"] and "base" in many["settings"]["inputs"]


def test_a_relative_recorded_base_from_another_working_directory(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path
) -> None:
    """adapter_config.json records the base relative to where training ran ("smol-base"): found beside the adapter
    from any working directory; a value that resolves nowhere is one error line naming adapter_config.json and
    --base."""
    shutil.copytree(tiny_bert, tmp_path / "run" / "smol-base")
    for name, recorded in (("adapter", "smol-base"), ("lost", "gone-base")):
        shutil.copytree(tiny_bert_adapter, tmp_path / "run" / name)
        config = json.loads((tmp_path / "run" / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = recorded
        (tmp_path / "run" / name / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "elsewhere").mkdir()
    args = ("similarity", "--modules", "value", "--device", "cpu", "--json", "--adapter")
    proc = run_cli(*args, tmp_path / "run" / "adapter", cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["inputs"]["base"]["path"] == str(tmp_path / "run" / "smol-base")
    lost = run_cli(*args, tmp_path / "run" / "lost", cwd=tmp_path / "elsewhere")
    lines = lost.stderr.strip().splitlines()
    assert lost.returncode == 2 and len(lines) == 1, lost.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'run' / 'lost' / 'adapter_config.json'}: its base_model_name")
    assert "'gone-base'" in lines[0] and "pass --base <model folder>" in lines[0]


def test_adapter_tensors_left_out_are_one_warning_line(tmp_path: Path, tiny_bert: Path) -> None:
    """A LoRA on pooler.dense is not analysed: one warning line per command names it; the result is unchanged."""
    pooled = checkpoints.lora_adapter(tiny_bert, tmp_path / "pooled", arch="bert", targets=["query", "pooler.dense"])
    proc = run_cli("similarity", "--base", tiny_bert, "--adapter", pooled, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), proc.stderr
    assert "2 stored tensors are not analysed: LoRA factors of pooler.dense (outside the numbered layers)" in lines[0]
    assert list(json.loads(proc.stdout)["modules"]) == ["query"]


def test_report_steps_share_one_progress_bar() -> None:
    """Stages "report: <analysis>" update one bar whose label names the step; other stages get their own bar."""
    from loralens.cli._app import _DelayedProgress

    bar = _DelayedProgress(0.0)
    try:
        bar("report: similarity (Figure 1)", 0, 3)
        bar("solve", 1, 4)
        bar("report: spectra", 1, 3)
        assert bar.shown and set(bar._tasks) == {"report", "solve"}
        task = bar._progress.tasks[bar._tasks["report"]]
        assert (task.description, task.completed, task.total) == ("report: spectra", 1, 3)
    finally:
        bar.close()

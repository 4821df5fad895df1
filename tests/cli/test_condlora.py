"""``loralens train / compare / params / export`` through a real subprocess: --json parsed, one-line errors, exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import roberta_base_shapes_only
from clitools import run_cli, run_cli_subprocess
from loralens.analyses.condlora_vs_lora import compare_adapters
from loralens.examples import default_adapter, default_condlora
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base
from loralens.io.condlora import load_condlora_adapter
from loralens.io.outputs import MARKER


def assert_user_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_params_json_for_roberta_base(tmp_path: Path) -> None:
    folder = roberta_base_shapes_only(tmp_path / "roberta-base")
    proc = run_cli("params", "--base", folder, "--r", "8", "--targets", "query,value", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["lora"], out["condlora"]) == (294_912, 24_576)
    assert out["ratio"] == pytest.approx(24_576 / 294_912)
    assert out["modules"]["query"]["layers"] == 12 and out["base"] == str(folder)
    table = run_cli("params", "--base", folder)
    assert table.returncode == 0 and "294,912" in table.stdout and "24,576" in table.stdout


def test_compare_json_equals_the_python_api(minilm_path: Path) -> None:
    proc = run_cli(
        "compare", "--base", minilm_path, "--lora", default_adapter(), "--condlora", default_condlora(), "--json",
        "--device", "cpu", "--seed", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"modules", "settings"} and sorted(out["modules"]) == ["query", "value"]
    expected = compare_adapters(
        open_base(minilm_path), load_lora_adapter(default_adapter()), load_condlora_adapter(default_condlora()), seed=3
    )
    for name, mc in expected.modules.items():
        for f in ("A", "B", "BA"):
            assert out["modules"][name][f] == pytest.approx(mc.phi[f].tolist(), abs=1e-9)
            assert out["modules"][name]["random"][f] == pytest.approx(mc.random[f].tolist(), abs=1e-9)
            assert out["modules"][name]["random"]["expected"][f] == pytest.approx(8 / 384)
        assert out["modules"][name]["conv_vs_theta"]["A"] == pytest.approx(mc.conv_vs_theta["A"].tolist(), abs=1e-9)
        # the W-null (default 20 draws, seeded by --seed) as the API's to_dict gives it
        api = json.loads(json.dumps(expected.to_dict()["modules"][name]))
        assert out["modules"][name]["w_null"]["draws"] == 20
        for f in ("A", "B", "BA"):
            got, want = out["modules"][name]["w_null"][f], api["w_null"][f]
            assert got["mean"] == pytest.approx(want["mean"], abs=1e-9) and got["p"] == want["p"]
        assert out["modules"][name]["conv_vs_theta"]["w_null"]["B"]["mean_over_layers"] == pytest.approx(
            api["conv_vs_theta"]["w_null"]["B"]["mean_over_layers"], abs=1e-9
        )
    assert out["settings"]["seed"] == 3 and out["settings"]["device"] == "cpu"
    assert out["settings"]["null_draws"] == 20
    table = run_cli(
        *[
            "compare",
            "--base",
            str(minilm_path),
            "--lora",
            str(default_adapter()),
            "--condlora",
            str(default_condlora()),
        ]
    )
    assert table.returncode == 0 and "mean" in table.stdout and "value" in table.stdout
    assert "against the W-conditioned null" in table.stdout and "W-null" in table.stdout


def test_compare_null_draws_option(minilm_path: Path) -> None:
    """--null-draws 0 leaves the W-null out (null blocks, the rest unchanged); 1 is a one-line error naming the
    option."""
    args = ["compare", "--base", str(minilm_path), "--lora", str(default_adapter()), "--condlora"]
    args += [str(default_condlora()), "--modules", "value", "--device", "cpu"]
    off = run_cli(*args, "--json", "--null-draws", "0")
    assert off.returncode == 0, off.stderr
    value = json.loads(off.stdout)["modules"]["value"]
    assert value["w_null"] is None and value["conv_vs_theta"]["w_null"] is None
    assert json.loads(off.stdout)["settings"]["null_draws"] == 0
    text = run_cli(*args, "--null-draws", "0")
    assert text.returncode == 0 and "W-conditioned null" not in text.stdout
    bad = run_cli(*args, "--null-draws", "1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: null_draws must be 0"), bad.stderr
    assert "--null-draws" in bad.stderr and bad.stderr.count("\n") == 1


def test_compare_many_pairs_gives_table3_per_pair_and_table2(minilm_path: Path) -> None:
    """The three shipped seed pairs in one command: each pair's Table 3 equals the single-pair command's JSON, the
    summary is their mean +- std, and Table 2 comes from the folders' metrics.json with the paired t-test."""
    from scipy import stats

    from loralens.analyses.seeds import read_metrics
    from loralens.examples import default_adapters

    args: list[str | Path] = []
    for _, lora, cond in default_adapters():
        args += ["--lora", lora, "--condlora", cond]
    proc = run_cli("compare", "--base", minilm_path, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["pairs"]) == 3
    single = json.loads(run_cli("compare", "--base", minilm_path, *args[4:8], "--json").stdout)
    assert data["pairs"][1]["modules"]["value"]["A"] == pytest.approx(single["modules"]["value"]["A"], abs=1e-9)
    row = data["summary"]["value"]["B"]
    per_pair = [p["modules"]["value"]["mean"]["B"] for p in data["pairs"]]
    assert row["per_pair"] == per_pair
    assert row["mean"] == pytest.approx(sum(per_pair) / 3, abs=1e-9)
    assert row["std"] == pytest.approx(float(torch.tensor(per_pair, dtype=torch.float64).std()), abs=1e-9)
    nulls = [p["modules"]["value"]["w_null"]["B"]["mean_over_layers"] for p in data["pairs"]]
    assert row["w_null"] == pytest.approx(sum(nulls) / 3, abs=1e-9)
    t = data["table2"]["tasks"]["rt-polarity"]
    lora_scores = [read_metrics(lo)["after"] for _, lo, _ in default_adapters()]
    cond_scores = [read_metrics(c)["after"] for _, _, c in default_adapters()]
    assert t["scores"] == {"lora": lora_scores, "condlora": cond_scores}
    assert t["paired_t"]["p_value"] == pytest.approx(float(stats.ttest_rel(cond_scores, lora_scores).pvalue))
    text = run_cli("compare", "--base", minilm_path, *args)
    assert text.returncode == 0 and "Held-out scores over seeds (Table 2)" in text.stdout
    assert "paired t-test" in text.stdout and "Table 3 over seeds" in text.stdout and "W-null" in text.stdout


def test_compare_pairs_must_match_in_number(minilm_path: Path) -> None:
    proc = run_cli(
        "compare", "--base", minilm_path, "--lora", default_adapter(), "--lora", default_adapter(),
        "--condlora", default_condlora(),
    )  # fmt: skip
    assert_user_error(proc, "--lora is given 2 times and --condlora 1 times", "paired in order")


def test_export_writes_a_peft_folder(minilm_path: Path, tmp_path: Path) -> None:
    proc = run_cli("export", "--base", minilm_path, "--condlora", default_condlora(), "--out", tmp_path / "as-lora")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "as-lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    tensors = load_file(tmp_path / "as-lora" / "adapter_model.safetensors")
    # loralens reads the export back as a LoRA adapter whose factors are the CondLoRA's A_l, B_l
    exported = load_lora_adapter(tmp_path / "as-lora")
    assert exported.modules["value"].A.shape == (6, 8, 384)
    theta_A = load_condlora_adapter(default_condlora()).thetas["value"][0]
    W = load_file(minilm_path / "model.safetensors")["encoder.layer.3.attention.self.value.weight"]
    key = "base_model.model.bert.encoder.layer.3.attention.self.value.lora_A.weight"
    torch.testing.assert_close(tensors[key], (W.double() @ theta_A.double().T).T.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_train_condlora_json(minilm_path: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "train", "--base", minilm_path, "--method", "condlora", "--task", "vader-polarity", "--steps", "4",
        "--max-length", "8", "--eval-size", "32", "--seed", "1", "--out", tmp_path / "run", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert (metrics["method"], metrics["settings"]["steps"], metrics["seed"]) == ("condlora", 4, 1)
    assert metrics["trainable_params"] == 12_288 and metrics["examples_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        MARKER,
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ]
    assert load_condlora_adapter(tmp_path / "run").base_model_name_or_path == str(minilm_path)


@pytest.mark.slow
@pytest.mark.training  # one real optimizer step on MiniLM per method, in a fresh interpreter
@pytest.mark.parametrize("method", ["lora", "condlora"])
def test_train_prints_no_library_noise(minilm_path: Path, tmp_path: Path, method: str) -> None:
    """A fresh process (warnings shown once per process would hide in this one): no FutureWarning (PeftModel reads
    transformers' deprecated is_gradient_checkpointing), no warnings.warn source line, no transformers load
    report on stderr; nothing at all there when stdout is not a terminal."""
    proc = run_cli_subprocess(
        "train", "--base", minilm_path, "--method", method, "--task", "vader-rating", "--steps", "1",
        "--max-length", "8", "--eval-size", "16", "--dev-size", "16", "--out", tmp_path / "run", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for noise in ("FutureWarning", "warnings.warn", "Warning:", "LOAD REPORT", "Loading weights"):
        assert noise not in proc.stderr, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["method"] == method


def test_user_errors_are_one_line_in_a_subprocess(minilm_path: Path, tmp_path: Path) -> None:
    # adapters swapped: the CondLoRA loader names the LoRA folder's config and the fix
    swapped = run_cli("compare", "--base", minilm_path, "--lora", default_adapter(), "--condlora", default_adapter())
    assert_user_error(swapped, "adapter_config.json", "pass it with --lora")
    bad_task = run_cli("train", "--base", minilm_path, "--method", "lora", "--task", "mnli", "--out", tmp_path / "y")
    assert_user_error(bad_task, "mnli")
    assert not (tmp_path / "y").exists()


def test_user_errors_in_process(minilm_path: Path, tmp_path: Path) -> None:
    def invoke(*args: str | Path):
        return run_cli(*args)

    def check(result, *fragments: str) -> None:
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        for fragment in fragments:
            assert fragment in result.stderr, result.stderr

    check(invoke("params", "--base", minilm_path, "--targets", "q_proj"), "'q_proj' matches no weight")
    check(invoke("params", "--base", minilm_path, "--targets", "dense"), "name one module type")
    check(invoke("params", "--base", tmp_path / "nowhere"), "nowhere", "pass --base")
    check(
        invoke("export", "--condlora", default_condlora(), "--out", tmp_path / "x", "--base", tmp_path / "nowhere"),
        "pass --base",
    )
    assert not (tmp_path / "x").exists()
    check(
        invoke("compare", "--base", minilm_path, "--lora", default_adapter(), "--condlora", tmp_path),
        "no adapter_config",
    )
    check(
        invoke(
            "compare", "--base", minilm_path, "--lora", default_adapter(), "--condlora", default_condlora(), "--i", "9"
        ),
        "module 'query' at layers [0, 1, 2, 3, 4, 5]",
    )
    authors = tmp_path / "authors"
    authors.mkdir()
    config = json.loads((default_condlora() / "adapter_config.json").read_text()) | {"use_x": "type1"}
    (authors / "adapter_config.json").write_text(json.dumps(config))
    check(invoke("export", "--base", minilm_path, "--condlora", authors, "--out", tmp_path / "z"), "use_x 'type1'")


def test_compare_json_is_the_python_apis_to_dict(minilm_path: Path) -> None:
    """``compare --json`` of several pairs is comparisons_to_dict of compare_adapters_many, with Table 2 from
    table2_from_folders; the library records device, dtype and max_memory itself."""
    from loralens.analyses.condlora_vs_lora import compare_adapters_many, comparisons_to_dict
    from loralens.analyses.seeds import table2_from_folders
    from loralens.io.outputs import json_text

    lora, cond = [default_adapter(s) for s in (0, 1)], [default_condlora(s) for s in (0, 1)]
    argv = ["compare", "--base", minilm_path, "--modules", "value", "--json", "--device", "cpu"]
    for lo, c in zip(lora, cond, strict=True):
        argv += ["--lora", lo, "--condlora", c]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    pairs = [(load_lora_adapter(lo), load_condlora_adapter(c)) for lo, c in zip(lora, cond, strict=True)]
    reports = compare_adapters_many(open_base(minilm_path), pairs, modules=["value"], device="cpu", max_memory="2GB")
    api = comparisons_to_dict(reports, table2_from_folders(lora, cond))
    assert json.loads(proc.stdout) == json.loads(json_text(api))
    assert api["settings"]["max_memory"] == 2 * 10**9 and api["table2"] is not None


def test_params_leaves_non_square_targets_out_of_condlora(minilm_path: Path) -> None:
    """MiniLM's intermediate.dense (1536 x 384) counts for LoRA, not for CondLoRA; the output names it, and the
    ratio covers the square targets (query, value: 12,288 / 73,728), as a hand count from the shapes gives."""
    argv = ["params", "--base", minilm_path, "--r", "8", "--targets", "query,value,intermediate.dense"]
    proc = run_cli(*argv, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    inter = 6 * 8 * (1536 + 384)
    assert (out["lora"], out["condlora"], out["lora_square"]) == (73_728 + inter, 12_288, 73_728)
    assert out["ratio"] == pytest.approx(1 / 6) and out["not_square"] == ["intermediate.dense"]
    assert out["modules"]["dense"]["condlora"] is None and out["modules"]["dense"]["lora"] == inter
    text = run_cli(*argv)
    assert text.returncode == 0 and text.stderr == "", text.stderr
    lines = text.stdout.splitlines()
    total = next(line for line in lines if line.strip("│ ").startswith("total"))
    assert f"{73_728 + inter:,}" in total and "12,288" in total
    dense = next(line for line in lines if "intermediate.dense" in line and "1536x384" in line)
    assert "not square" in dense and f"{inter:,}" in dense
    assert "Left out of the CondLoRA count: intermediate.dense (not square: CondLoRA is undefined there" in text.stdout
    assert "CondLoRA / LoRA = 0.1667 (1/6.0) over the square targets (LoRA there: 73,728)" in text.stdout
    plain = run_cli("params", "--base", minilm_path)
    assert "Left out" not in plain.stdout and "over the square targets" not in plain.stdout


def test_compare_prints_layers_numbered_from_one(minilm_path: Path) -> None:
    """The terminal tables number layers from 1, as the paper and the figures do, and say so; --json keeps the
    checkpoint's index."""
    args = ["compare", "--base", minilm_path, "--lora", default_adapter(), "--condlora", default_condlora()]
    args += ["--modules", "value", "--device", "cpu", "--null-draws", "2"]
    text = run_cli(*args)
    assert text.returncode == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines()]
    first = [row[1] for row in rows if len(row) > 2 and row[0] == "│" and row[1].isdigit()]
    assert first == ["1", "2", "3", "4", "5", "6"], text.stdout
    assert text.stdout.count("Layers numbered from 1 (checkpoint layer index + 1), as in the paper") == 2
    assert "layers 1-6;" in text.stdout
    data = json.loads(run_cli(*args, "--json").stdout)
    assert data["modules"]["value"]["layers"] == [0, 1, 2, 3, 4, 5]

"""``--finetuned``: a full fine-tune wherever --adapter is accepted (conversion, similarity, figure, overlap,
amplification, spectra, intruders, dora), with stdout piped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import checkpoints
import loralens
from clitools import run_cli


@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A dense random update of query and value on :func:`tiny_bert`, saved with a classifier's "bert." prefix."""
    folder = tmp_path_factory.mktemp("tiny-ft") / "model"
    return checkpoints.full_finetune(tiny_bert, folder, prefix="bert.", change="attention.self")


def test_spectra_of_a_fine_tune(tiny_bert: Path, tiny_finetune: Path) -> None:
    out = run_cli("spectra", "--base", tiny_bert, "--finetuned", tiny_finetune, "--modules", "query,value", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["modules"]) == {"query", "value"}
    # one line on stderr says what the adapter is, with the energy ranks the API gives
    ft = loralens.finetuned_adapter(loralens.open_base(tiny_bert), tiny_finetune, modules=["query"], device="cpu")
    k = ft.modules["query"].energy_rank
    span = f"{int(k.min())}-{int(k.max())}" if int(k.min()) != int(k.max()) else f"{int(k.min())}"
    assert f"query k_0.9 {span}, rank {span}, keeps >= " in out.stderr
    assert "(full fine-tune, dW = W_ft - W0 per layer)" in out.stderr and len(out.stderr.splitlines()) == 1
    fixed = run_cli("spectra", "--base", tiny_bert, "--finetuned", tiny_finetune, "--finetuned-rank", "3", "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert {r for m in json.loads(fixed.stdout)["modules"].values() for r in m["ranks"]} == {3}


def test_every_adapter_command_takes_a_fine_tune(
    tiny_bert: Path, tiny_bert_adapter: Path, tiny_finetune: Path, tmp_path: Path
) -> None:
    ft = ["--base", tiny_bert, "--finetuned", tiny_finetune]
    runs = {
        "similarity": run_cli("similarity", "--adapter", tiny_bert_adapter, *ft, "--null-draws", "2", "--json"),
        "overlap": run_cli("overlap", "--adapter", tiny_bert_adapter, *ft, "--modules", "query", "--json"),
        "amplification": run_cli("amplification", *ft, "--modules", "value", "--json"),
        "intruders": run_cli("intruders", *ft, "--k", "4", "--no-cache", "--json"),
        "dora": run_cli("dora", *ft, "--json"),
        "conversion": run_cli("conversion", *ft, "--modules", "query", "--out", tmp_path / "conv"),
        "figure": run_cli("figure", *ft, "--modules", "query", "--null-draws", "2", "--out", tmp_path / "fig"),
    }
    for name, out in runs.items():
        assert out.returncode == 0, (name, out.stderr)
    similarity = json.loads(runs["similarity"].stdout)
    assert [a["adapter"] for a in similarity["adapters"]] == [str(tiny_bert_adapter), str(tiny_finetune)]
    overlap = json.loads(runs["overlap"].stdout)
    assert overlap["modules"]["query"]["ranks"][0][0] == 4  # the adapter first, the fine-tune second
    assert (tmp_path / "conv" / "conversion.safetensors").is_file() and (tmp_path / "fig").is_dir()


def test_zoo_of_adapters_and_a_fine_tune(
    tiny_bert: Path, tiny_bert_adapter: Path, tiny_finetune: Path, tmp_path: Path
) -> None:
    second = checkpoints.lora_adapter(tiny_bert, tmp_path / "second", arch="bert", r=4, seed=3)
    args = ["zoo", "--adapter", tiny_bert_adapter, "--adapter", second, "--base", tiny_bert, "--modules", "query,value"]
    # the adapters record the base by the path they were made with, the fine-tune by --base's: one model
    out = run_cli(*args, "--finetuned", tiny_finetune, "--same-base", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["adapters"]) == 3 and data["adapters"][2] == str(tiny_finetune)
    cos = data["modules"]["query"]["cosine"]["overall"]
    assert len(cos) == 3 and abs(cos[2][2] - 1) < 1e-9
    alone = run_cli("zoo", "--adapter", tiny_bert_adapter, "--finetuned", tiny_finetune, "--json")
    assert alone.returncode == 2 and "pass --base" in alone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spectra", "--finetuned", "{ft}"], "a full fine-tune records no adapter config naming its base; pass --base"),
        (["spectra", "--base", "{base}", "--finetuned", "{ft}", "--adapter", "{adapter}"], "not both or neither"),
        (["spectra", "--base", "{base}"], "not both or neither"),
        (["spectra", "--base", "{base}", "--finetuned", "{ft}", "--finetuned-rank", "0"], "'energy' or a positive"),
        (["spectra", "--base", "{base}", "--finetuned", "{adapter}"], "this is a LoRA adapter folder"),
        (["spectra", "--base", "{base}", "--finetuned", "{ft}", "--modules", "q_proj"], "no module 'q_proj'"),
        (["overlap", "--base", "{base}", "--finetuned", "{ft}"], "exactly two adapters"),
    ],
)
def test_bad_fine_tune_input_is_one_line(
    args: list[str], message: str, tiny_bert: Path, tiny_bert_adapter: Path, tiny_finetune: Path
) -> None:
    given = [a.format(base=tiny_bert, ft=tiny_finetune, adapter=tiny_bert_adapter) for a in args]
    out = run_cli(*given)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: ") and message in out.stderr


def test_a_real_full_fine_tune_beside_the_shipped_adapter(minilm_path: Path, minilm_full_finetune: Path) -> None:
    lora = loralens.examples.default_adapter()
    args = ["--base", minilm_path, "--adapter", lora, "--finetuned", minilm_full_finetune, "--modules", "value"]
    out = run_cli("overlap", *args, "--i", "8", "--j", "8", "--json")
    assert out.returncode == 0, out.stderr
    grid = json.loads(out.stdout)["modules"]["value"]["factors"]["B"]["grid"]
    assert len(grid) == 6 and all(0 <= x <= 1 + 1e-9 for layer in grid for row in layer for x in row)
    assert "value k_0.9 " in out.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "is not a folder, not an installed model package"),
        ("nan", "holds NaN or Inf"),
        ("truncated", "model.safetensors"),
    ],
)
def test_a_damaged_fine_tune_is_one_line(damage: str, message: str, tiny_bert: Path, tmp_path: Path) -> None:
    """The shared base loader's checks reach --finetuned: a missing folder, NaN weights, a cut safetensors file."""
    folder = tmp_path / "ft"
    if damage != "missing":
        scale = float("nan") if damage == "nan" else 1e-2
        checkpoints.full_finetune(tiny_bert, folder, change="attention.self.query", scale=scale)
    if damage == "truncated":
        weights = folder / "model.safetensors"
        checkpoints.truncate_file(weights, weights.stat().st_size // 2)
    out = run_cli("spectra", "--base", tiny_bert, "--finetuned", folder, "--modules", "query", "--json")
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("error: ") and message in out.stderr
    assert str(folder) in out.stderr and "--base" not in out.stderr  # the fine-tune's fault, not the base's

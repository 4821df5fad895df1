"""Every ``--json`` output and JSON file loralens writes matches its JSON Schema in docs/schemas/.

Each command runs in-process through the real entry point (:func:`clitools.run_cli`) on tiny real checkpoints
(:func:`tiny_bert`: 2 layers, hidden 32) or, where the output needs trained runs (Table 2, ``train``), on the
real MiniLM base with the shipped adapters. The schemas are Draft 2020-12 and refer to each other by file name
(``common.schema.json#/$defs/...``), resolved here through a :class:`referencing.Registry` of the folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

import checkpoints
from clitools import run_cli
from loralens.examples import default_adapter, default_condlora

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"
REGISTRY = Registry().with_resources(
    (p.name, Resource.from_contents(json.loads(p.read_text(encoding="utf-8")))) for p in SCHEMAS.glob("*.json")
)
COMMANDS = (
    "conversion", "similarity", "compare", "params", "overlap", "amplification", "spectra", "intruders", "zoo",
    "dora", "train", "report",
)  # fmt: skip


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(REGISTRY.contents(f"{name}.schema.json"), registry=REGISTRY)


def assert_valid(name: str, doc: Any) -> None:
    errors = sorted(validator(name).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{name}: {list(e.absolute_path)}: {e.message[:300]}" for e in errors[:10])


def run_json(*args: str | Path) -> Any:
    """``loralens *args`` in-process (:func:`clitools.run_cli`); its stdout parsed as JSON."""
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """Another PEFT LoRA adapter on :func:`tiny_bert` (r = 2, another seed): a second adapter of the same base."""
    return checkpoints.lora_adapter(tiny_bert, tmp_path_factory.mktemp("bert-lora-2"), arch="bert", r=2, seed=1)


@pytest.fixture(scope="module")
def tiny_condlora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CondLoRA adapter in the authors' format for :func:`tiny_bert` (hidden 32, r = 4, query + value)."""
    return checkpoints.condlora_adapter(tmp_path_factory.mktemp("bert-condlora"), hidden=32, r=4)


# ----------------------------------------------------------------------------------------------- the schemas


@pytest.mark.parametrize("name", ["common", *COMMANDS, "reproduce", "lr-search"])
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_schema_is_listed_in_output_formats() -> None:
    page = (SCHEMAS.parent / "output-formats.md").read_text(encoding="utf-8")
    for path in SCHEMAS.glob("*.schema.json"):
        assert f"schemas/{path.name}" in page, f"docs/output-formats.md does not link {path.name}"


# ----------------------------------------------------------------------------------------------- commands


def test_conversion(tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path) -> None:
    args = ["conversion", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--device", "cpu", "--json"]
    out = run_json(*args, "--out", tmp_path / "full")
    assert_valid("conversion", out)
    assert "BA" in out["modules"]["query"]["shapes"] and out["outputs"]
    assert_valid("conversion", json.loads((tmp_path / "full" / "conversion.json").read_text()))
    factors = run_json(*args, "--out", tmp_path / "factors", "--no-product")
    assert_valid("conversion", factors)
    assert "BA" not in factors["modules"]["query"]["shapes"]


def test_similarity_one_and_several_adapters(tiny_bert: Path, tiny_bert_adapter: Path, second_adapter: Path) -> None:
    args = ["similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--device", "cpu", "--json"]
    one = run_json(*args)
    assert_valid("similarity", one)
    assert set(one) == {"modules", "settings"}
    several = run_json(*args, "--adapter", second_adapter, "--i", "2")
    assert_valid("similarity", several)
    assert len(several["adapters"]) == 2


def test_params(tiny_bert: Path) -> None:
    out = run_json("params", "--base", tiny_bert, "--r", "4", "--json")
    assert_valid("params", out)


def test_params_with_a_non_square_target(minilm_path: Path) -> None:
    out = run_json("params", "--base", minilm_path, "--targets", "query,intermediate.dense", "--json")
    assert_valid("params", out)
    assert out["not_square"] == ["intermediate.dense"] and out["modules"]["dense"]["condlora"] is None
    alone = run_json("params", "--base", minilm_path, "--targets", "intermediate.dense", "--json")
    assert_valid("params", alone)
    assert alone["ratio"] is None


def test_compare_one_pair_and_pairs_without_metrics(
    tiny_bert: Path, tiny_bert_adapter: Path, tiny_condlora: Path
) -> None:
    pair = ["--lora", tiny_bert_adapter, "--condlora", tiny_condlora]
    args = ["compare", "--base", tiny_bert, *pair, "--device", "cpu", "--json"]
    one = run_json(*args)
    assert_valid("compare", one)
    two = run_json(*args, *pair)
    assert_valid("compare", two)
    assert two["table2"] is None and two["table2_note"]  # no metrics.json in these folders


def test_compare_pairs_with_table2(minilm_path: Path) -> None:
    pairs = [a for seed in (0, 1) for a in ("--lora", default_adapter(seed), "--condlora", default_condlora(seed))]
    out = run_json("compare", "--base", minilm_path, *pairs, "--modules", "value", "--device", "cpu", "--json")
    assert_valid("compare", out)
    assert out["table2"]["tasks"]["rt-polarity"]["seeds"] == [0, 1]


@pytest.mark.parametrize("command", ["amplification", "spectra"])
def test_amplification_and_spectra(command: str, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    argv = [command, "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--device", "cpu", "--json"]
    assert_valid(command, run_json(*argv))


def test_a_full_fine_tune_as_input(tiny_bert: Path, tmp_path: Path) -> None:
    ft = checkpoints.full_finetune(tiny_bert, tmp_path / "ft", prefix="bert.", change="attention.self")
    doc = run_json("spectra", "--base", tiny_bert, "--finetuned", ft, "--device", "cpu", "--json")
    assert_valid("spectra", doc)
    identity = doc["settings"]["inputs"]["adapter"]
    assert identity["full_finetune"]["rank"] == "energy" and "sha256" not in identity
    bad = copy.deepcopy(doc)
    del bad["settings"]["inputs"]["adapter"]["full_finetune"]["tau"]
    assert not validator("spectra").is_valid(bad)


def test_intruders(tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "intruders"
    argv = ["intruders", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--k", "3", "--device", "cpu"]
    assert_valid("intruders", run_json(*argv, "--json", "--out", out))
    assert_valid("intruders", json.loads((out / "intruders.json").read_text()))


def test_zoo(tiny_bert_adapter: Path, second_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    argv = ["zoo", "--adapter", tiny_bert_adapter, "--adapter", second_adapter, "--device", "cpu"]
    assert_valid("zoo", run_json(*argv, "--json", "--out", out))
    assert_valid("zoo", json.loads((out / "zoo.json").read_text()))


def test_dora_one_and_several_adapters(
    tiny_bert: Path, tiny_bert_adapter: Path, second_adapter: Path, tmp_path: Path
) -> None:
    dora = checkpoints.dora_adapter(tiny_bert, tmp_path / "dora")
    out = tmp_path / "dora-out"
    one = run_json("dora", "--base", tiny_bert, "--adapter", dora, "--device", "cpu", "--json", "--out", out)
    assert_valid("dora", one)
    assert_valid("dora", json.loads((out / "dora.json").read_text()))
    assert one["modules"]["query"]["dora"] is True
    argv = ["dora", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--adapter", second_adapter, "--adapter", dora]
    several = run_json(*argv, "--device", "cpu", "--json")
    assert_valid("dora", several)
    assert len(several["runs"]) == 3 and several["pooled"]["value"]["n"] == 6
    doc = copy.deepcopy(one)
    doc["modules"]["query"]["dD"][0] = -1.0  # 1 - cos is never negative
    assert not validator("dora").is_valid(doc)


def test_overlap(tiny_bert: Path, tiny_bert_adapter: Path, second_adapter: Path) -> None:
    argv = ["overlap", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--adapter", second_adapter, "--json"]
    assert_valid("overlap", run_json(*argv, "--device", "cpu"))


@pytest.mark.slow  # builds a whole report or several figures: make test runs it, test-fast does not
def test_report(
    tiny_bert: Path,
    tiny_bert_adapter: Path,
    second_adapter: Path,
    tiny_condlora: Path,
    tmp_path: Path,
) -> None:
    """report.json with a CondLoRA pair and --overlap. Rendering dominates the time, so one module, 72 dpi, and
    --no-lowrank: amplification and spectra have their commands' layout there (the same schemas, tested above);
    the overlap stays because its settings differ in the report (its inputs are the two adapters only)."""
    proc = run_cli(
        "report", "--base", tiny_bert, "--lora", tiny_bert_adapter, "--condlora", tiny_condlora,
        "--overlap", second_adapter, "--no-lowrank", "--modules", "value", "--dpi", "72", "--device", "cpu",
        "--out", tmp_path / "r",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert_valid("report", report)
    assert report["comparison"] and report["parameters"]
    assert set(report["lowrank"]) == {"overlap"}  # amplification and spectra: as their commands, tested above


@pytest.mark.slow
@pytest.mark.training  # one real optimizer step on MiniLM: the make test-fast lane leaves it out
def test_train(minilm_path: Path, tmp_path: Path) -> None:
    argv = ["train", "--base", minilm_path, "--method", "lora", "--task", "vader-rating", "--steps", "1"]
    sizes = ["--max-length", "8", "--eval-size", "16", "--dev-size", "16"]
    out = run_json(*argv, *sizes, "--out", tmp_path / "run", "--json")
    assert_valid("train", out)
    assert out["metric"] == "pearson" and "majority_baseline" not in out
    assert_valid("train", json.loads((tmp_path / "run" / "metrics.json").read_text()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["lora", "condlora"])
def test_shipped_metrics(method: str, seed: int) -> None:
    folder = default_adapter(seed) if method == "lora" else default_condlora(seed)
    assert_valid("train", json.loads((folder / "metrics.json").read_text()))


ROOT = SCHEMAS.parents[1]


@pytest.mark.parametrize("experiment", ["table2-minilm", "table2-mpnet"])
def test_reproduce_table_and_status(experiment: str) -> None:
    """The committed reproductions: MiniLM's table2.json and ``--status --json`` (every run done), and MPNet's
    status wherever its run stands (Rotten Tomatoes); nothing trains."""
    folder = ROOT / "experiments" / experiment
    if (folder / "table" / "table2.json").is_file():
        assert_valid("reproduce", json.loads((folder / "table" / "table2.json").read_text()))
    args = ["reproduce", "table2", "--base", "unused", "--out", folder, "--status", "--json"]
    if experiment == "table2-mpnet":
        args += ["--targets", "q,v", "--base-name", "sentence-transformers/all-mpnet-base-v2", "--tasks", "rt-polarity"]
        args += ["--steps", "rt-polarity=1000", "--max-length", "rt-polarity=128"]
    else:
        args += ["--base-name", "sentence-transformers/all-MiniLM-L6-v2"]
    status = run_json(*args)
    assert_valid("reproduce", status)
    assert len(status["runs"]) == (12 if experiment == "table2-minilm" else 6)
    if experiment == "table2-minilm":
        assert {run["state"] for run in status["runs"]} == {"done"}


def test_lr_search_files() -> None:
    """Every lr_search.json the repository carries: the reproductions' first seeds and the shipped adapters'."""
    files = sorted((ROOT / "experiments").rglob("lr_search.json"))
    files += sorted((ROOT / "src" / "loralens" / "data").rglob("lr_search.json"))
    assert len(files) >= 6
    for path in files:
        assert_valid("lr-search", json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------- meta


def test_broken_documents_fail(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """The check can fail: a missing key, a wrong type, a phi out of range or a bad enum is each an error."""
    good = run_json("similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--device", "cpu", "--json")
    assert_valid("similarity", good)

    def broken(edit) -> Any:
        doc = copy.deepcopy(good)
        edit(doc)
        return doc

    cases = {
        "missing phi": broken(lambda d: d["modules"]["query"]["A"].pop("phi")),
        "phi as text": broken(lambda d: d["modules"]["query"]["A"].update(phi="[[1.0]]")),
        "phi above 1": broken(lambda d: d["modules"]["query"]["B"]["phi"][0].__setitem__(0, 1.5)),
        "unknown side": broken(lambda d: d["settings"].update(side="up")),
        "no settings": broken(lambda d: d.pop("settings")),
        "bad sha256": broken(lambda d: d["settings"]["inputs"]["adapter"].update(sha256="xyz")),
    }
    for what, doc in cases.items():
        assert not validator("similarity").is_valid(doc), f"{what}: accepted by similarity.schema.json"
    assert not validator("params").is_valid({"lora": "73728"}), "params.schema.json accepted a string count"
    assert not validator("train").is_valid({}), "train.schema.json accepted an empty object"

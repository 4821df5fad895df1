"""Every bad input gets a clear answer: a table of input -> exit code and one line naming the file and the fix.

Each row runs the real console entry point (:func:`loralens.cli.main`, argument parsing included) in this
process; ``tests/test_cli.py`` runs a sample of the same through a subprocess. A row passes when the exit code
is the expected one, stderr is exactly one line starting with ``error:`` that contains the expected words,
stdout is empty, and no output folder or temporary file is left behind. A row with exit code 0 is an input
that gets an answer with a caveat (a near-singular W0): stderr is then exactly one ``warning:`` line with the
expected words, and stdout holds the result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from clitools import BadInput, run_bad_input, run_cli

# ----------------------------------------------------------------------------------------------- builders


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    tensors = load_file(folder / name)
    save_file(edit(tensors), str(folder / name))
    return folder


def _set(key_end: str, make: Callable[[torch.Tensor], torch.Tensor]):
    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in t if k.endswith(key_end))
        return t | {key: make(t[key])}

    return edit


QUERY0 = "encoder.layer.0.attention.self.query.weight"


def _near_singular(d: int, smallest: float, dtype: torch.dtype) -> torch.Tensor:
    """(d, d) with singular values in [0.01, 1] and one ``smallest``: near-singular, not exactly singular."""
    rng = np.random.default_rng(5)
    Q1, Q2 = (np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(2))
    return torch.from_numpy((Q1 * np.concatenate([np.logspace(0, -2, d - 1), [smallest]])) @ Q2).to(dtype)


#: Rows whose --out folder exists (with a file in it) and must be refused without --force, and left alone.
EXISTING_OUTPUT = [
    "export into an existing folder",
    "train into an existing folder",
    "figure into an existing folder",
    "report into an existing folder",
    "overlap --out into an existing folder",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_bert_adapter: Path, minilm_path: Path):
    """case -> BadInput; files are built once for the module."""
    tmp = tmp_path_factory.mktemp("bad")
    base, adapter = str(tiny_bert), str(tiny_bert_adapter)
    sim = ["similarity", "--base", base, "--adapter"]

    def with_adapter(folder: Path) -> list[str]:
        return ["similarity", "--base", base, "--adapter", str(folder)]

    def with_base(folder: Path | str) -> list[str]:
        return ["similarity", "--base", str(folder), "--adapter", adapter]

    def adapter_copy(name: str) -> Path:
        return _copy(tiny_bert_adapter, tmp / name)

    def base_copy(name: str) -> Path:
        return _copy(tiny_bert, tmp / name)

    r: dict[str, BadInput] = {}
    # --- paths
    r["missing adapter"] = BadInput([*sim, str(tmp / "nope")], "no such adapter folder")
    r["missing base"] = BadInput(with_base(tmp / "nobase"), "not a folder")
    (tmp / "file.txt").write_text("x")
    r["adapter is a file"] = BadInput(with_adapter(tmp / "file.txt"), "expected an adapter folder")
    r["base is a text file"] = BadInput(with_base(tmp / "file.txt"), "file.txt")
    (tmp / "empty").mkdir()
    r["empty adapter folder"] = BadInput(with_adapter(tmp / "empty"), "no adapter_config.json")
    r["empty base folder"] = BadInput(with_base(tmp / "empty"), "empty")
    weights_dir = adapter_copy("weights-is-dir")
    (weights_dir / "adapter_model.safetensors").unlink()
    (weights_dir / "adapter_model.safetensors").mkdir()
    r["weights file is a folder"] = BadInput(with_adapter(weights_dir), "adapter_model.safetensors")
    r["output is a file"] = BadInput(
        ["conversion", "--base", base, "--adapter", adapter, "--out", str(tmp / "file.txt")], "is a file"
    )
    r["output on a read-only file system"] = BadInput(
        ["conversion", "--base", base, "--adapter", adapter, "--out", "/sys/loralens-out"], "cannot write the results"
    )
    # --- files
    truncated = adapter_copy("truncated")
    checkpoints.truncate_file(truncated / "adapter_model.safetensors", 100)
    r["truncated adapter"] = BadInput(with_adapter(truncated), "corrupt or truncated")
    for how in checkpoints.CORRUPTIONS:
        folder = base_copy(f"base-{how}")
        checkpoints.corrupt_safetensors_header(folder / "model.safetensors", how)
        r[f"base header: {how}"] = BadInput(with_base(folder), "model.safetensors")
    no_config = adapter_copy("no-config")
    (no_config / "adapter_config.json").unlink()
    r["adapter_config.json missing"] = BadInput(with_adapter(no_config), "no adapter_config.json")
    bad_json = adapter_copy("bad-json")
    (bad_json / "adapter_config.json").write_text("{not json")
    r["adapter_config.json invalid"] = BadInput(with_adapter(bad_json), "invalid JSON")
    ia3 = adapter_copy("ia3")
    (ia3 / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    r["unknown peft_type"] = BadInput(with_adapter(ia3), "peft_type 'IA3' is not supported")
    null_r = adapter_copy("null-r")
    text = (null_r / "adapter_config.json").read_text().replace('"r": 4', '"r": null')
    (null_r / "adapter_config.json").write_text(text)
    r["r is null"] = BadInput(with_adapter(null_r), "r is None")
    pickled = adapter_copy("pickle")
    (pickled / "adapter_model.safetensors").unlink()
    checkpoints.write_malicious_pickle(pickled / "adapter_model.bin", tmp / "pwned")
    r["pickle carrying code"] = BadInput(with_adapter(pickled), "refused to load")
    empty_sd = adapter_copy("empty-state-dict")
    save_file({}, str(empty_sd / "adapter_model.safetensors"))
    r["empty state dict"] = BadInput(with_adapter(empty_sd), "holds no tensors")
    no_weights = adapter_copy("no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    r["adapter weights missing"] = BadInput(with_adapter(no_weights), "no adapter weights")
    # --- content
    r["adapter of another base"] = BadInput(
        ["similarity", "--base", str(minilm_path), "--adapter", adapter], "another base"
    )
    no_query = base_copy("no-query")
    _edit_tensors(no_query, "model.safetensors", lambda t: {k: v for k, v in t.items() if ".query." not in k})
    r["target module absent from base"] = BadInput(with_base(no_query), "query")
    r["i above the rank"] = BadInput([*sim, adapter, "--i", "9"], "exceeds the rank")
    r["j above the rank"] = BadInput([*sim, adapter, "--j", "5"], "exceeds the rank")
    r["unknown module"] = BadInput([*sim, adapter, "--modules", "key"], "matches no")
    nan = _edit_tensors(
        adapter_copy("nan"),
        "adapter_model.safetensors",
        _set("lora_A.weight", lambda a: torch.full_like(a, float("nan"))),
    )
    r["NaN in adapter"] = BadInput(with_adapter(nan), "NaN or Inf")
    inf_base = _edit_tensors(
        base_copy("inf"), "model.safetensors", _set(QUERY0, lambda w: w.index_fill(0, torch.tensor([0]), float("inf")))
    )
    r["Inf in base"] = BadInput(with_base(inf_base), "NaN or Inf")
    zero_b = _edit_tensors(
        adapter_copy("zero-b"),
        "adapter_model.safetensors",
        lambda t: {k: (v * 0 if "lora_B" in k else v) for k, v in t.items()},
    )
    r["all-zero B (untrained)"] = BadInput(with_adapter(zero_b), "untrained")
    singular = _edit_tensors(base_copy("singular"), "model.safetensors", _set(QUERY0, torch.zeros_like))
    r["exactly singular W0"] = BadInput(with_base(singular), "singular at layers [0]")
    int_base = _edit_tensors(base_copy("int8"), "model.safetensors", _set(QUERY0, lambda w: w.to(torch.int8)))
    r["integer base weights"] = BadInput(with_base(int_base), "dequantized first")
    # --- usage
    r["bad --side"] = BadInput([*sim, adapter, "--side", "up"], "Invalid value for '--side'")
    r["bad --layer-batch"] = BadInput(
        ["conversion", "--adapter", adapter, "--out", str(tmp / "o"), "--layer-batch", "0"], "--layer-batch"
    )
    r["missing --adapter"] = BadInput(
        ["similarity"], "give at least one adapter (--adapter) or full fine-tune (--finetuned)"
    )
    r["unknown command"] = BadInput(["nosuch"], "No such command")
    # --- CondLoRA inputs (compare, report --condlora)
    cond = checkpoints.condlora_adapter(tmp / "cond", hidden=32, base_name=base)
    cond16 = checkpoints.condlora_adapter(tmp / "cond16", hidden=16)
    compare = ["compare", "--base", base, "--lora", adapter, "--condlora"]
    r["compare: CondLoRA of another hidden size"] = BadInput([*compare, str(cond16)], "another base")
    r["report --condlora of another hidden size"] = BadInput(
        ["report", "--base", base, "--lora", adapter, "--condlora", str(cond16), "--out", str(tmp / "report-16")],
        "another base",
    )
    lora3 = checkpoints.lora_adapter(checkpoints.bert_base(tmp / "bert3", layers=3), tmp / "lora3", arch="bert")
    r["compare: LoRA with more layers than the base"] = BadInput(
        ["compare", "--base", base, "--lora", str(lora3), "--condlora", str(cond)], "another base"
    )
    use_x = checkpoints.condlora_adapter(tmp / "cond-use-x", hidden=32, config={"use_x": "type1"})
    r["compare: CondLoRA config with use_x"] = BadInput([*compare, str(use_x)], "use_x 'type1'")
    r["compare --i above the rank"] = BadInput([*compare, str(cond), "--i", "5"], "exceeds the rank")
    # --- outputs that exist
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("somebody's notes\n")
    out = ["--out", str(existing)]
    r["export into an existing folder"] = BadInput(["export", "--base", base, "--condlora", str(cond), *out], "--force")
    r["train into an existing folder"] = BadInput(
        ["train", "--base", base, "--method", "lora", "--task", "vader-polarity", *out], "--force"
    )
    r["figure into an existing folder"] = BadInput(["figure", "--base", base, "--adapter", adapter, *out], "--force")
    r["report into an existing folder"] = BadInput(["report", "--base", base, "--lora", adapter, *out], "--force")
    r["overlap --out into an existing folder"] = BadInput(
        ["overlap", "--adapter", adapter, "--adapter", adapter, *out], "--force"
    )
    # --- other commands, other mismatches
    r["params: target module absent from base"] = BadInput(
        ["params", "--base", base, "--targets", "q_proj"], "'q_proj'"
    )
    lora16 = checkpoints.lora_adapter(checkpoints.bert_base(tmp / "bert16", hidden=16), tmp / "lora16", arch="bert")
    r["overlap: adapters of different bases"] = BadInput(
        ["overlap", "--adapter", adapter, "--adapter", str(lora16)], "different bases"
    )
    r["overlap --i above the rank"] = BadInput(
        ["overlap", "--adapter", adapter, "--adapter", adapter, "--i", "5"], "choose i <= 4"
    )
    big_r = checkpoints.lora_adapter(tiny_bert, tmp / "r40", arch="bert", r=40)
    r["LoRA r larger than d"] = BadInput(with_adapter(big_r), "r = 40 is larger than d = 32")
    # --- near-singular W0: least squares for that layer, one warning line, exit 0
    near = _edit_tensors(
        base_copy("near-singular"),
        "model.safetensors",
        _set(QUERY0, lambda w: _near_singular(w.shape[0], 1e-17, torch.float64)),
    )
    r["near-singular W0"] = BadInput(
        ["conversion", "--base", str(near), "--adapter", adapter, "--out", str(tmp / "near-out"), "--json"],
        "near-singular to float64 precision at layers [0]",
        code=0,
    )
    near32 = _edit_tensors(
        base_copy("near-singular-32"),
        "model.safetensors",
        _set(QUERY0, lambda w: _near_singular(w.shape[0], 1e-9, torch.float32)),
    )
    r["near-singular W0 in float32"] = BadInput(
        [*with_base(near32), "--dtype", "float32"], "least_squares_layers (use --dtype float64)", code=0
    )
    return r


CASES = [
    "missing adapter",
    "missing base",
    "adapter is a file",
    "base is a text file",
    "empty adapter folder",
    "empty base folder",
    "weights file is a folder",
    "output is a file",
    "output on a read-only file system",
    "truncated adapter",
    *(f"base header: {how}" for how in checkpoints.CORRUPTIONS),
    "adapter_config.json missing",
    "adapter_config.json invalid",
    "unknown peft_type",
    "r is null",
    "pickle carrying code",
    "empty state dict",
    "adapter weights missing",
    "adapter of another base",
    "target module absent from base",
    "i above the rank",
    "j above the rank",
    "unknown module",
    "NaN in adapter",
    "Inf in base",
    "all-zero B (untrained)",
    "exactly singular W0",
    "integer base weights",
    "bad --side",
    "bad --layer-batch",
    "missing --adapter",
    "unknown command",
    "compare: CondLoRA of another hidden size",
    "report --condlora of another hidden size",
    "compare: LoRA with more layers than the base",
    "compare: CondLoRA config with use_x",
    "compare --i above the rank",
    *EXISTING_OUTPUT,
    "params: target module absent from base",
    "overlap: adapters of different bases",
    "overlap --i above the rank",
    "LoRA r larger than d",
    "near-singular W0",
    "near-singular W0 in float32",
]


def test_the_table_is_complete(rows: dict[str, BadInput]) -> None:
    assert list(rows) == CASES and len(CASES) >= 50


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, rows: dict[str, BadInput], tmp_path: Path) -> None:
    run_bad_input(rows[case], tmp_path)


@pytest.mark.parametrize("case", EXISTING_OUTPUT)
def test_refused_outputs_are_left_alone(case: str, rows: dict[str, BadInput]) -> None:
    argv = rows[case].argv
    out = Path(argv[argv.index("--out") + 1])
    beside = sorted(p.name for p in out.parent.iterdir())
    result = run_cli(*argv)
    code, err = result.returncode, result.stderr
    assert code == 2 and "the output folder exists; replace it or choose a new one (pass --force" in err
    assert str(out) in err
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("notes.txt", "somebody's notes\n")]
    assert sorted(p.name for p in out.parent.iterdir()) == beside  # no temporary folder left beside it


def test_near_singular_W0_reports_its_residual(rows: dict[str, BadInput], tmp_path: Path) -> None:
    argv = rows["near-singular W0"].argv
    argv = [*argv[: argv.index("--out") + 1], str(tmp_path / "out"), "--json"]
    result = run_cli(*argv)
    code, out, err = result.returncode, result.stdout, result.stderr
    summary = json.loads(out)
    query, value = summary["modules"]["query"], summary["modules"]["value"]
    assert code == 0 and query["least_squares_layers"] == [0] and value["least_squares_layers"] == []
    assert "least_squares_layers" in summary["conventions"] and query["convention"] == "solve"
    assert 1e-3 < query["residual_A"][0] < 1 and query["residual_A"][1] < 1e-12  # layer 1 stays an exact solve
    for value in (query["residual_A"][0], query["residual_B"][0], query["condition_1norm_estimate"][0]):
        assert f"{value:.2g}" in err
    written = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert written["modules"]["query"]["least_squares_layers"] == [0]


def test_the_pickle_did_not_run(rows: dict[str, BadInput]) -> None:
    argv = rows["pickle carrying code"].argv
    marker = Path(argv[-1]).parent / "pwned"
    result = run_cli(*argv)
    code, err = result.returncode, result.stderr
    assert code == 2 and "refused to load" in err
    assert not marker.exists()

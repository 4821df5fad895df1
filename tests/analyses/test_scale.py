"""Scale features by construction, never by timing: memory-budgeted layer batches, many adapters sharing one
factorisation, half-precision and sharded bases, refused integer weights, --max-memory, the progress bar.

References are float64 numpy solves and the one-adapter-at-a-time results; tolerances are stated where used.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import loralens
import loralens.analyses.conversion as conversion_engine
from clitools import run_cli
from loralens.analyses.conversion import compute_conversions, compute_conversions_many
from loralens.analyses.engine import layers_per_batch, parse_memory_size
from loralens.analyses.similarity import layer_similarity, layer_similarity_many, similarity_reports_to_dict
from loralens.core.conversion import chunk_bytes, layer_working_bytes
from loralens.errors import CheckpointError, LoralensError

QUERY = "encoder.layer.{}.attention.self.query.weight"
VALUE = "encoder.layer.{}.attention.self.value.weight"


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.linalg.matrix_norm(x.double() - y.double()) / torch.linalg.matrix_norm(y.double())).max())


@pytest.fixture(scope="module")
def bert_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_bert_adapter: Path) -> list[Path]:
    """Three real PEFT adapters of tiny_bert that differ in rank, modules and layers."""
    root = tmp_path_factory.mktemp("many")
    return [
        tiny_bert_adapter,  # r = 4, query + value, layers 0-1
        checkpoints.lora_adapter(tiny_bert, root / "r2", arch="bert", r=2, seed=1),
        checkpoints.lora_adapter(
            tiny_bert, root / "r3-value-l1", arch="bert", r=3, targets=["value"], layers_to_transform=[1], seed=2
        ),
    ]


def _half_sharded_base(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """tiny_bert re-saved in ``dtype`` as two safetensors shards with an index (what save_pretrained writes)."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
    keys = sorted(tensors)
    out.mkdir(parents=True)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"model-0000{n}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", out / "config.json")
    return out


# ------------------------------------------------------------------------------------------ memory budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        (" 512 MB ", 512 * 10**6),
        ("1.5GiB", int(1.5 * 2**30)),
        ("800M", 800 * 10**6),
        ("64KiB", 64 * 1024),
        ("2e9", 2 * 10**9),
        ("123456", 123456),
        (3_000_000, 3_000_000),
    ],
)
def test_parse_memory_size(text: str | int, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "-1GB", "0", "0.5", "2XB", "2 G B", "inf", "nan", "1e400"])
def test_parse_memory_size_refuses(text: str) -> None:
    with pytest.raises(LoralensError, match="is not a memory size; write e.g. 2GB") as info:
        parse_memory_size(text)
    assert info.value.option == "max_memory"  # the CLI adds its flag


def test_layers_per_batch_from_the_budget() -> None:
    # By construction: the budget holds the fixed temporaries plus exactly k layers' working set.
    per_layer = layer_working_bytes(64, 64, stored_itemsize=2, dtype=torch.float64, rhs_columns=8)
    assert per_layer > 64 * 64 * (2 + 8)  # stored fp16 copy + the in-place LU buffer, and the RHS on top
    for k in (1, 3, 7):
        budget = chunk_bytes(64, 64, dtype=torch.float64) + k * per_layer
        opts = {"stored_dtype": torch.float16, "dtype": torch.float64, "rhs_columns": 8}
        assert layers_per_batch(64, 64, max_memory=budget, **opts) == k
        assert layers_per_batch(64, 64, max_memory=budget - 1, **opts) == k - 1 if k > 1 else True
    with pytest.raises(LoralensError, match=r"^max_memory .* below what one layer of module 'q' .* raise it") as info:
        layers_per_batch(
            64, 64, max_memory=per_layer, stored_dtype="F8", dtype=torch.float64, rhs_columns=8, what="module 'q'"
        )
    assert info.value.option == "max_memory"


def test_budgeted_batches_read_per_batch_and_match_unbatched(
    monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, tiny_bert_adapter: Path
) -> None:
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    base = loralens.open_base(tiny_bert)
    whole = compute_conversions(base, adapter, device="cpu")

    reads: list[int] = []
    buffers: list[tuple[int, ...]] = []
    read, factorize = conversion_engine.base_weight_matrices, conversion_engine.factorize

    def spy_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        matrices, keys = read(*args, **kwargs)
        reads.append(len(matrices))
        return matrices, keys

    def spy_factorize(W, **kwargs):  # type: ignore[no-untyped-def]
        buffers.append(tuple(kwargs["out"].shape))
        return factorize(W, **kwargs)

    monkeypatch.setattr(conversion_engine, "base_weight_matrices", spy_read)
    monkeypatch.setattr(conversion_engine, "factorize", spy_factorize)
    # tiny_bert: fp32 (32, 32) weights, r = 4: a budget of one layer's working set gives batches of one layer.
    one_layer = chunk_bytes(32, 32, dtype=torch.float64) + layer_working_bytes(
        32, 32, stored_itemsize=4, dtype=torch.float64, rhs_columns=8
    )
    batched = compute_conversions(base, adapter, device="cpu", max_memory=one_layer)

    assert reads == [1, 1, 1, 1]  # 2 modules x 2 layers, each batch read on its own
    assert buffers == [(1, 32, 32)] * 4  # the working buffer holds one layer
    for name in ("query", "value"):
        a, b = whole[name], batched[name]
        for f in ("A", "B", "BA"):
            torch.testing.assert_close(a.matrix(f), b.matrix(f), rtol=0, atol=0)  # the same LU per layer
        torch.testing.assert_close(a.conversion.residual_B, b.conversion.residual_B, rtol=0, atol=0)
        assert a.base_keys == b.base_keys
    reads.clear()
    compute_conversions(base, adapter, device="cpu", max_memory=one_layer, layer_batch=5)  # the smaller wins
    assert reads == [1, 1, 1, 1]
    reads.clear()
    compute_conversions(base, adapter, device="cpu", max_memory="2GB")
    assert reads == [2, 2]


def test_progress_callback_counts_layers_then_adapters(tiny_bert: Path, bert_adapters: list[Path]) -> None:
    calls: list[tuple[str, int, int]] = []
    adapters = [loralens.load_lora_adapter(p) for p in bert_adapters]
    convs = compute_conversions_many(
        loralens.open_base(tiny_bert), adapters, device="cpu", layer_batch=1, progress=lambda *a: calls.append(a)
    )
    layer_similarity_many(convs, progress=lambda *a: calls.append(a))
    assert calls == [("solve", k, 4) for k in range(1, 5)] + [("similarity", k, 3) for k in range(1, 4)]


# ------------------------------------------------------------------------------------------ many adapters


def test_many_adapters_share_one_factorisation_and_match_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, bert_adapters: list[Path]
) -> None:
    base = loralens.open_base(tiny_bert)
    adapters = [loralens.load_lora_adapter(p) for p in bert_adapters]
    singles = [compute_conversions(base, a, device="cpu") for a in adapters]

    factored: list[int] = []
    factorize = conversion_engine.factorize

    def spy(W, **kwargs):  # type: ignore[no-untyped-def]
        factored.append(len(W))
        return factorize(W, **kwargs)

    monkeypatch.setattr(conversion_engine, "factorize", spy)
    many = compute_conversions_many(base, adapters, device="cpu")

    assert factored == [2, 2]  # query and value: one LU per layer for all three adapters
    for single, joint in zip(singles, many, strict=True):
        assert list(joint) == list(single)
        for name, mc in single.items():
            jc = joint[name]
            assert jc.layers == mc.layers and jc.base_keys == mc.base_keys and jc.ranks == mc.ranks
            for f in ("A", "B", "BA"):
                # One block solve vs one per adapter: the same LU, so agreement to rounding (cond(W) ~ 10 here).
                assert _rel(jc.matrix(f), mc.matrix(f)) < 1e-13
            torch.testing.assert_close(jc.conversion.condition, mc.conversion.condition, rtol=1e-12, atol=0)
            assert (jc.conversion.residual_A < 1e-13).all() and (jc.conversion.residual_B < 1e-13).all()
    assert many[2]["value"].layers == (1,) and many[2]["value"].conversion.A.shape == (1, 32, 3)

    reports = layer_similarity_many(many, seed=3)
    for single, report in zip(singles, reports, strict=True):
        alone = layer_similarity(single, seed=3)
        for name, factors in alone.modules.items():
            for f, s in factors.items():
                torch.testing.assert_close(report.modules[name][f].phi, s.phi, rtol=0, atol=1e-10)
                # the same seeded draw, computed once and reused across adapters of the same shapes
                torch.testing.assert_close(report.modules[name][f].random_phi, s.random_phi, rtol=0, atol=0)
    as_dict = similarity_reports_to_dict(reports, ["a", "b", "c"])
    assert [e["adapter"] for e in as_dict["adapters"]] == ["a", "b", "c"]
    assert as_dict["adapters"][1]["modules"] == reports[1].to_dict()["modules"]
    assert as_dict["adapters"][2]["layers"] == {"value": [1]} and as_dict["settings"]["seed"] == 3


def test_many_adapters_agree_with_numpy(tiny_bert: Path, bert_adapters: list[Path]) -> None:
    base_np = {k: v.double().numpy() for k, v in load_file(tiny_bert / "model.safetensors").items()}
    adapters = [loralens.load_lora_adapter(p) for p in bert_adapters]
    many = compute_conversions_many(loralens.open_base(tiny_bert), adapters, device="cpu", modules=["value"])
    for adapter, convs in zip(adapters, many, strict=True):
        mod = adapter.modules["value"]
        for k, layer in enumerate(mod.layers):
            W = base_np[VALUE.format(layer)]
            A, B = mod.A[k].double().numpy(), mod.B[k].double().numpy()
            np.testing.assert_allclose(convs["value"].conversion.A[k].numpy(), np.linalg.solve(W, A.T), rtol=1e-9)
            np.testing.assert_allclose(convs["value"].conversion.B[k].numpy(), np.linalg.solve(W, B), rtol=1e-9)


def test_cli_many_adapters_json(tiny_bert: Path, bert_adapters: list[Path]) -> None:
    args = ["similarity", "--base", tiny_bert, "--json", "--device", "cpu", "--modules", "value"]
    proc = run_cli(*args, *(x for p in bert_adapters for x in ("--adapter", p)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stdout is not a terminal
    out = json.loads(proc.stdout)
    assert set(out) == {"adapters", "settings"}
    assert [e["adapter"] for e in out["adapters"]] == [str(p) for p in bert_adapters]
    assert out["settings"]["device"] == "cpu" and out["settings"]["max_memory"] == 2 * 10**9
    assert "adapter" not in out["settings"]["inputs"] and out["settings"]["inputs"]["base"]
    single = json.loads(run_cli(*args, "--adapter", bert_adapters[1]).stdout)
    assert set(single) == {"modules", "settings"}  # one adapter: the single-adapter shape, unchanged
    entry = out["adapters"][1]
    assert entry["layers"] == single["settings"]["layers"] and entry["inputs"]["adapter"]["path"] == str(
        bert_adapters[1]
    )
    for f, s in single["modules"]["value"].items():
        np.testing.assert_allclose(entry["modules"]["value"][f]["phi"], s["phi"], rtol=0, atol=1e-9)
        assert entry["modules"]["value"][f]["random_phi"] == s["random_phi"]


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_sharded_base_is_upcast_per_batch(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, half: torch.dtype
) -> None:
    base_dir = _half_sharded_base(tiny_bert, tmp_path / "half", half)
    base = loralens.open_base(base_dir)
    assert base.dtypes[QUERY.format(0)] == half and len(base.weight_files) == 2
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    c64 = compute_conversions(base, adapter, device="cpu", layer_batch=1)
    c32 = compute_conversions(base, adapter, device="cpu", dtype=torch.float32, max_memory="1GB")
    stored = {k: v.double().numpy() for k, v in load_file(base_dir / "model-00001-of-00002.safetensors").items()}
    stored |= {k: v.double().numpy() for k, v in load_file(base_dir / "model-00002-of-00002.safetensors").items()}
    for name, key in (("query", QUERY), ("value", VALUE)):
        mod = adapter.modules[name]
        assert c64[name].conversion.A.dtype == torch.float64 and c32[name].conversion.A.dtype == torch.float32
        for layer in range(2):
            W = stored[key.format(layer)]  # the half values, exactly upcast
            ref_A = np.linalg.solve(W, mod.A[layer].double().numpy().T)
            ref_B = np.linalg.solve(W, mod.B[layer].double().numpy())
            # float64 on exactly-upcast half weights: cond(W) ~ 10, so agreement to ~1e-15; 1e-10 leaves margin.
            np.testing.assert_allclose(c64[name].conversion.A[layer].numpy(), ref_A, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(c64[name].conversion.B[layer].numpy(), ref_B, rtol=1e-10, atol=1e-12)
            # float32: normwise error ~ cond(W) * eps32 ~ 1e-6; 1e-4 as for the GPU comparison.
            assert _rel(c32[name].conversion.A[layer], torch.from_numpy(ref_A)) < 1e-4
            assert _rel(c32[name].conversion.B[layer], torch.from_numpy(ref_B)) < 1e-4


def test_integer_base_weights_are_refused_before_any_solve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, tiny_bert_adapter: Path
) -> None:
    tensors = load_file(tiny_bert / "model.safetensors")
    tensors[VALUE.format(1)] = (tensors[VALUE.format(1)] * 100).round().to(torch.int8)
    (tmp_path / "int8").mkdir()
    save_file(tensors, str(tmp_path / "int8" / "model.safetensors"))
    base = loralens.open_base(tmp_path / "int8")
    assert base.dtypes[VALUE.format(1)] == torch.int8
    monkeypatch.setattr(conversion_engine, "factorize", lambda *a, **k: pytest.fail("solved before refusing"))
    with pytest.raises(CheckpointError, match=r"'encoder.layer.1.attention.self.value.weight' has dtype torch.int8;"):
        compute_conversions(base, loralens.load_lora_adapter(tiny_bert_adapter), device="cpu")
    with pytest.raises(CheckpointError, match="dequantized first"):
        base.check_float([VALUE.format(1)])
    base.check_float([QUERY.format(1)])  # float weights pass
    base.dtypes[QUERY.format(1)] = torch.float8_e4m3fn  # as a float8 header says: quantized, scales elsewhere
    with pytest.raises(CheckpointError, match="float8_e4m3fn; quantized or integer weights must be dequantized"):
        base.check_float([QUERY.format(1)])


def test_nan_in_a_lazily_read_base_names_the_tensor(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    tensors = load_file(tiny_bert / "model.safetensors")
    tensors[QUERY.format(1)][3, 4] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(tensors, str(tmp_path / "nan" / "model.safetensors"))
    base = loralens.open_base(tmp_path / "nan")
    assert torch.isnan(base.read([QUERY.format(1)], check_finite=False)[QUERY.format(1)]).any()  # read as is
    with pytest.raises(loralens.LoralensError, match=r"tensor 'encoder.layer.1.attention.self.query.weight' holds NaN"):
        compute_conversions(base, loralens.load_lora_adapter(tiny_bert_adapter), device="cpu")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_scale_options_errors_and_help(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    base = ["--base", tiny_bert, "--adapter", tiny_bert_adapter]
    for command in ("similarity", "conversion"):
        extra = ["--out", tmp_path / command, "--no-product"] if command == "conversion" else []
        for bad, words in (("lots", "is not a memory size"), ("10kB", "below what one layer")):
            proc = run_cli(command, *base, *extra, "--max-memory", bad)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
            assert words in lines[0] and proc.stdout == ""
    tensors = load_file(tiny_bert / "model.safetensors")
    tensors[QUERY.format(0)] = tensors[QUERY.format(0)].to(torch.int32)
    shutil.copytree(tiny_bert, tmp_path / "int")
    save_file(tensors, str(tmp_path / "int" / "model.safetensors"))
    proc = run_cli("similarity", "--base", tmp_path / "int", "--adapter", tiny_bert_adapter)
    assert proc.returncode == 2 and "dequantized first" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_cli("similarity", *base, "--json", "--quiet", "--max-memory", "1MB", "--dtype", "float32")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["settings"]["dtype"] == "float32"
    helptext = run_cli("similarity", "--help").stdout
    for option in ("--max-memory", "--dtype", "--device", "--quiet", "--adapter"):
        assert option in helptext


def test_conversion_product_counts_against_the_memory_budget(tmp_path: Path, minilm_path: Path) -> None:
    """W^-1 B A is L x d x d per module: refused up front when over --max-memory, left out with --no-product, and
    the factors written are then the same as with it."""
    args = ["--base", minilm_path, "--adapter", loralens.examples.default_adapter(), "--quiet"]
    proc = run_cli("conversion", *args, "--out", tmp_path / "big", "--max-memory", "10MB")
    need = 2 * 6 * 384 * 384 * 8  # query + value, 6 layers, float64
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"would take {need / 1e6:.3g} MB" in proc.stderr and "--no-product" in proc.stderr
    assert not (tmp_path / "big").exists()
    small_run = run_cli("conversion", *args, "--out", tmp_path / "small", "--max-memory", "10MB", "--no-product")
    assert small_run.returncode == 0, small_run.stderr
    assert run_cli("conversion", *args, "--out", tmp_path / "full").returncode == 0
    small = load_file(tmp_path / "small" / "conversion.safetensors")
    full = load_file(tmp_path / "full" / "conversion.safetensors")
    assert sorted(small) == ["query.A", "query.B", "value.A", "value.B"]
    assert sorted(full) == sorted([*small, "query.BA", "value.BA"])
    for key, value in small.items():
        assert torch.equal(value, full[key])
    summary = json.loads((tmp_path / "small" / "conversion.json").read_text())
    assert summary["settings"]["product"] is False and set(summary["modules"]["value"]["shapes"]) == {"A", "B"}
    assert summary["modules"]["value"]["least_squares_layers"] == []


def test_progress_bar_only_on_a_terminal_and_not_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loralens.cli._app import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress_bar(quiet=True) as bar:
        assert bar is None
    with progress_bar(quiet=False, delay_s=3600) as bar:
        assert bar is not None
        bar("solve", 1, 4)
        assert not bar.shown  # short work: no bar
    with progress_bar(quiet=False, delay_s=0) as bar:
        assert bar is not None
        bar("solve", 1, 4)
        assert bar.shown
        bar("solve", 4, 4)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    with progress_bar(quiet=False, delay_s=0) as bar:
        assert bar is None  # piped stdout: no bar
    assert capsys.readouterr().out == ""  # the bar never writes to stdout


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "phi_tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["f32", "f64"])
def test_cuda_analysis_matches_cpu(
    tiny_bert: Path, bert_adapters: list[Path], dtype: torch.dtype, phi_tol: float
) -> None:
    base = loralens.open_base(tiny_bert)
    adapters = [loralens.load_lora_adapter(p) for p in bert_adapters]
    cpu = layer_similarity_many(compute_conversions_many(base, adapters, device="cpu", dtype=dtype, layer_batch=1))
    gpu_convs = compute_conversions_many(base, adapters, device="cuda", dtype=dtype, max_memory="1GB")
    gpu = layer_similarity_many(gpu_convs, device="cuda")
    assert gpu_convs[0]["query"].conversion.A.device.type == "cpu"  # results come back to the CPU
    for c, g in zip(cpu, gpu, strict=True):
        for name, factors in c.modules.items():
            for f, s in factors.items():
                assert (g.modules[name][f].phi - s.phi).abs().max() < phi_tol

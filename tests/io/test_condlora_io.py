"""CondLoRA folders in the authors' format: written here, read back strictly; pickles safely; materialised on a base."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoints
from loralens.analyses.conversion import compute_conversions
from loralens.errors import CheckpointError, InputPathError, ModelMismatchError, NonFiniteError
from loralens.io.base_weights import open_base
from loralens.io.condlora import (
    condlora_config,
    load_condlora_adapter,
    lora_config_from_condlora,
    lora_tensors_from_condlora,
    materialise_condlora,
    write_condlora_adapter,
)

R, HIDDEN, LAYERS = 4, 32, 2


def _thetas(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {t: (torch.randn(R, HIDDEN, generator=g), torch.randn(R, HIDDEN, generator=g)) for t in ("query", "value")}


def _head(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.classifier.weight": torch.randn(2, HIDDEN, generator=g),
        "base_model.model.classifier.bias": torch.randn(2, generator=g),
    }


def _authors_config(**overrides) -> dict:
    """adapter_config.json as the authors' PEFT fork saves a ConditionalLoraConfig (RoBERTa GLUE runs)."""
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": "roberta-base",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_x_scaling": 0.0,
        "modules_to_save": None,
        "peft_type": "ConditionalLORA",
        "r": R,
        "revision": None,
        "target_modules": ["query", "value"],
        "task_type": "SEQ_CLS",
        "use_x": "none",
    }
    config.update(overrides)
    return config


def _write_authors_bin(folder: Path, tensors: dict[str, torch.Tensor], **config_overrides) -> Path:
    """What the fork's save_pretrained writes: adapter_config.json and a torch.save pickle of
    get_peft_model_state_dict (keys '<target>.linear_for_lora_A', no '.weight', and the heads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(_authors_config(**config_overrides)), encoding="utf-8")
    torch.save(tensors, folder / "adapter_model.bin")
    return folder


def _authors_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"{t}.linear_for_lora_{f}": m for t, (a, b) in _thetas().items() for f, m in (("A", a), ("B", b))}
    return {**tensors, **_head()}


def test_authors_bin_loads(tmp_path: Path) -> None:
    folder = _write_authors_bin(tmp_path / "cond", _authors_tensors())
    adapter = load_condlora_adapter(folder)
    assert adapter.weights_file.name == "adapter_model.bin"
    assert (adapter.r, adapter.lora_alpha, adapter.scaling) == (R, 8.0, 2.0)
    assert sorted(adapter.thetas) == ["query", "value"]
    for t, (a, b) in _thetas().items():
        torch.testing.assert_close(adapter.thetas[t][0], a, rtol=0, atol=0)
        torch.testing.assert_close(adapter.thetas[t][1], b, rtol=0, atol=0)
    assert set(adapter.modules_to_save) == set(_head())
    assert adapter.saved_modules == ["classifier"]  # the config says null: PEFT adds the head for SEQ_CLS itself
    assert adapter.base_model_name_or_path == "roberta-base"
    assert lora_config_from_condlora(adapter)["modules_to_save"] == ["classifier"]


def test_roberta_style_head_keys(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    head = {
        f"base_model.model.classifier.{m}.{p}": torch.randn(2, 2, generator=g)
        for m in ("dense", "out_proj")
        for p in ("weight", "bias")
    }
    tensors = {k: v for k, v in _authors_tensors().items() if "classifier" not in k} | head
    adapter = load_condlora_adapter(_write_authors_bin(tmp_path / "cond", tensors))
    assert adapter.saved_modules == ["classifier.dense", "classifier.out_proj"]


def test_write_then_read_round_trip_and_safetensors_is_preferred(tmp_path: Path) -> None:
    config = condlora_config(r=R, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    paths = write_condlora_adapter(tmp_path / "cond", config, _thetas(), _head())
    assert sorted(p.name for p in paths) == ["adapter_config.json", "adapter_model.safetensors"]
    stored = load_file(tmp_path / "cond" / "adapter_model.safetensors")
    assert set(stored) == set(_authors_tensors())  # the authors' key names exactly
    # a stale pickle beside it is ignored: safetensors cannot carry code
    torch.save({"query.linear_for_lora_A": torch.zeros(1)}, tmp_path / "cond" / "adapter_model.bin")
    adapter = load_condlora_adapter(tmp_path / "cond")
    assert adapter.weights_file.suffix == ".safetensors"
    torch.testing.assert_close(adapter.thetas["value"][1], _thetas()["value"][1], rtol=0, atol=0)
    written = json.loads((tmp_path / "cond" / "adapter_config.json").read_text())
    assert set(_authors_config()) - {"auto_mapping"} <= set(written)
    # and the .bin variant of the writer is what the loader reads as the authors' pickle
    write_condlora_adapter(tmp_path / "bin", config, _thetas(), _head(), safe_serialization=False)
    assert load_condlora_adapter(tmp_path / "bin").weights_file.name == "adapter_model.bin"


def test_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(_authors_config()), encoding="utf-8")
    marker = tmp_path / "pwned"
    checkpoints.write_malicious_pickle(folder / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: refused to load"):
        load_condlora_adapter(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "tensors", "match"),
    [
        ({"use_x": "type1", "lora_x_scaling": 0.5}, None, r"use_x 'type1' is an input-conditioned"),
        ({"use_x": "type2"}, None, r"use_x 'type2'"),
        ({}, {"linear_for_lora_x": torch.zeros(R, HIDDEN)}, "input-conditioned"),
        ({"peft_type": "LORA"}, None, r"a PEFT LoRA adapter: load it as a LoRA adapter, load_lora_adapter"),
        ({"r": 8}, None, r"expected \(r=8, d_in\)"),
        ({"target_modules": ".*(query|value)$"}, None, "regular expression"),
        ({"target_modules": ["query", "value", "key"]}, None, r"no thetas for target modules \['key'\]"),
        ({"target_modules": ["query"]}, None, r"thetas for \['value'\], which are not in target_modules"),
        ({}, {"encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)}, "unexpected tensors"),
    ],
)
def test_bad_adapters_are_refused_with_the_reason(tmp_path: Path, overrides, tensors, match) -> None:
    content = _authors_tensors() | (tensors or {})
    folder = _write_authors_bin(tmp_path / "cond", content, **overrides)
    with pytest.raises(CheckpointError, match=match):
        load_condlora_adapter(folder)


def test_incomplete_or_missing_files(tmp_path: Path) -> None:
    tensors = _authors_tensors()
    del tensors["value.linear_for_lora_B"]
    with pytest.raises(CheckpointError, match=r"value\.linear_for_lora_B is missing"):
        load_condlora_adapter(_write_authors_bin(tmp_path / "a", tensors))
    with pytest.raises(InputPathError, match="no such CondLoRA adapter folder"):
        load_condlora_adapter(tmp_path / "nowhere")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(_authors_config()), encoding="utf-8")
    with pytest.raises(InputPathError, match="no adapter weights"):
        load_condlora_adapter(tmp_path / "b")
    nan = _authors_tensors() | {"query.linear_for_lora_A": torch.full((R, HIDDEN), float("nan"))}
    with pytest.raises(NonFiniteError, match="'query.linear_for_lora_A' holds NaN or Inf"):
        load_condlora_adapter(_write_authors_bin(tmp_path / "c", nan))


def test_materialised_on_a_bert_base(tiny_bert: Path, tmp_path: Path) -> None:
    adapter = load_condlora_adapter(_write_authors_bin(tmp_path / "cond", _authors_tensors()))
    base = open_base(tiny_bert)
    lora = materialise_condlora(base, adapter)
    assert sorted(lora.modules) == ["query", "value"]
    weights = load_file(tiny_bert / "model.safetensors")
    for name, mod in lora.modules.items():
        assert mod.layers == tuple(range(LAYERS)) and mod.ranks == (R,) * LAYERS and mod.scaling == (2.0,) * LAYERS
        theta_A, theta_B = (t.double().numpy() for t in adapter.thetas[name])
        for layer in range(LAYERS):
            W = weights[f"encoder.layer.{layer}.attention.self.{name}.weight"].double().numpy()
            np.testing.assert_allclose(mod.A[layer].numpy(), (W @ theta_A.T).T, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(mod.B[layer].numpy(), W @ theta_B.T, rtol=1e-12, atol=1e-12)


def test_conversion_matrices_are_theta_in_every_layer_of_the_real_default(minilm_path: Path) -> None:
    """The real shipped CondLoRA on the real MiniLM: W_l^-1 A_l^T = theta_A^T, W_l^-1 B_l = theta_B^T, all 6 layers."""
    from loralens.examples import default_condlora

    adapter = load_condlora_adapter(default_condlora())
    conversions = compute_conversions(open_base(minilm_path), materialise_condlora(open_base(minilm_path), adapter))
    assert sorted(conversions) == ["query", "value"]
    for name, mc in conversions.items():
        theta_A, theta_B = (t.double() for t in adapter.thetas[name])
        assert mc.layers == tuple(range(6))
        for layer in range(6):
            torch.testing.assert_close(mc.conversion.A[layer], theta_A.T, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(mc.conversion.B[layer], theta_B.T, rtol=1e-8, atol=1e-10)


def test_lora_tensors_for_a_task_model(tiny_bert: Path, tmp_path: Path) -> None:
    adapter = load_condlora_adapter(_write_authors_bin(tmp_path / "cond", _authors_tensors()))
    names = [f"bert.encoder.layer.{k}.attention.self.{m}" for k in range(LAYERS) for m in ("query", "key", "value")]
    tensors = lora_tensors_from_condlora(open_base(tiny_bert), adapter, names)
    expected = {
        f"base_model.model.bert.encoder.layer.{k}.attention.self.{m}.lora_{f}.weight"
        for k in range(LAYERS)
        for m in ("query", "value")
        for f in "AB"
    } | set(_head())
    assert set(tensors) == expected
    A0 = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"]
    assert A0.shape == (R, HIDDEN) and A0.dtype == torch.float32
    with pytest.raises(ModelMismatchError, match="target module 'query' matches no weight"):
        lora_tensors_from_condlora(open_base(tiny_bert), adapter, ["bert.pooler.dense"])


def test_adapter_for_another_base_is_named(tmp_path: Path) -> None:
    base = checkpoints.bert_base(tmp_path / "wide", layers=2, hidden=48)
    adapter = load_condlora_adapter(_write_authors_bin(tmp_path / "cond", _authors_tensors()))
    with pytest.raises(ModelMismatchError, match=r"theta \(r, 32\) but base weight .* is \(48, 48\)"):
        materialise_condlora(open_base(base), adapter)

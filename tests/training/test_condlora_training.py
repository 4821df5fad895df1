"""The CondLoRA module on real transformers models: exact forward, training, merging, save/load, export to PEFT."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loralens.errors import LoralensError, ModelMismatchError, OutputExistsError, ShapeError
from loralens.io.outputs import MARKER
from loralens.training import load_task, split
from loralens.training.condlora import CondLoraConfig, CondLoraLinear, CondLoraModel, _SharedTheta, export_as_lora

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _task_model(base: Path, num_labels: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the new classification head
    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels).to(dtype).eval()


def _inputs(vocab: int = 128, batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomise(model: CondLoraModel, seed: int = 0) -> None:
    """Large random thetas (theta_B starts at zero): the adapter clearly changes the outputs of the tiny base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for shared in model.condlora.values():
            for w in (shared.linear_for_lora_A.weight, shared.linear_for_lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 3)


@pytest.fixture
def cond_bert(tiny_bert: Path) -> CondLoraModel:
    """CondLoRA (r = 4, alpha = 8) on a tiny BERT classifier in float64, with non-zero thetas."""
    torch.manual_seed(1)
    model = CondLoraModel(
        _task_model(tiny_bert, dtype=torch.float64),
        CondLoraConfig(r=4, lora_alpha=8, target_modules=("query", "value"), task_type="SEQ_CLS"),
    )
    _randomise(model)
    return model.eval()


def test_forward_equals_base_plus_explicit_update_per_layer(tiny_bert: Path, cond_bert: CondLoraModel) -> None:
    """Reference: a plain copy of the base whose W_l are replaced by W_l + (alpha/r) B_l A_l, built in numpy float64."""
    reference = _task_model(tiny_bert, dtype=torch.float64)
    reference.classifier.load_state_dict(cond_bert.model.classifier.state_dict())
    scaling = 8 / 4
    for key, shared in cond_bert.condlora.items():
        theta_A = shared.linear_for_lora_A.weight.detach().numpy()
        theta_B = shared.linear_for_lora_B.weight.detach().numpy()
        for layer in range(2):
            linear = reference.bert.encoder.layer[layer].attention.self.get_submodule(key)
            W = linear.weight.detach().numpy()
            A = (W @ theta_A.T).T  # linear_for_lora_A(W).T
            B = W @ theta_B.T  # linear_for_lora_B(W)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(W + scaling * B @ A))
    x = _inputs()
    with torch.no_grad():
        expected = reference(**x).logits
        got = cond_bert(**x).logits
        base = _task_model(tiny_bert, dtype=torch.float64)
        base.classifier.load_state_dict(cond_bert.model.classifier.state_dict())
        unchanged = base(**x).logits
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got - unchanged).abs().max() > 1e-3  # the adapter does change the function


def test_only_thetas_and_head_train_and_start_as_lora(tiny_bert: Path) -> None:
    torch.manual_seed(0)
    base = _task_model(tiny_bert)
    before = base(**_inputs()).logits.detach()
    model = CondLoraModel(base, CondLoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "condlora.query.linear_for_lora_A.weight",
        "condlora.query.linear_for_lora_B.weight",
        "condlora.value.linear_for_lora_A.weight",
        "condlora.value.linear_for_lora_B.weight",
        "model.classifier.bias",
        "model.classifier.weight",
    ]
    assert model.num_trainable_parameters() == 2 * 2 * 4 * 32  # Table 4: 2 r d per module type
    assert model.config.num_labels == 2  # attributes of the wrapped model are forwarded
    assert model.layer_names["query"] == [f"bert.encoder.layer.{k}.attention.self.query" for k in range(2)]
    theta_A = model.condlora["query"].linear_for_lora_A.weight
    assert theta_A.shape == (4, 32)
    assert float(theta_A.abs().max()) <= 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d), 1/sqrt(d))
    assert float(theta_A.std()) > 0.5 / math.sqrt(3 * 32)
    assert not model.condlora["query"].linear_for_lora_B.weight.any()  # zeros: the model starts as the base
    torch.testing.assert_close(model(**_inputs()).logits, before, rtol=0, atol=0)


def test_factors_are_computed_once_per_forward_and_gradients_reach_theta(
    cond_bert: CondLoraModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = _SharedTheta.scaled_factors

    def counted(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(_SharedTheta, "scaled_factors", counted)
    cond_bert.train()
    loss = cond_bert(**_inputs(), labels=torch.tensor([0, 1, 1])).loss
    assert len(calls) == 2  # one batched product per module type (query, value), not one per layer or token
    loss.backward()
    for shared in cond_bert.condlora.values():
        assert shared.linear_for_lora_A.weight.grad.abs().max() > 0
        assert shared.linear_for_lora_B.weight.grad.abs().max() > 0
    frozen = [n for n, p in cond_bert.named_parameters() if p.grad is not None and "classifier" not in n]
    assert all(".linear_for_lora_" in n for n in frozen)
    assert all(s._per_layer is None for s in cond_bert.condlora.values())  # nothing kept between forwards


def test_merge_unmerge_and_unload(tiny_bert: Path, cond_bert: CondLoraModel) -> None:
    x = _inputs()
    weights = {n: p.detach().clone() for n, p in cond_bert.model.named_parameters()}
    with torch.no_grad():
        unmerged = cond_bert(**x).logits
        cond_bert.merge()
        assert cond_bert.merged
        merged = cond_bert(**x).logits
        cond_bert.unmerge()
        again = cond_bert(**x).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=0)
    for n, p in cond_bert.model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=0)  # restored exactly
    plain = copy.deepcopy(cond_bert).merge_and_unload()
    assert not any(isinstance(m, CondLoraLinear) for m in plain.modules())
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits, unmerged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("safe", [True, False])
def test_save_then_load_gives_identical_outputs(
    tiny_bert: Path, cond_bert: CondLoraModel, tmp_path: Path, safe
) -> None:
    cond_bert.save_pretrained(tmp_path / "cond", safe_serialization=safe)
    name = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert sorted(p.name for p in (tmp_path / "cond").iterdir()) == sorted([MARKER, "adapter_config.json", name])
    config = json.loads((tmp_path / "cond" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["use_x"], config["r"], config["lora_alpha"]) == (
        "ConditionalLORA",
        "none",
        4,
        8,
    )
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    fresh = _task_model(tiny_bert, seed=7, dtype=torch.float64)  # another random head: must be replaced
    loaded = CondLoraModel.from_pretrained(fresh, tmp_path / "cond")
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _inputs(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, cond_bert(**x).logits, rtol=0, atol=0)


def test_saving_again_needs_replace(cond_bert: CondLoraModel, tmp_path: Path) -> None:
    cond_bert.save_pretrained(tmp_path / "cond")
    with pytest.raises(OutputExistsError, match="output folder exists"):
        cond_bert.save_pretrained(tmp_path / "cond")
    with torch.no_grad():
        cond_bert.condlora["value"].linear_for_lora_B.weight.mul_(2)
    cond_bert.save_pretrained(tmp_path / "cond", replace=True)
    stored = load_file(tmp_path / "cond" / "adapter_model.safetensors")["value.linear_for_lora_B"]
    torch.testing.assert_close(stored.double(), cond_bert.condlora["value"].linear_for_lora_B.weight, rtol=0, atol=0)


def test_loading_into_another_model_is_refused(tiny_bert: Path, cond_bert: CondLoraModel, tmp_path: Path) -> None:
    cond_bert.save_pretrained(tmp_path / "cond")
    expected = r"classifier\.bias' is \(2,\) but the model's .* \(3,\) \(another num_labels"
    with pytest.raises(ModelMismatchError, match=expected):
        CondLoraModel.from_pretrained(_task_model(tiny_bert, num_labels=3), tmp_path / "cond")


def test_bad_targets(tiny_bert: Path) -> None:
    with pytest.raises(ShapeError, match=r"square weights, but target 'intermediate\.dense' is 128 x 32"):
        CondLoraModel(_task_model(tiny_bert), CondLoraConfig(target_modules=("intermediate.dense",)))
    with pytest.raises(ModelMismatchError, match=r"target modules \['q_proj'\] match no module"):
        CondLoraModel(_task_model(tiny_bert), CondLoraConfig(target_modules=("q_proj",)))
    with pytest.raises(LoralensError, match="r must be a positive integer"):
        CondLoraModel(_task_model(tiny_bert), CondLoraConfig(r=0))


def test_export_loads_in_peft_with_identical_outputs(minilm_path: Path, tmp_path: Path) -> None:
    """The real shipped CondLoRA on the real MiniLM, exported and loaded by peft.PeftModel, on real review snippets."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loralens.examples import default_condlora

    paths = export_as_lora(minilm_path, default_condlora(), tmp_path / "as-lora")
    assert sorted(p.name for p in paths) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "as-lora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 8)
    tensors = load_file(tmp_path / "as-lora" / "adapter_model.safetensors")
    assert sum(".lora_A.weight" in k for k in tensors) == 12 and "base_model.model.classifier.weight" in tensors

    _, test = split(load_task("rt-polarity"), seed=0)
    batch = AutoTokenizer.from_pretrained(minilm_path)(
        list(test.texts[:16]), padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    cond = CondLoraModel.from_pretrained(_task_model(minilm_path, seed=1), default_condlora())
    lora = PeftModel.from_pretrained(_task_model(minilm_path, seed=2), tmp_path / "as-lora").eval()
    with torch.no_grad():
        expected = cond(**batch).logits
        got = lora(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) == 1.0


def test_short_real_training_improves_held_out_accuracy(vader_condlora, minilm_path: Path) -> None:
    out, m = vader_condlora
    assert (m["method"], m["settings"]["peft_type"], m["metric"]) == ("condlora", "ConditionalLORA", "accuracy")
    assert m["after"] > m["before"] + 0.15, m  # measured: 0.54 -> 0.83
    assert m["after"] > m["majority_baseline"] + 0.15
    assert m["trainable_params"] == 2 * 2 * 8 * 384  # 12,288: a sixth of LoRA's 73,728 on MiniLM
    assert json.loads((out / "metrics.json").read_text()) == m
    # the saved adapter reproduces the trained model's held-out accuracy exactly
    from transformers import AutoTokenizer

    _, test = split(load_task("vader-polarity"), seed=0)
    texts, labels = list(test.texts[:256]), np.asarray(test.labels[:256])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = CondLoraModel.from_pretrained(_task_model(minilm_path, seed=5), out)
    with torch.no_grad():  # the trainer's evaluation batches: 64 texts, padded per batch
        logits = torch.cat(
            [
                model(
                    **tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=16, return_tensors="pt")
                ).logits
                for i in range(0, 256, 64)
            ]
        )
    assert float((logits.argmax(1).numpy() == labels).mean()) == m["after"]


def test_non_square_targets_are_refused_before_the_model_loads(
    minilm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train(method="condlora") checks the targets against the base's tensor shapes first (safetensors headers),
    naming the target as given (intermediate.dense, not its theta key 'dense'), before any model or tokenizer is
    loaded; the CLI prints it as one line with the flag advice."""
    import time

    import transformers

    from clitools import run_cli
    from loralens.io.base_weights import open_base
    from loralens.training.condlora import check_square_targets
    from loralens.training.config import TrainConfig
    from loralens.training.trainer import train

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model or tokenizer was loaded before the targets were checked")

    for auto in ("AutoModelForSequenceClassification", "AutoTokenizer", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", no_loading)
    expected = r"CondLoRA needs square weights, but target 'intermediate\.dense' is 1536 x 384 \(d_out x d_in\)"
    with pytest.raises(ShapeError, match=expected) as info:
        check_square_targets(open_base(minilm_path), ["query", "intermediate.dense"])
    assert info.value.option == "targets"
    check_square_targets(open_base(minilm_path), ["query", "value", "attention.output.dense"])
    config = TrainConfig(method="condlora", targets=("query", "intermediate.dense"), steps=1)
    with pytest.raises(ShapeError, match=expected):
        train(minilm_path, "vader-polarity", config, out_dir=tmp_path / "run")
    start = time.monotonic()
    proc = run_cli(
        "train", "--base", minilm_path, "--method", "condlora", "--task", "vader-polarity", "--steps", "1",
        "--targets", "query,intermediate.dense", "--out", tmp_path / "cli",
    )  # fmt: skip
    assert time.monotonic() - start < 3
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "target 'intermediate.dense' is 1536 x 384" in lines[0] and "'dense'" not in lines[0]
    assert lines[0].endswith("(choose them with --targets)") and not (tmp_path / "cli").exists()

"""Table 3 (LoRA vs CondLoRA per layer) against a float64 numpy/scipy reference, and Table 4 from headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoints
from checkpoints import roberta_base_shapes_only
from loralens.analyses.condlora_vs_lora import compare_adapters, compare_adapters_many, parameter_counts
from loralens.errors import ModelMismatchError, RankError, ShapeError
from loralens.examples import default_adapter, default_adapters, default_condlora
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base
from loralens.io.condlora import load_condlora_adapter, materialise_condlora


def phi_reference(X: np.ndarray, Y: np.ndarray, k: int = 8) -> float:
    """phi between the column spaces of X and Y, both of rank k (i = j = r): sum of cos^2 of principal angles / k."""
    angles = scipy.linalg.subspace_angles(X, Y)
    assert len(angles) == k
    return float(np.sum(np.cos(angles) ** 2) / k)


@pytest.fixture(scope="module")
def defaults(minilm_path: Path):
    """The real shipped LoRA and CondLoRA adapters, trained with the same loop on Rotten Tomatoes, on real MiniLM."""
    return open_base(minilm_path), load_lora_adapter(default_adapter()), load_condlora_adapter(default_condlora())


@pytest.fixture(scope="module")
def report(defaults):
    return compare_adapters(*defaults, seed=0)


def test_table3_matches_scipy_subspace_angles(defaults, report, minilm_path: Path) -> None:
    base, lora, cond = defaults
    weights = load_file(minilm_path / "model.safetensors")
    adapter = load_file(default_adapter() / "adapter_model.safetensors")
    assert sorted(report.modules) == ["query", "value"]
    for name, mc in report.modules.items():
        assert mc.layers == tuple(range(6)) and (mc.i, mc.j) == (8, 8) and mc.theta == name
        assert mc.sides == {"A": "right", "B": "left", "BA": "left"}
        theta_A, theta_B = (t.double().numpy() for t in cond.thetas[name])
        for layer in range(6):
            W = weights[f"encoder.layer.{layer}.attention.self.{name}.weight"].double().numpy()
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{name}"
            A = adapter[f"{prefix}.lora_A.weight"].double().numpy()  # (8, 384)
            B = adapter[f"{prefix}.lora_B.weight"].double().numpy()  # (384, 8)
            A_c, B_c = (W @ theta_A.T).T, W @ theta_B.T  # the authors' get_condlora_param
            # A on right singular vectors = row spaces; B and BA on left = column spaces
            assert float(mc.phi["A"][layer]) == pytest.approx(phi_reference(A.T, A_c.T), abs=1e-9)
            assert float(mc.phi["B"][layer]) == pytest.approx(phi_reference(B, B_c), abs=1e-9)
            assert float(mc.phi["BA"][layer]) == pytest.approx(phi_reference(B @ A, B_c @ A_c), abs=1e-9)
            conv_A, conv_B = np.linalg.solve(W, A.T), np.linalg.solve(W, B)
            assert float(mc.conv_vs_theta["A"][layer]) == pytest.approx(phi_reference(conv_A, theta_A.T), abs=1e-9)
            assert float(mc.conv_vs_theta["B"][layer]) == pytest.approx(phi_reference(conv_B, theta_B.T), abs=1e-9)


def test_random_baseline_is_seeded_and_of_the_expected_size(defaults, report) -> None:
    again = compare_adapters(*defaults, seed=0)
    other = compare_adapters(*defaults, seed=1)
    for name, mc in report.modules.items():
        for f in ("A", "B", "BA"):
            assert mc.random_expected[f] == pytest.approx(8 / 384)
            torch.testing.assert_close(again.modules[name].random[f], mc.random[f], rtol=0, atol=0)
            assert not torch.equal(other.modules[name].random[f], mc.random[f])
            # phi against a uniformly random 8-dim subspace of R^384: mean 8/384, far below 1
            assert 0 < float(mc.random[f].min()) and float(mc.random[f].max()) < 5 * 8 / 384
        assert mc.conv_random_expected == pytest.approx(8 / 384)


def test_condlora_against_itself_is_one_everywhere(defaults) -> None:
    """Known answer: the CondLoRA's own per-layer factors, read as a LoRA adapter, give phi = 1 in every row."""
    base, _, cond = defaults
    own = compare_adapters(base, materialise_condlora(base, cond), cond)
    for mc in own.modules.values():
        for values in (*mc.phi.values(), *mc.conv_vs_theta.values()):
            torch.testing.assert_close(values, torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-9)


def test_one_pair_takes_the_memory_budget_of_many(defaults, report) -> None:
    """compare_adapters has compare_adapters_many's max_memory: the same numbers, the budget recorded."""
    budgeted = compare_adapters(*defaults, max_memory="8MB")
    assert budgeted.settings["max_memory"] == 8_000_000
    for name, m in report.modules.items():
        for f in ("A", "B"):
            torch.testing.assert_close(budgeted.modules[name].phi[f], m.phi[f], rtol=0, atol=1e-12)


def test_json_form(report) -> None:
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"modules", "settings"}
    value = d["modules"]["value"]
    for f in ("A", "B", "BA"):
        assert len(value[f]) == 6 and len(value["random"][f]) == 6
        assert value["mean"][f] == pytest.approx(float(np.mean(value[f])), abs=1e-9)
    assert set(value["random"]["expected"]) == {"A", "B", "BA"}
    assert set(value["conv_vs_theta"]) == {"A", "B", "mean", "random_expected"}
    assert d["settings"]["seed"] == 0 and d["settings"]["dtype"] == "float64"


def test_errors_name_modules_and_layers(defaults, minilm_path: Path) -> None:
    base, lora, cond = defaults
    with pytest.raises(RankError, match=r"module 'query' at layers \[0, 1, 2, 3, 4, 5\]"):
        compare_adapters(base, lora, cond, modules=["query"], i=9)
    only_query = load_condlora_adapter(default_condlora())
    del only_query.thetas["value"]
    with pytest.raises(ModelMismatchError, match=r"LoRA module 'value' .* no CondLoRA counterpart"):
        compare_adapters(base, lora, only_query)


# ---------------------------------------------------------------------------------------------- Table 4


def _shapes_from_header(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _formula(shapes: dict[str, tuple[int, ...]], r: int, targets: list[str]) -> tuple[int, int]:
    """Table 4 written out: LoRA sums r (in + out) over matched weights, CondLoRA 2 r in once per target."""
    lora, cond = 0, 0
    for t in targets:
        matched = [s for k, s in shapes.items() if k.endswith(f".{t}.weight") and ".layer" in k]
        lora += sum(r * (s[0] + s[1]) for s in matched)
        cond += 2 * r * matched[0][1]
    return lora, cond


def test_table4_for_roberta_base_from_the_header_alone(tmp_path: Path) -> None:
    folder = roberta_base_shapes_only(tmp_path / "roberta-base")
    counts = parameter_counts(open_base(folder), r=8, targets=["query", "value"])
    assert (counts.lora, counts.condlora) == (294_912, 24_576)  # the paper's Table 4
    assert counts.ratio == pytest.approx(1 / 12)
    assert counts.modules["value"] == {
        "layers": 12,
        "shape": [768, 768],
        "square": True,
        "lora": 147_456,
        "condlora": 12_288,
    }
    assert (counts.lora, counts.condlora) == _formula(
        _shapes_from_header(folder / "model.safetensors"), 8, ["query", "value"]
    )


def test_table4_for_bert_and_llama_shapes(tiny_bert: Path, tiny_llama: Path) -> None:
    bert = parameter_counts(open_base(tiny_bert), r=4, targets=["query", "value"])
    assert (bert.lora, bert.condlora) == _formula(
        _shapes_from_header(tiny_bert / "model.safetensors"), 4, ["query", "value"]
    )
    assert (bert.lora, bert.condlora) == (2 * 2 * 4 * 64, 2 * 2 * 4 * 32)
    targets = ["q_proj", "v_proj"]
    llama = parameter_counts(open_base(tiny_llama), r=8, targets=targets)
    assert (llama.lora, llama.condlora) == _formula(_shapes_from_header(tiny_llama / "model.safetensors"), 8, targets)
    assert llama.modules["q_proj"]["square"] and not llama.modules["v_proj"]["square"]  # GQA: 16 x 64
    assert llama.modules["v_proj"]["shape"] == [16, 64] and llama.modules["v_proj"]["lora"] == 2 * 8 * (16 + 64)


def test_table4_errors(tiny_bert: Path) -> None:
    with pytest.raises(ModelMismatchError, match="target module 'q_proj' matches no weight"):
        parameter_counts(open_base(tiny_bert), r=8, targets=["q_proj"])
    with pytest.raises(ShapeError, match="'dense' matches weights of different shapes"):
        parameter_counts(open_base(tiny_bert), r=8, targets=["dense"])
    with pytest.raises(ShapeError, match="at least 1"):
        parameter_counts(open_base(tiny_bert), r=0, targets=["query"])


def test_a_bert_task_model_base(tmp_path: Path) -> None:
    base = checkpoints.bert_base(tmp_path / "task", layers=3, hidden=16, task_model=True)
    counts = parameter_counts(open_base(base), r=2, targets=["attention.self.query"])
    assert (counts.lora, counts.condlora) == (3 * 2 * 32, 2 * 2 * 16)


def test_many_pairs_equal_each_pair_alone(minilm_path: Path) -> None:
    """The three shipped seed pairs in one call (one factorisation per base weight for all of them) give, pair by
    pair, what compare_adapters gives for that pair alone: Table 3 and conv-vs-theta, random baseline included."""
    base = open_base(minilm_path)
    pairs = [(load_lora_adapter(lo), load_condlora_adapter(c)) for _, lo, c in default_adapters()]
    many = compare_adapters_many(base, pairs, seed=3)
    assert len(many) == 3
    for (lora, cond), got in zip(pairs, many, strict=True):
        alone = compare_adapters(base, lora, cond, seed=3)
        assert got.settings["lora"] == str(lora.path) and got.settings["condlora"] == str(cond.path)
        for module, mc in alone.modules.items():
            for f in ("A", "B", "BA"):
                torch.testing.assert_close(got.modules[module].phi[f], mc.phi[f], rtol=0, atol=1e-12)
                torch.testing.assert_close(got.modules[module].random[f], mc.random[f], rtol=0, atol=1e-12)
            for f in ("A", "B"):
                torch.testing.assert_close(
                    got.modules[module].conv_vs_theta[f], mc.conv_vs_theta[f], rtol=0, atol=1e-10
                )
    # different seeds learned different adapters: the pairs' Table 3 rows are not copies of each other
    assert not torch.equal(many[0].modules["value"].phi["A"], many[1].modules["value"].phi["A"])


def test_many_pairs_name_the_pair_that_does_not_fit(minilm_path: Path, tmp_path: Path) -> None:
    """A CondLoRA adapter of another hidden size in the second pair: refused before any work, its folder named."""
    base = open_base(minilm_path)
    good = (load_lora_adapter(default_adapter()), load_condlora_adapter(default_condlora()))
    other = checkpoints.condlora_adapter(tmp_path / "cond", hidden=32)
    with pytest.raises(ModelMismatchError, match=rf"{other}: target 'query' has theta \(r, 32\)"):
        compare_adapters_many(base, [good, (good[0], load_condlora_adapter(other))])

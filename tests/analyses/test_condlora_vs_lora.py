"""Table 3 (LoRA vs CondLoRA per layer) against a float64 numpy/scipy reference, and Table 4 from headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoints
from checkpoints import roberta_base_shapes_only
from loralens.analyses.condlora_vs_lora import (
    compare_adapters,
    compare_adapters_many,
    comparisons_to_dict,
    parameter_counts,
)
from loralens.errors import LoralensError, ModelMismatchError, RankError, ShapeError
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
    """compare_adapters has compare_adapters_many's max_memory: the same numbers, the budget recorded. 12 MB
    holds one layer of the conversions with the W-null's 20 draws (its right-hand sides count in the budget)."""
    budgeted = compare_adapters(*defaults, max_memory="12MB")
    assert budgeted.settings["max_memory"] == 12_000_000
    for name, m in report.modules.items():
        for f in ("A", "B"):
            torch.testing.assert_close(budgeted.modules[name].phi[f], m.phi[f], rtol=0, atol=1e-12)
            for got, want in (
                (budgeted.modules[name].w_null, m.w_null),
                (budgeted.modules[name].conv_w_null, m.conv_w_null),
            ):
                assert got is not None and want is not None
                torch.testing.assert_close(got[f].mean, want[f].mean, rtol=0, atol=1e-12)


def test_json_form(report) -> None:
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"modules", "settings"}
    value = d["modules"]["value"]
    for f in ("A", "B", "BA"):
        assert len(value[f]) == 6 and len(value["random"][f]) == 6
        assert value["mean"][f] == pytest.approx(float(np.mean(value[f])), abs=1e-9)
    assert set(value["random"]["expected"]) == {"A", "B", "BA"}
    assert set(value["conv_vs_theta"]) == {"A", "B", "mean", "random_expected", "w_null"}
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
    """Table 4 written out: LoRA sums r (in + out) over matched weights, CondLoRA 2 r in once per square target."""
    lora, cond = 0, 0
    for t in targets:
        matched = [s for k, s in shapes.items() if k.endswith(f".{t}.weight") and ".layer" in k]
        lora += sum(r * (s[0] + s[1]) for s in matched)
        cond += 2 * r * matched[0][1] if matched[0][0] == matched[0][1] else 0
    return lora, cond


def test_table4_for_roberta_base_from_the_header_alone(tmp_path: Path) -> None:
    folder = roberta_base_shapes_only(tmp_path / "roberta-base")
    counts = parameter_counts(open_base(folder), r=8, targets=["query", "value"])
    assert (counts.lora, counts.condlora) == (294_912, 24_576)  # the paper's Table 4
    assert counts.ratio == pytest.approx(1 / 12)
    assert counts.modules["value"] == {
        "targets": ["value"],
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
    assert llama.modules["v_proj"]["condlora"] is None and llama.not_square == ("v_proj",)
    assert llama.ratio == pytest.approx(llama.condlora / llama.modules["q_proj"]["lora"])


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


# ---------------------------------------------------------------------------------- the W-conditioned null (#13)


def _synthetic_pair(folder: Path, L: int = 3, d: int = 16, r: int = 2, seed: int = 0) -> tuple[Path, Path, Path]:
    """A Llama-shaped base holding only ``q_proj`` (L, d, d) float64, a LoRA adapter and a CondLoRA adapter on it.

    The layers share singular vectors (``W_l = Q diag(s) P^T`` plus 1e-4 noise, a spread spectrum), LoRA's
    ``A_l`` rows and ``B_l`` columns lie near ``Q``'s top directions (where ``R W_l^T`` and ``W_l R^T`` lean) and
    ``theta_A``, ``theta_B`` near ``P``'s bottom ones (where ``W_l^-1 R`` leans): every null is then far from the
    Gaussian ``r / d``, so a transposed ``W`` or a wrong side would show."""
    rng = np.random.default_rng(seed)
    Q, P = (np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(2))
    s = np.logspace(0, -3, d)
    W = np.stack([Q @ np.diag(s) @ P.T + 1e-4 * rng.standard_normal((d, d)) / np.sqrt(d) for _ in range(L)])
    base, lora, cond = folder / "base", folder / "lora", folder / "cond"
    base.mkdir(parents=True)
    lora.mkdir(parents=True)
    save_file({f"model.layers.{k}.self_attn.q_proj.weight": torch.from_numpy(W[k]) for k in range(L)},
              str(base / "model.safetensors"))  # fmt: skip
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d, "num_hidden_layers": L}
    (base / "config.json").write_text(json.dumps(config | {"num_attention_heads": 1}))
    near = lambda M: torch.from_numpy(M + 0.2 * rng.standard_normal(M.shape))  # noqa: E731
    tensors = {}
    for k in range(L):
        prefix = f"base_model.model.model.layers.{k}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = near(Q[:, :r].T)  # (r, d)
        tensors[f"{prefix}.lora_B.weight"] = near(Q[:, :r])  # (d, r)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0}
    peft |= {"target_modules": ["q_proj"], "base_model_name_or_path": str(base), "fan_in_fan_out": False}
    (lora / "adapter_config.json").write_text(json.dumps(peft))
    checkpoints.condlora_adapter(cond, hidden=d, r=r, targets=("q_proj",))
    thetas = {f"q_proj.linear_for_lora_{f}": near(P[:, -r:].T).float() for f in "AB"}  # (r, d) each
    save_file(thetas, str(cond / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, lora, cond


def _load_pair(base: Path, lora: Path, cond: Path):
    return open_base(base), load_lora_adapter(lora), load_condlora_adapter(cond)


def _basis(X: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(X, full_matrices=False)[0][:, :k]


def _phi(X: np.ndarray, Y: np.ndarray, k: int) -> float:
    """phi of the column spaces (left singular vectors) of X and Y, i = j = k."""
    return float(np.sum((_basis(X, k).T @ _basis(Y, k)) ** 2) / k)


def _mc_nulls(base: Path, lora: Path, cond: Path, r: int, draws: int, seed: int) -> dict[str, np.ndarray]:
    """Independent float64 Monte-Carlo of every null, per draw and layer ``(draws, L)``: Table 3's with theta
    replaced by Gaussians (A on right singular vectors = column spaces of the transposes), conv_vs_theta's with the
    LoRA factor replaced by ``numpy.linalg.solve(W_l, R)``."""
    weights, adapter = load_file(base / "model.safetensors"), load_file(lora / "adapter_model.safetensors")
    thetas = load_file(cond / "adapter_model.safetensors")
    theta_A, theta_B = (thetas[f"q_proj.linear_for_lora_{f}"].double().numpy() for f in "AB")
    L = len(weights)
    Ws = [weights[f"model.layers.{k}.self_attn.q_proj.weight"].numpy() for k in range(L)]
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    As = [adapter[prefix.format(k, "A")].numpy() for k in range(L)]
    Bs = [adapter[prefix.format(k, "B")].numpy() for k in range(L)]
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[float]]] = {f: [] for f in ("A", "B", "BA", "conv_A", "conv_B")}
    d = Ws[0].shape[0]
    for _ in range(draws):
        R_A, R_B = rng.standard_normal((r, d)), rng.standard_normal((r, d))
        rows: dict[str, list[float]] = {f: [] for f in out}
        for W, A, B in zip(Ws, As, Bs, strict=True):
            A_n, B_n = R_A @ W.T, W @ R_B.T  # the CondLoRA rule with Gaussian thetas
            rows["A"].append(_phi(A.T, A_n.T, r))
            rows["B"].append(_phi(B, B_n, r))
            rows["BA"].append(_phi(B @ A, B_n @ A_n, r))
            rows["conv_A"].append(_phi(np.linalg.solve(W, rng.standard_normal((d, r))), theta_A.T, r))
            rows["conv_B"].append(_phi(np.linalg.solve(W, rng.standard_normal((d, r))), theta_B.T, r))
        for f, v in rows.items():
            out[f].append(v)
    return {f: np.array(v) for f, v in out.items()}


def test_w_null_matches_a_numpy_monte_carlo(tmp_path: Path) -> None:
    r, draws = 2, 200
    files = _synthetic_pair(tmp_path, r=r)
    report = compare_adapters(*_load_pair(*files), device="cpu", seed=5, null_draws=draws)
    ref = _mc_nulls(*files, r=r, draws=400, seed=11)
    mc = report.modules["q_proj"]
    assert mc.w_null is not None and mc.conv_w_null is not None
    nulls = {**mc.w_null, **{f"conv_{f}": w for f, w in mc.conv_w_null.items()}}
    d = 16
    for f, w in nulls.items():
        assert w.draws == draws
        ref_mean, ref_se = ref[f].mean(axis=0), ref[f].std(axis=0, ddof=1) / np.sqrt(ref[f].shape[0])
        se = np.hypot(w.std.numpy() / np.sqrt(draws), ref_se)
        # Tolerance: 4 standard errors of the difference of two independent Monte-Carlo means, per layer.
        assert np.all(np.abs(w.mean.numpy() - ref_mean) < 4 * se), (f, w.mean, ref_mean, se)
        assert w.mean_over_layers == pytest.approx(float(w.mean.mean()), abs=1e-12)
        per_draw = ref[f].mean(axis=1)
        assert abs(w.mean_over_layers - per_draw.mean()) < 4 * np.hypot(
            w.mean_over_layers_std / np.sqrt(draws), per_draw.std(ddof=1) / np.sqrt(len(per_draw))
        )
        assert ref_mean.min() > 2 * r / d, f  # informative: W pulls each null well above the Gaussian baseline


def test_w_null_statistics_are_sane_byte_identical_and_independent_of_batching(tmp_path: Path) -> None:
    base, lora, cond = _load_pair(*_synthetic_pair(tmp_path, L=4))
    one = compare_adapters(base, lora, cond, device="cpu", seed=2, null_draws=7)
    again = compare_adapters(base, lora, cond, device="cpu", seed=2, null_draws=7)
    assert json.dumps(one.to_dict()) == json.dumps(again.to_dict())
    # 27 kB: the conversions (with the null's right-hand sides) solve one layer at a time, Table 3 reads three
    # then one; the same null, to the byte
    tight = compare_adapters(base, lora, cond, device="cpu", seed=2, null_draws=7, max_memory=27_000)
    assert json.dumps(tight.to_dict()["modules"]) == json.dumps(one.to_dict()["modules"])
    off = compare_adapters(base, lora, cond, device="cpu", seed=2, null_draws=0)
    mc, mc_off = one.modules["q_proj"], off.modules["q_proj"]
    assert mc.w_null is not None and mc.conv_w_null is not None
    allowed = torch.arange(1, 9, dtype=torch.float64) / 8  # (1 + count) / (N + 1)
    for w in (*mc.w_null.values(), *mc.conv_w_null.values()):
        assert w.draws == 7 and w.mean.shape == w.std.shape == w.z.shape == w.p.shape == (4,)
        assert bool(((w.p > 0) & (w.p <= 1)).all()) and bool(torch.isfinite(w.z).all())
        assert bool(torch.isclose(w.p.unsqueeze(-1), allowed).any(dim=-1).all())
        assert w.mean_over_layers_std > 0
    for f in ("A", "B", "BA"):
        # z and p agree with their definitions
        w = mc.w_null[f]
        torch.testing.assert_close(w.z, (mc.phi[f] - w.mean) / w.std, rtol=0, atol=1e-12)
        # the W-null is additive: the observed and random numbers are those of a run without it
        assert torch.equal(mc.phi[f], mc_off.phi[f]) and torch.equal(mc.random[f], mc_off.random[f])
    for f in ("A", "B"):
        assert torch.equal(mc.conv_vs_theta[f], mc_off.conv_vs_theta[f])
    assert mc_off.w_null is None and mc_off.conv_w_null is None
    d_on, d_off = one.to_dict()["modules"]["q_proj"], off.to_dict()["modules"]["q_proj"]
    assert d_off["w_null"] is None and d_off["conv_vs_theta"]["w_null"] is None
    for d_json in (d_on, d_off):  # the keys and numbers of the output without the null are unchanged
        conv = d_json.pop("conv_vs_theta")
        d_json.pop("w_null")
        d_json["conv"] = {k: v for k, v in conv.items() if k != "w_null"}
    assert d_on == d_off
    d_on = one.to_dict()["modules"]["q_proj"]
    assert set(d_on["w_null"]) == {"draws", "A", "B", "BA"}
    assert set(d_on["conv_vs_theta"]["w_null"]) == {"draws", "A", "B"}
    assert set(d_on["w_null"]["A"]) == {"mean", "std", "z", "p", "mean_over_layers", "mean_over_layers_std"}
    assert one.settings["null_draws"] == 7 and "w_null:theta_A" in one.settings["w_null_baseline"]
    assert off.settings["null_draws"] == 0
    other = compare_adapters(base, lora, cond, device="cpu", seed=3, null_draws=7)
    assert not torch.equal(other.modules["q_proj"].w_null["A"].mean, mc.w_null["A"].mean)  # type: ignore[index]


def test_w_null_draws_are_validated(tmp_path: Path) -> None:
    base, lora, cond = _load_pair(*_synthetic_pair(tmp_path))
    for bad in (-1, 1):
        with pytest.raises(LoralensError, match="null_draws must be 0") as info:
            compare_adapters(base, lora, cond, device="cpu", null_draws=bad)
        assert info.value.options == ("null_draws",)


def test_w_null_on_the_shipped_pair(report) -> None:
    """The shipped LoRA and CondLoRA (default 20 draws): every block present, statistics in range; the B null
    lies near the Gaussian baseline while the trained B's agree well above it (the measured numbers are in #13)."""
    assert report.settings["null_draws"] == 20
    for mc in report.modules.values():
        assert mc.w_null is not None and mc.conv_w_null is not None
        for w in (*mc.w_null.values(), *mc.conv_w_null.values()):
            assert w.draws == 20 and w.mean.shape == (6,)
            assert bool(((w.p > 0) & (w.p <= 1)).all()) and bool(torch.isfinite(w.z).all())
            assert 0 < w.mean_over_layers < 5 * 8 / 384 and w.mean_over_layers_std > 0
        # phi_left(B A) = phi_left(B) for full-row-rank A: the BA null equals the B null
        torch.testing.assert_close(mc.w_null["BA"].mean, mc.w_null["B"].mean, rtol=0, atol=1e-9)
        assert float(mc.phi["B"].mean()) > mc.w_null["B"].mean_over_layers + 3 * mc.w_null["B"].mean_over_layers_std
    block = report.to_dict()["modules"]["value"]
    assert block["w_null"]["draws"] == 20 and len(block["w_null"]["A"]["p"]) == 6
    assert block["conv_vs_theta"]["w_null"]["draws"] == 20


def test_many_pairs_summary_carries_the_w_null(minilm_path: Path) -> None:
    base = open_base(minilm_path)
    pairs = [(load_lora_adapter(lo), load_condlora_adapter(c)) for _, lo, c in default_adapters()[:2]]
    many = compare_adapters_many(base, pairs, modules=["value"], device="cpu", null_draws=4)
    data = comparisons_to_dict(many)
    for f in ("A", "B", "BA"):
        expected = np.mean([r.modules["value"].w_null[f].mean_over_layers for r in many])  # type: ignore[index]
        assert data["summary"]["value"][f]["w_null"] == pytest.approx(expected, abs=1e-9)
    for f in ("A", "B"):
        expected = np.mean([r.modules["value"].conv_w_null[f].mean_over_layers for r in many])  # type: ignore[index]
        assert data["summary"]["value"][f"conv_{f}"]["w_null"] == pytest.approx(expected, abs=1e-9)
    # the conversions' null is shared by pairs of one base and rank: the same W^-1 R for both pairs
    a, b = (r.modules["value"].conv_w_null for r in many)
    assert a is not None and b is not None and a["A"].draws == 4
    off = comparisons_to_dict(compare_adapters_many(base, pairs, modules=["value"], device="cpu", null_draws=0))
    assert off["summary"]["value"]["A"]["w_null"] is None


def test_table4_leaves_non_square_targets_out_of_condlora(minilm_path: Path) -> None:
    """MiniLM's intermediate.dense is 1536 x 384: LoRA adapts it, CondLoRA is undefined there, so it adds nothing
    to the CondLoRA count and the ratio compares the square targets only (counted by hand from the header)."""
    shapes = _shapes_from_header(minilm_path / "model.safetensors")
    inter = [s for k, s in shapes.items() if k.endswith(".intermediate.dense.weight")]
    square = [s for k, s in shapes.items() if k.endswith((".self.query.weight", ".self.value.weight"))]
    assert len(inter) == 6 and set(inter) == {(1536, 384)} and len(square) == 12 and set(square) == {(384, 384)}
    counts = parameter_counts(open_base(minilm_path), r=8, targets=["query", "value", "intermediate.dense"])
    lora_square = sum(8 * (o + i) for o, i in square)
    assert counts.lora == lora_square + sum(8 * (o + i) for o, i in inter) == 73_728 + 6 * 8 * (1536 + 384)
    assert counts.condlora == 2 * (2 * 8 * 384) == 12_288  # query and value only
    assert counts.lora_square == lora_square == 73_728
    assert counts.ratio == pytest.approx(12_288 / 73_728)
    assert counts.not_square == ("intermediate.dense",)
    assert counts.modules["dense"] == {
        "targets": ["intermediate.dense"],
        "layers": 6,
        "shape": [1536, 384],
        "square": False,
        "lora": 6 * 8 * (1536 + 384),
        "condlora": None,
    }
    data = counts.to_dict()
    assert (data["not_square"], data["lora_square"]) == (["intermediate.dense"], 73_728)
    assert data["ratio"] == pytest.approx(1 / 6)
    only = parameter_counts(open_base(minilm_path), r=8, targets=["intermediate.dense"])
    assert (only.condlora, only.lora_square, only.ratio, only.to_dict()["ratio"]) == (0, 0, None, None)


def test_compare_reports_progress(minilm_path: Path) -> None:
    """progress("solve", ...) while the conversions are solved, then progress("compare", pairs done, pairs)."""
    calls: list[tuple[str, int, int]] = []
    pair = (load_lora_adapter(default_adapter()), load_condlora_adapter(default_condlora()))
    compare_adapters_many(
        open_base(minilm_path), [pair], modules=["value"], device="cpu", null_draws=0,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )  # fmt: skip
    assert [c for c in calls if c[0] == "compare"] == [("compare", 1, 1)]
    solve = [c for c in calls if c[0] == "solve"]
    assert solve and solve[-1][1] == solve[-1][2] and [c[1] for c in solve] == sorted(c[1] for c in solve)

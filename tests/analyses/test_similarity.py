"""The Python API end to end on the real MiniLM base and real adapters, against float64 numpy/scipy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

import checkpoints
import loralens
from loralens.analyses.conversion import compute_conversions
from loralens.analyses.engine import seeded_generator, select_modules
from loralens.analyses.similarity import layer_similarity
from loralens.core.random import gaussian
from loralens.errors import LoralensError, NearSingularWarning, RankError, SingularMatrixError


def _phi_reference(X: np.ndarray, Y: np.ndarray, i: int, j: int) -> float:
    """phi from scipy's principal angles: sum cos^2 / min(i, j) (an independent route to the same number)."""
    U = np.linalg.svd(X, full_matrices=False)[0][:, :i]
    V = np.linalg.svd(Y, full_matrices=False)[0][:, :j]
    return float(np.sum(np.cos(scipy.linalg.subspace_angles(U, V)) ** 2) / min(i, j))


def test_conversions_on_real_minilm_match_numpy(minilm_path: Path, vader_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(vader_adapter)
    conversions = compute_conversions(loralens.open_base(minilm_path), adapter, device="cpu")
    base = load_numpy(minilm_path / "model.safetensors")
    lora = load_numpy(vader_adapter / "adapter_model.safetensors")
    for name in ("query", "value"):
        mc = conversions[name]
        assert mc.layers == tuple(range(6)) and mc.conversion.convention == "solve"
        for layer in range(6):
            W = base[f"encoder.layer.{layer}.attention.self.{name}.weight"].astype(np.float64)
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{name}"
            A = lora[f"{prefix}.lora_A.weight"].astype(np.float64)
            B = lora[f"{prefix}.lora_B.weight"].astype(np.float64)
            # Tolerance: cond(W) ~ 1e5 here, so float64 solves agree to ~1e-16 * 1e5 relative.
            np.testing.assert_allclose(mc.conversion.A[layer].numpy(), np.linalg.solve(W, A.T), rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(mc.conversion.B[layer].numpy(), np.linalg.solve(W, B), rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(mc.matrix("BA")[layer].numpy(), np.linalg.solve(W, B @ A), rtol=1e-8, atol=1e-10)
            assert mc.conversion.condition[layer] == pytest.approx(np.linalg.cond(W, 1), rel=0.5)
        assert float(mc.conversion.residual_B.max()) < 1e-10


def test_figure1_similarity_on_real_minilm_matches_scipy(minilm_path: Path, vader_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(vader_adapter)
    conversions = compute_conversions(loralens.open_base(minilm_path), adapter, device="cpu")
    report = layer_similarity(conversions, seed=1)
    for name in ("query", "value"):
        for factor in ("A", "B", "BA"):
            s = report.modules[name][factor]
            X = conversions[name].matrix(factor).numpy()
            assert s.phi.shape == (6, 6) and s.i == s.j == 8
            for a in range(6):
                for b in range(6):
                    assert float(s.phi[a, b]) == pytest.approx(_phi_reference(X[a], X[b], 8, 8), abs=1e-9)
            assert s.mean_offdiag == pytest.approx(float(s.phi[~torch.eye(6, dtype=torch.bool)].mean()))
            assert s.random_expected == pytest.approx(8 / 384)
            assert 0 < s.random_mean_offdiag < 0.1
        # W^-1 B A has the column space of W^-1 B when A has full row rank.
        torch.testing.assert_close(report.modules[name]["BA"].phi, report.modules[name]["B"].phi, atol=1e-9, rtol=0)


def test_similarity_is_seeded_and_settings_recorded(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    conversions = compute_conversions(loralens.base_for(adapter, tiny_bert), adapter, device="cpu")
    a = layer_similarity(conversions, seed=7, i=2, j=3, side="left")
    b = layer_similarity(conversions, seed=7, i=2, j=3, side="left")
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.to_dict()["settings"]["i"] == 2 and a.modules["query"]["A"].random_expected == pytest.approx(3 / 32)


def test_non_square_llama_uses_least_squares(tmp_path: Path, tiny_llama: Path) -> None:
    adapter_dir = checkpoints.lora_adapter(tiny_llama, tmp_path / "a", arch="llama", r=4, targets=["q_proj", "v_proj"])
    adapter = loralens.load_lora_adapter(adapter_dir)
    conversions = compute_conversions(loralens.open_base(tiny_llama), adapter, device="cpu")
    assert conversions["q_proj"].conversion.convention == "solve"
    v = conversions["v_proj"]
    assert v.conversion.convention == "lstsq"
    base = load_file(tiny_llama / "model.safetensors")
    for layer in range(2):
        W = base[f"model.layers.{layer}.self_attn.v_proj.weight"].double().numpy()  # (16, 64)
        A = adapter.modules["v_proj"].A[layer].double().numpy()
        B = adapter.modules["v_proj"].B[layer].double().numpy()
        np.testing.assert_allclose(v.conversion.A[layer].numpy(), np.linalg.pinv(W.T) @ A.T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(v.conversion.B[layer].numpy(), np.linalg.pinv(W) @ B, rtol=1e-8, atol=1e-10)
    report = layer_similarity(conversions)
    assert report.modules["v_proj"]["A"].dim == 16 and report.modules["v_proj"]["B"].dim == 64


@pytest.mark.slow
def test_real_smollm2_v_proj_least_squares(smollm2: Path, smollm2_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(smollm2_adapter)
    conversions = compute_conversions(loralens.open_base(smollm2), adapter, device="cpu", layer_batch=8)
    v = conversions["v_proj"]
    assert v.conversion.convention == "lstsq" and conversions["q_proj"].conversion.convention == "solve"
    assert v.conversion.A.shape == (30, 192, 8) and v.conversion.B.shape == (30, 576, 8)
    with safe_open(smollm2 / "model.safetensors", framework="np") as f:
        for layer in (0, 17, 29):
            W = f.get_tensor(f"model.layers.{layer}.self_attn.v_proj.weight").astype(np.float64)  # (192, 576)
            A = adapter.modules["v_proj"].A[layer].double().numpy()
            B = adapter.modules["v_proj"].B[layer].double().numpy()
            # Tolerance: a full-row-rank (192, 576) W with cond ~ 1e2..1e3; float64 agrees to ~1e-13 relative.
            np.testing.assert_allclose(v.conversion.A[layer].numpy(), np.linalg.pinv(W.T) @ A.T, rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(v.conversion.B[layer].numpy(), np.linalg.pinv(W) @ B, rtol=1e-7, atol=1e-9)
    report = layer_similarity(conversions)
    phi = report.modules["v_proj"]["A"].phi
    assert phi.shape == (30, 30) and report.modules["v_proj"]["A"].dim == 192
    torch.testing.assert_close(torch.diagonal(phi), torch.ones(30, dtype=phi.dtype), atol=1e-9, rtol=0)


def test_layer_batches_give_the_same_result(minilm_path: Path, vader_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(vader_adapter)
    base = loralens.open_base(minilm_path)
    whole = compute_conversions(base, adapter, device="cpu", modules=["value"])
    batched = compute_conversions(base, adapter, device="cpu", modules=["value"], layer_batch=4)
    torch.testing.assert_close(whole["value"].conversion.B, batched["value"].conversion.B, rtol=0, atol=0)
    assert batched["value"].base_keys == whole["value"].base_keys


def _base_with(folder: Path, tiny_bert: Path, key: str, W: torch.Tensor) -> Path:
    """A copy of the tiny BERT base with the tensor ``key`` replaced by ``W`` (any float dtype)."""
    tensors = load_file(tiny_bert / "model.safetensors")
    tensors[key] = W.contiguous()
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_exactly_singular_base_weight_names_the_layer(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    key = "encoder.layer.1.attention.self.value.weight"
    W = load_file(tiny_bert / "model.safetensors")[key].clone()
    W[5] = 0.0  # a zero row: an exactly zero pivot
    base = _base_with(tmp_path / "b", tiny_bert, key, W)
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    with pytest.raises(SingularMatrixError, match=r"'value'.*exactly singular at layers \[1\]") as info:
        compute_conversions(loralens.open_base(base), adapter, device="cpu")
    assert info.value.indices == (1,)


def test_near_singular_base_weight_is_solved_by_least_squares(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path
) -> None:
    # value layer 1 (stored as float64): singular values in [0.01, 1] and one of 1e-17, condition past 1 / eps64
    rng = np.random.default_rng(8)
    d = 32
    Q1, Q2 = (np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(2))
    W = (Q1 * np.concatenate([np.logspace(0, -2, d - 1), [1e-17]])) @ Q2
    base = _base_with(tmp_path / "b", tiny_bert, "encoder.layer.1.attention.self.value.weight", torch.from_numpy(W))
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)

    with pytest.warns(NearSingularWarning) as info:
        conversions = compute_conversions(loralens.open_base(base), adapter, device="cpu")

    assert len(info) == 1
    message, c = str(info[0].message), conversions["value"].conversion
    assert message.startswith(f"module 'value': base weight in {base} is near-singular") and "layers [1]" in message
    for value in (c.condition[1], c.residual_A[1], c.residual_B[1]):
        assert f"{float(value):.2g}" in message
    assert c.fallback.tolist() == [False, True] and not conversions["query"].conversion.fallback.any()
    A, B = (getattr(adapter.modules["value"], f)[1].double().numpy() for f in "AB")
    cutoff = np.finfo(np.float64).eps * d  # the fallback's: singular values below eps * d * sigma_max dropped
    for X, Y, residual in ((c.A[1], A.T, c.residual_A[1]), (c.B[1], B, c.residual_B[1])):
        ref = scipy.linalg.lstsq(W, Y, cond=cutoff, lapack_driver="gelsd")[0]
        # Tolerance: the kept spectrum has condition 100, so float64 agrees to ~1e-13.
        np.testing.assert_allclose(X.numpy(), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
        assert float(residual) == pytest.approx(np.linalg.norm(W @ ref - Y) / np.linalg.norm(Y), rel=1e-8)
    # Every other layer keeps its LU solution, bit for bit.
    before = compute_conversions(loralens.open_base(tiny_bert), adapter, device="cpu")
    assert torch.equal(c.B[0], before["value"].conversion.B[0]) and torch.equal(c.A[0], before["value"].conversion.A[0])
    assert torch.equal(conversions["query"].conversion.B, before["query"].conversion.B)
    # One layer per batch gives the same numbers; the similarity settings record the layer.
    with pytest.warns(NearSingularWarning, match=r"layers \[1\]"):
        one_by_one = compute_conversions(loralens.open_base(base), adapter, device="cpu", layer_batch=1)
    torch.testing.assert_close(one_by_one["value"].conversion.B, c.B, rtol=1e-12, atol=0)
    settings = layer_similarity(conversions).to_dict()["settings"]
    assert settings["least_squares_layers"] == {"query": [], "value": [1]}
    assert settings["conventions"] == {"query": "solve", "value": "solve"}


def test_untrained_adapter_says_so(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    tensors = load_file(tiny_bert_adapter / "adapter_model.safetensors")
    zeroed = {k: (torch.zeros_like(v) if k.endswith("lora_B.weight") else v) for k, v in tensors.items()}
    folder = tmp_path / "untrained"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tiny_bert_adapter / "adapter_config.json").read_text())
    save_file(zeroed, str(folder / "adapter_model.safetensors"))
    adapter = loralens.load_lora_adapter(folder)
    conversions = compute_conversions(loralens.open_base(tiny_bert), adapter, device="cpu")
    with pytest.raises(RankError, match="untrained adapter"):
        layer_similarity(conversions, factors=("B",))


def test_i_above_rank_is_refused(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    conversions = compute_conversions(loralens.open_base(tiny_bert), adapter, device="cpu")
    with pytest.raises(RankError, match="rank"):
        layer_similarity(conversions, i=5)


def test_module_selection(tiny_bert_adapter: Path) -> None:
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    assert select_modules(adapter, ["value"]) == ["value"]
    assert select_modules(adapter, ["self.query", "value"]) == ["query", "value"]
    assert select_modules(adapter, None) == ["query", "value"]
    with pytest.raises(LoralensError, match="matches no modules.*available: query, value"):
        select_modules(adapter, ["key"])


def test_embedded_default_adapter_analyses() -> None:
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    assert adapter.config["r"] == 8 and sorted(adapter.modules) == ["query", "value"]
    conversions = compute_conversions(
        loralens.base_for(adapter, loralens.examples.default_base()), adapter, device="cpu"
    )
    report = layer_similarity(conversions)
    for name in ("query", "value"):
        for factor in ("A", "B"):
            s = report.modules[name][factor]
            torch.testing.assert_close(s.phi.diagonal(), torch.ones(6, dtype=s.phi.dtype))
            assert 0 <= s.mean_offdiag <= 1


# ---------------------------------------------------------------------------------- the W-conditioned null (#13)


def _synthetic(folder: Path, W: torch.Tensor, r: int, seed: int = 0) -> tuple[Path, Path]:
    """A Llama-shaped base holding only ``q_proj`` = ``W`` ``(L, d, d)`` (float64) and a random PEFT LoRA adapter."""
    L, d, _ = W.shape
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    save_file(
        {f"model.layers.{k}.self_attn.q_proj.weight": W[k].clone() for k in range(L)},
        str(base / "model.safetensors"),
    )
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d, "num_hidden_layers": L}
    (base / "config.json").write_text(json.dumps(config | {"num_attention_heads": 1}))
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for k in range(L):
        prefix = f"base_model.model.model.layers.{k}.self_attn.q_proj"
        lora[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=gen, dtype=torch.float64)
        lora[f"{prefix}.lora_B.weight"] = torch.randn(d, r, generator=gen, dtype=torch.float64)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0}
    peft |= {"target_modules": ["q_proj"], "base_model_name_or_path": str(base), "fan_in_fan_out": False}
    (adapter / "adapter_config.json").write_text(json.dumps(peft))
    return base, adapter


def _w_null_report(base: Path, adapter: Path, draws: int, **kwargs: object) -> loralens.SimilarityReport:
    (report,) = loralens.adapter_similarity(
        loralens.open_base(base), [loralens.load_lora_adapter(adapter)], device="cpu", null_draws=draws, **kwargs
    )
    return report


def _mc_mean_offdiag(W: np.ndarray, r: int, side_rows: str, draws: int, seed: int) -> tuple[float, float]:
    """Independent float64 Monte-Carlo reference in numpy: mean over draws of each draw's mean off-diagonal phi of
    W_l^-1 R_l (left singular vectors, i = j = r); returns (mean, its standard error)."""
    rng = np.random.default_rng(seed)
    L, d, _ = W.shape
    off = ~np.eye(L, dtype=bool)
    values = []
    for _ in range(draws):
        U = []
        for k in range(L):
            R = rng.standard_normal((d, r))
            U.append(np.linalg.svd(np.linalg.solve(W[k], R), full_matrices=False)[0][:, :r])
        phi = np.array([[np.sum((U[a].T @ U[b]) ** 2) / r for b in range(L)] for a in range(L)])
        values.append(phi[off].mean())
    return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(draws))


def test_w_null_matches_a_numpy_monte_carlo(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    L, d, r = 4, 24, 3
    # Layers share a spread spectrum with partly common singular directions: a null well above max(i, j) / d.
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    W = np.stack(
        [(Q + 0.5 * rng.standard_normal((d, d)) / np.sqrt(d)) * np.logspace(0, -1.5, d) @ Q.T for _ in range(L)]
    )
    base, adapter = _synthetic(tmp_path, torch.from_numpy(W), r)
    report = _w_null_report(base, adapter, 200, seed=5)
    ref, ref_se = _mc_mean_offdiag(W, r, "left", 400, seed=11)
    for factor in ("A", "B", "BA"):
        w = report.modules["q_proj"][factor].w_null
        assert w is not None and w.draws == 200
        se = float(np.hypot(w.mean_offdiag_std / np.sqrt(200), ref_se))
        # Tolerance: 4 standard errors of the difference of two independent Monte-Carlo means. A^T's right-hand
        # side has W's shape too (square W), so all three factors share the reference in distribution.
        assert abs(w.mean_offdiag - ref) < 4 * se, (factor, w.mean_offdiag, ref, se)
    assert ref > 2 * r / d  # the case is informative: W pulls the null well above the Gaussian baseline


def test_w_null_of_the_identity_is_the_gaussian_baseline(tmp_path: Path) -> None:
    L, d, r = 4, 32, 2
    base, adapter = _synthetic(tmp_path, torch.eye(d, dtype=torch.float64).expand(L, d, d), r)
    report = _w_null_report(base, adapter, 200)
    for factor in ("A", "B", "BA"):
        w = report.modules["q_proj"][factor].w_null
        assert w is not None
        se = w.mean_offdiag_std / np.sqrt(w.draws)
        # Tolerance: 4 standard errors around E = max(i, j) / d = r / d.
        assert abs(w.mean_offdiag - r / d) < 4 * se, (factor, w.mean_offdiag, se)


def test_w_null_rises_toward_one_on_a_shared_small_subspace(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    L, d, r = 4, 24, 2
    # W = U S V^T with the smallest singular values on directions V[:, -r:] that every layer shares: W^-1 = V S^-1 U^T
    # maps any right-hand side mostly onto them.
    shared = np.linalg.qr(rng.standard_normal((d, r)))[0]
    W = []
    for _ in range(L):
        V = np.hstack([np.linalg.qr(np.hstack([shared, rng.standard_normal((d, d - r))]))[0][:, r:], shared])
        U = np.linalg.qr(rng.standard_normal((d, d)))[0]
        W.append(U @ np.diag(np.concatenate([np.linspace(1, 0.5, d - r), [1e-3, 1e-3]])) @ V.T)
    base, adapter = _synthetic(tmp_path, torch.from_numpy(np.stack(W)), r)
    report = _w_null_report(base, adapter, 20)
    for factor in ("A", "B", "BA"):
        s = report.modules["q_proj"][factor]
        assert s.w_null is not None and s.w_null.mean_offdiag > 0.8, (factor, s.w_null.mean_offdiag)
        assert s.random_mean_offdiag < 0.3


def test_w_null_statistics_are_sane_and_byte_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    L, d, r = 3, 16, 2
    W = torch.from_numpy(rng.standard_normal((L, d, d)) / 4 + 2 * np.eye(d))
    base, adapter = _synthetic(tmp_path, W, r)
    one = _w_null_report(base, adapter, 7, seed=2)
    again = _w_null_report(base, adapter, 7, seed=2, layer_batch=1)  # batching does not change the draws
    assert json.dumps(one.to_dict()["modules"]) == json.dumps(again.to_dict()["modules"])
    off = _w_null_report(base, adapter, 0, seed=2)
    for factor, s in one.modules["q_proj"].items():
        w = s.w_null
        assert w is not None and w.draws == 7
        assert bool(((w.p > 0) & (w.p <= 1)).all()) and bool(torch.isfinite(w.z).all())
        assert torch.equal(w.p.diagonal(), torch.ones(L, dtype=w.p.dtype)) and bool((w.z.diagonal() == 0).all())
        allowed = torch.arange(1, 9, dtype=w.p.dtype) / 8  # (1 + count) / (N + 1)
        assert bool(torch.isclose(w.p.unsqueeze(-1), allowed).any(dim=-1).all())
        # The W-null is additive: the observed and Gaussian numbers are those of a run without it.
        assert torch.equal(s.phi, off.modules["q_proj"][factor].phi)
        assert torch.equal(s.random_phi, off.modules["q_proj"][factor].random_phi)
        assert off.modules["q_proj"][factor].w_null is None
        expected = (w.mean_offdiag - s.random_mean_offdiag) / (s.mean_offdiag - s.random_mean_offdiag)
        assert w.share_of_excess == pytest.approx(expected)
        d_json = one.to_dict()["modules"]["q_proj"][factor]["w_null"]
        assert set(d_json) == {
            "draws",
            "mean_offdiag",
            "mean_offdiag_std",
            "share_of_excess",
            "phi_mean",
            "phi_std",
            "z",
            "p",
        }
    assert one.settings["null_draws"] == 7 and "w_null:<factor>" in one.settings["w_null_baseline"]
    assert off.to_dict()["modules"]["q_proj"]["A"]["w_null"] is None and off.settings["null_draws"] == 0


def test_w_null_of_a_square_w_solves_one_block_for_a_and_b(tmp_path: Path) -> None:
    # Square W: W^-1 R_A and W^-1 R_B are one distribution, so the null solves the B draws once and uses them for
    # both; R_A (independent of R_B) enters only the B A null.
    rng = np.random.default_rng(6)
    L, d, r, N = 3, 12, 2, 4
    W = rng.standard_normal((L, d, d)) + 3 * np.eye(d)
    base, adapter = _synthetic(tmp_path, torch.from_numpy(W), r)
    (mc,) = compute_conversions(
        loralens.open_base(base), loralens.load_lora_adapter(adapter), device="cpu", null_draws=N, null_seed=9
    ).values()
    null = mc.null
    assert null is not None and null.shared and null.A is null.B
    for layer in range(L):
        R_B = gaussian(N, d, r, generator=seeded_generator(9, "q_proj", layer, purpose="w_null:B"))
        R_A = gaussian(N, d, r, generator=seeded_generator(9, "q_proj", layer, purpose="w_null:A"))
        # float64 reference; tolerance: a well-conditioned 12 x 12 solve agrees to ~1e-13.
        np.testing.assert_allclose(null.B[:, layer].numpy(), np.linalg.solve(W[layer], R_B.numpy()), atol=1e-11)
        assert torch.equal(null.rhs_A[:, layer], R_A)
        assert not torch.equal(R_A, R_B)
    report = _w_null_report(base, adapter, N, seed=9)
    A, B = (report.modules["q_proj"][f].w_null for f in ("A", "B"))
    assert A is not None and B is not None and torch.equal(A.phi_mean, B.phi_mean)


def test_w_null_draws_are_validated(tmp_path: Path) -> None:
    base, adapter = _synthetic(tmp_path, torch.eye(8, dtype=torch.float64).expand(2, 8, 8) * 2, 2)
    for bad in (-1, 1):
        with pytest.raises(LoralensError, match="null_draws must be 0") as info:
            _w_null_report(base, adapter, bad)
        assert info.value.options == ("null_draws",)
    convs = compute_conversions(loralens.open_base(base), loralens.load_lora_adapter(adapter), device="cpu")
    with pytest.raises(LoralensError, match="carry no W-null draws") as info:
        layer_similarity(convs, null_draws=5)
    assert info.value.options == ("null_draws",)
    assert layer_similarity(convs).modules["q_proj"]["A"].w_null is None  # None: what the conversions carry


def test_w_null_on_the_shipped_default_adapter() -> None:
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    base = loralens.base_for(adapter, loralens.examples.default_base())
    (report,) = loralens.adapter_similarity(base, [adapter], device="cpu", null_draws=5)
    for name in ("query", "value"):
        for factor in ("A", "B", "BA"):
            s = report.modules[name][factor]
            w = s.w_null
            assert w is not None and w.draws == 5 and w.phi_mean.shape == (6, 6)
            # W^-1 lifts the null above the Gaussian E = 8 / 384, yet it stays a small phi.
            assert s.random_expected < w.mean_offdiag < 0.2 and 0 < w.mean_offdiag_std < w.mean_offdiag
            assert bool(torch.isfinite(w.z).all()) and bool(((w.p > 0) & (w.p <= 1)).all())
            assert np.isfinite(w.share_of_excess)

"""Full fine-tunes as virtual adapters (loralens.analyses.finetuned), against float64 numpy references.

Synthetic float64 checkpoints for the exact cases (a fine-tune that is a rank-r update, Conv1D layout, frozen
modules); a real full fine-tune of MiniLM on Rotten Tomatoes (``minilm_full_finetune``) for the rest.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

import checkpoints
import loralens
from loralens.analyses.finetuned import finetuned_adapter
from loralens.errors import LoralensError, ModelMismatchError, UnanalysedTensorsWarning
from loralens.io.base_weights import open_base


def _bert_like(folder: Path, weights: dict[str, np.ndarray], prefix: str = "") -> Path:
    """A float64 checkpoint holding ``weights`` (name -> (L, d_out, d_in)) as ``encoder.layer.N.<name>.weight``."""
    folder.mkdir(parents=True)
    tensors = {
        f"{prefix}encoder.layer.{k}.{name}.weight": torch.from_numpy(np.ascontiguousarray(W[k]))
        for name, W in weights.items()
        for k in range(W.shape[0])
    }
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


def _numpy_energy_rank(S: np.ndarray, tau: float) -> int:
    energy = np.cumsum(S**2)
    return int(np.argmax(energy >= tau * energy[-1] * (1 - 1e-12))) + 1


def test_a_rank_r_fine_tune_is_its_own_virtual_adapter(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    L, d, r = 3, 24, 3
    W0 = rng.standard_normal((L, d, d))
    dW = rng.standard_normal((L, d, r)) @ rng.standard_normal((L, r, d)) / 10
    base_dir = _bert_like(tmp_path / "base", {"attention.self.query": W0})
    ft_dir = _bert_like(tmp_path / "ft", {"attention.self.query": W0 + dW}, prefix="bert.")
    base = open_base(base_dir)
    ft = finetuned_adapter(base, ft_dir, tau=1.0, device="cpu")
    q = ft.modules["query"]
    assert q.energy_rank.tolist() == [r] * L and q.rank.tolist() == [r] * L
    mod = ft.adapter.modules["query"]
    assert mod.ranks == (r,) * L and mod.scaling == (1.0,) * L
    # dW = W_ft - W0 is rank r up to the rounding of W0 + dW - W0: B A reproduces it (float64, ~1e-15 relative).
    np.testing.assert_allclose((mod.B @ mod.A).numpy(), (W0 + dW) - W0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q.energy_captured.numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(q.update_norm.numpy(), np.linalg.norm(dW, axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(q.relative_update.numpy(), q.update_norm.numpy() / np.linalg.norm(W0, axis=(1, 2)))
    # PiSSA's split: B = U sqrt(S), A = sqrt(S) V^T, so B^T B = A A^T = diag(S)
    torch.testing.assert_close(mod.B.mT @ mod.B, mod.A @ mod.A.mT, rtol=1e-10, atol=1e-12)


def test_energy_rank_and_top_k_match_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    L, d_out, d_in = 2, 40, 30
    W0 = rng.standard_normal((L, d_out, d_in))
    # a full-rank update with a decaying spectrum, as fine-tunes have
    U = np.linalg.qr(rng.standard_normal((L, d_out, d_in)))[0]
    V = np.linalg.qr(rng.standard_normal((L, d_in, d_in)))[0]
    dW = U * np.geomspace(1, 1e-3, d_in) @ V.transpose(0, 2, 1)
    base_dir = _bert_like(tmp_path / "base", {"intermediate.dense": W0})
    ft_dir = _bert_like(tmp_path / "ft", {"intermediate.dense": W0 + dW})
    base = open_base(base_dir)
    diff = (W0 + dW) - W0
    S_ref = np.linalg.svd(diff, compute_uv=False)
    for tau in (0.5, 0.9, 0.99):
        m = finetuned_adapter(base, ft_dir, tau=tau, device="cpu").modules["dense"]
        assert m.energy_rank.tolist() == [_numpy_energy_rank(S, tau) for S in S_ref]
    ft = finetuned_adapter(base, ft_dir, rank=4, device="cpu")
    m = ft.modules["dense"]
    total = (S_ref**2).sum(axis=1)
    np.testing.assert_allclose(m.energy_captured.numpy(), (S_ref[:, :4] ** 2).sum(axis=1) / total, rtol=1e-9)
    expected = [_numpy_energy_rank(S, 0.9) for S in S_ref]
    assert m.energy_rank.tolist() == [k if k <= 4 else -1 for k in expected]
    # the virtual layer is the best rank-4 approximation (Eckart-Young): its singular values are the top 4
    mod = ft.adapter.modules["dense"]
    got = np.linalg.svd((mod.B @ mod.A).numpy(), compute_uv=False)[:, :4]
    np.testing.assert_allclose(got, S_ref[:, :4], rtol=1e-8)
    # float32 gives the same ranks on this well-separated spectrum
    m32 = finetuned_adapter(base, ft_dir, rank=4, device="cpu", dtype=torch.float32).modules["dense"]
    np.testing.assert_allclose(m32.energy_captured.numpy(), m.energy_captured.numpy(), rtol=1e-4)


def test_conv1d_fine_tunes_are_read_as_out_by_in(tmp_path: Path) -> None:
    base_dir = checkpoints.gpt2_base(tmp_path / "gpt2", layers=2, hidden=16, heads=2)
    stored = load_file(str(base_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    changed = {
        k: (v + 0.1 * torch.randn(v.shape[0], 2, generator=gen) @ torch.randn(2, v.shape[1], generator=gen))
        if k.endswith("attn.c_attn.weight")
        else v
        for k, v in stored.items()
    }
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    save_file({k: v.contiguous() for k, v in changed.items()}, str(ft_dir / "model.safetensors"))
    (ft_dir / "config.json").write_text((base_dir / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnanalysedTensorsWarning)
        ft = finetuned_adapter(open_base(base_dir), ft_dir, rank=2, device="cpu")
    mod = ft.adapter.modules["c_attn"]
    assert mod.shape == (48, 16) and ft.adapter.fan_in_fan_out
    key = "h.0.attn.c_attn.weight"
    dW = (changed[key].double() - stored[key].double()).mT  # Conv1D stores (in, out)
    torch.testing.assert_close(mod.B[0] @ mod.A[0], dW, rtol=0, atol=1e-6)


def test_frozen_and_unchanged_modules(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    W0 = {
        "attention.self.query": rng.standard_normal((2, 8, 8)),
        "attention.self.value": rng.standard_normal((2, 8, 8)),
    }
    base = open_base(_bert_like(tmp_path / "base", W0))
    # value untouched: left out with a warning naming it
    ft = _bert_like(tmp_path / "ft", {**W0, "attention.self.query": W0["attention.self.query"] + 0.1})
    with pytest.warns(UnanalysedTensorsWarning, match="value equal the base's weights in every layer"):
        assert list(finetuned_adapter(base, ft, device="cpu").adapter.modules) == ["query"]
    # query changed in layer 1 only: refused, naming the layer
    partly = W0["attention.self.query"].copy()
    partly[1] += 0.1
    ft2 = _bert_like(tmp_path / "ft2", {**W0, "attention.self.query": partly})
    with pytest.raises(ModelMismatchError, match=r"'query' is unchanged in layers \[0\]"):
        finetuned_adapter(base, ft2, device="cpu", modules=["query"])
    same = _bert_like(tmp_path / "same", W0)
    with pytest.raises(ModelMismatchError, match="nothing was fine-tuned"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnanalysedTensorsWarning)
        finetuned_adapter(base, same, device="cpu")
    for bad in ({"rank": 0}, {"rank": "all"}, {"tau": 0.0}, {"tau": 1.5}, {"dtype": torch.float16}):
        with pytest.raises(LoralensError):
            finetuned_adapter(base, ft, device="cpu", **bad)  # type: ignore[arg-type]


# ------------------------------------------------------------- a real full fine-tune of MiniLM (training lane)


def _dense_dW(base: Path, ft: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    W0 = load_numpy(str(base / "model.safetensors"))[key].astype(np.float64)
    Wft = load_numpy(str(ft / "model.safetensors"))["bert." + key].astype(np.float64)
    return W0, Wft


def test_real_full_fine_tune_energy_ranks(minilm_path: Path, minilm_full_finetune: Path) -> None:
    base = open_base(minilm_path)
    ft = finetuned_adapter(base, minilm_full_finetune, modules=["query", "value"], device="cpu")
    for name, tail in (("query", "attention.self.query"), ("value", "attention.self.value")):
        m = ft.modules[name]
        assert m.layers == tuple(range(6))
        for layer in range(6):
            W0, Wft = _dense_dW(minilm_path, minilm_full_finetune, f"encoder.layer.{layer}.{tail}.weight")
            S = np.linalg.svd(Wft - W0, compute_uv=False)
            assert int(m.energy_rank[layer]) == _numpy_energy_rank(S, 0.9), (name, layer)
            assert 0.9 <= float(m.energy_captured[layer]) <= 1.0
        # a full fine-tune's update is far from low rank: k_0.9 well above a LoRA's r = 8 (measured 16-150 here)
        assert int(m.energy_rank.max()) > 8


def test_every_analysis_applies_to_a_real_full_fine_tune(minilm_path: Path, minilm_full_finetune: Path) -> None:
    base = open_base(minilm_path)
    # rank 384 keeps all of dW: DoRA's dM / dD of the virtual adapter must equal those of W_ft itself (dense).
    full = finetuned_adapter(base, minilm_full_finetune, modules=["value"], rank=384, device="cpu")
    report = loralens.magnitude_direction(base, full.adapter, device="cpu")
    W0, Wft = _dense_dW(minilm_path, minilm_full_finetune, "encoder.layer.2.attention.self.value.weight")
    m0, m1 = np.linalg.norm(W0, axis=1), np.linalg.norm(Wft, axis=1)
    dM = np.mean(np.abs(m1 - m0))
    dD = np.mean(1 - np.sum(W0 * Wft, axis=1) / (m0 * m1))
    # Tolerance: dD ~ 1e-7 here, a difference of cosines near 1; float64 leaves ~1e-13 absolute.
    assert float(report.modules["value"].dM[2]) == pytest.approx(dM, rel=1e-9)
    assert float(report.modules["value"].dD[2]) == pytest.approx(dD, rel=1e-6, abs=1e-12)
    # the default (energy rank) virtual adapter through the adapter analyses
    ft = finetuned_adapter(base, minilm_full_finetune, modules=["query", "value"], device="cpu")
    (sim,) = loralens.adapter_similarity(base, [ft.adapter], device="cpu", null_draws=4)
    assert sim.modules["value"]["B"].phi.shape == (6, 6)
    lora = loralens.load_lora_adapter(loralens.examples.default_adapter())
    overlap = loralens.rank_overlap(lora, ft.adapter, base=base, i=8, j=8, device="cpu")
    grid = np.array(overlap.to_dict()["modules"]["query"]["factors"]["B"]["grid"], dtype=float)  # (L, i, j)
    assert grid.shape == (6, 8, 8) and np.isfinite(grid).all() and ((grid >= 0) & (grid <= 1 + 1e-9)).all()
    intr = loralens.intruder_dimensions(base, ft.adapter, k=8, device="cpu", cache=False).to_dict()
    assert set(intr["modules"]) == {"query", "value"}
    inputs = sim.settings["inputs"]["adapter"]
    assert inputs["full_finetune"]["path"] == str(minilm_full_finetune)
    assert [f["name"] for f in inputs["files"]] == ["model.safetensors", "config.json"]

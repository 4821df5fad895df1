"""The LoRA-paper analyses through the loaders (loralens.analyses.lowrank), against numpy/scipy on the raw files.

References read the safetensors files directly (``safetensors.numpy``), pair tensors by key suffix, form ``dW``
densely and use numpy's SVD and ``scipy.linalg.subspace_angles``: a route that shares nothing with the code
under test. Tolerances as in ``tests/core/test_lowrank.py``: ``1e-10`` absolute on phi and cos^2, ``1e-9``
relative on norms and singular values (float32 files are upcast to float64 on both sides), ``1e-8`` radians on
principal angles.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

import checkpoints
import loralens
from loralens.analyses.lowrank import amplification_report, config_checks, rank_overlap, spectra_report
from loralens.errors import AdapterConfigWarning, LoralensError, ModelMismatchError, RankError
from loralens.io.outputs import json_text

PHI_TOL = 1e-10
REL = 1e-9
ANGLE_TOL = 1e-8


# ------------------------------------------------------------------------------------------- references


def raw_factors(adapter_dir: Path, module: str, layer: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A (r, d_in), B (d_out, r) float64 straight from the file, and alpha / r from the config."""
    tensors = load_numpy(str(adapter_dir / "adapter_model.safetensors"))
    suffix = f"layer.{layer}.attention.self.{module}"
    (a_key,) = [k for k in tensors if k.endswith(f"{suffix}.lora_A.weight")]
    (b_key,) = [k for k in tensors if k.endswith(f"{suffix}.lora_B.weight")]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    A, B = tensors[a_key].astype(np.float64), tensors[b_key].astype(np.float64)
    pattern = config.get("rank_pattern") or {}
    r = next((v for k, v in pattern.items() if suffix.endswith(k)), config["r"])
    assert A.shape[0] == r
    return A, B, config["lora_alpha"] / r


def raw_weight(base_dir: Path, module: str, layer: int) -> np.ndarray:
    tensors = load_numpy(str(base_dir / "model.safetensors"))
    (key,) = [k for k in tensors if k.endswith(f"layer.{layer}.attention.self.{module}.weight")]
    return tensors[key].astype(np.float64)


def phi_ref(X: np.ndarray, Y: np.ndarray) -> float:
    return float(np.sum(np.cos(scipy.linalg.subspace_angles(X, Y)) ** 2) / min(X.shape[1], Y.shape[1]))


def right_basis(A: np.ndarray) -> np.ndarray:
    return np.linalg.svd(A, full_matrices=False)[2].T


def left_basis(B: np.ndarray) -> np.ndarray:
    return np.linalg.svd(B, full_matrices=False)[0]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A rank-6 adapter of another seed on the same tiny BERT as ``tiny_bert_adapter`` (rank 4)."""
    return checkpoints.lora_adapter(tiny_bert, tmp_path_factory.mktemp("bert-lora-r6"), arch="bert", r=6, seed=3)


@pytest.fixture(scope="module")
def pattern_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """Rank 4, but 8 in layer 1's query (PEFT rank_pattern): the loader zero-pads layer 0 to rank 8."""
    return checkpoints.lora_adapter(
        tiny_bert,
        tmp_path_factory.mktemp("bert-lora-pattern"),
        arch="bert",
        r=4,
        rank_pattern={"layer.1.attention.self.query": 8},
        seed=5,
    )


def load(path: Path) -> loralens.LoraAdapter:
    return loralens.load_lora_adapter(path)


# ------------------------------------------------------------------------------------------------ overlap


def test_overlap_grids_match_scipy(tiny_bert: Path, tiny_bert_adapter: Path, second_adapter: Path) -> None:
    report = rank_overlap(
        load(tiny_bert_adapter), load(second_adapter), base=loralens.open_base(tiny_bert), device="cpu"
    )
    assert set(report.modules) == {"query", "value"}
    for name, mo in report.modules.items():
        assert mo.ranks == ((4, 4), (6, 6)) and mo.layers == (0, 1)
        for f, fo in mo.factors.items():
            assert fo.grid.shape == (2, 4, 6) and fo.side == {"A": "right", "B": "left"}[f] and fo.dim == 32
            for layer in mo.layers:
                A1, B1, _ = raw_factors(tiny_bert_adapter, name, layer)
                A2, B2, _ = raw_factors(second_adapter, name, layer)
                U1, U2 = (right_basis(A1), right_basis(A2)) if f == "A" else (left_basis(B1), left_basis(B2))
                for i in range(1, 5):
                    for j in range(1, 7):
                        assert abs(float(fo.grid[layer, i - 1, j - 1]) - phi_ref(U1[:, :i], U2[:, :j])) < PHI_TOL
            assert float(fo.random_expected[1, 4]) == pytest.approx(5 / 32)


def test_an_adapter_against_itself_has_phi_one_on_the_diagonal(tiny_bert_adapter: Path) -> None:
    report = rank_overlap(load(tiny_bert_adapter), load(tiny_bert_adapter), device="cpu")
    for mo in report.modules.values():
        for fo in mo.factors.values():
            torch.testing.assert_close(fo.diagonal, torch.ones(2, 4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_overlap_extents_and_rank_pattern_padding(tiny_bert_adapter: Path, pattern_adapter: Path) -> None:
    report = rank_overlap(load(pattern_adapter), load(tiny_bert_adapter), modules=["query"], factors=["A"])
    grid = report.modules["query"].factors["A"].grid
    assert grid.shape == (2, 8, 4)
    assert bool(grid[0, 4:].isnan().all()) and not bool(grid[0, :4].isnan().any())  # layer 0 has rank 4
    assert not bool(grid[1].isnan().any())
    assert report.to_dict()["modules"]["query"]["factors"]["A"]["grid"][0][5] == [None] * 4  # JSON null
    small = rank_overlap(load(pattern_adapter), load(tiny_bert_adapter), modules=["query"], i=2, j=3)
    torch.testing.assert_close(small.modules["query"].factors["A"].grid, grid[:, :2, :3])
    with pytest.raises(RankError, match=r"'query \(A\)' at layers \[0\]: grid extent i=5 exceeds the rank 4") as info:
        rank_overlap(load(pattern_adapter), load(tiny_bert_adapter), modules=["query"], i=5)
    assert info.value.indices == (0,)


def test_overlap_refuses_mismatched_adapters(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    a = load(tiny_bert_adapter)
    other_base = checkpoints.bert_base(tmp_path / "wide", layers=2, hidden=48)
    wide_dir = checkpoints.lora_adapter(other_base, tmp_path / "wide-lora", arch="bert", r=4)
    wide = load(wide_dir)
    with pytest.raises(ModelMismatchError, match="record different bases"):
        rank_overlap(a, wide)
    with pytest.raises(ModelMismatchError, match=re.escape(str(wide_dir)) + ".*trained on another base"):
        rank_overlap(a, wide, base=loralens.open_base(tiny_bert))  # does not fit the base given
    same_name = load(_rename_base(wide_dir, str(a.base_model_name_or_path)))
    with pytest.raises(ModelMismatchError, match="32 x 32 in .* but 48 x 48 in .*different bases"):
        rank_overlap(a, same_name)
    only_query = load(checkpoints.lora_adapter(tiny_bert, tmp_path / "q", arch="bert", targets=["query"]))
    with pytest.raises(ModelMismatchError, match=r"value only in .*choose the shared ones to compare: query") as info:
        rank_overlap(a, only_query)
    assert info.value.option == "modules"
    assert set(rank_overlap(a, only_query, modules=["query"]).modules) == {"query"}
    one_layer = load(checkpoints.lora_adapter(tiny_bert, tmp_path / "l1", arch="bert", layers_to_transform=[1]))
    with pytest.raises(ModelMismatchError, match=r"different layers: \[0\] only in"):
        rank_overlap(a, one_layer)
    with pytest.raises(LoralensError, match="unknown factor 'BA'"):
        rank_overlap(a, a, factors=["BA"])


def _rename_base(adapter_dir: Path, base: str) -> Path:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    return adapter_dir


def test_untrained_adapter_is_named(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    tensors = load_file(tiny_bert_adapter / "adapter_model.safetensors")
    folder = tmp_path / "untrained"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tiny_bert_adapter / "adapter_config.json").read_text())
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
        str(folder / "adapter_model.safetensors"),
    )
    untrained, base = load(folder), loralens.open_base(tiny_bert)
    with pytest.raises(RankError, match=r"'query \(B\)' at layers \[0, 1\].*untrained adapter"):
        rank_overlap(untrained, load(tiny_bert_adapter))
    for analysis in (amplification_report, spectra_report):
        with pytest.raises(RankError, match=r"'query' at layers \[0, 1\].*untrained adapter"):
            analysis(base, untrained, device="cpu")


# ------------------------------------------------------------------------------------------ amplification


def test_amplification_matches_dense_numpy(tiny_bert: Path, second_adapter: Path) -> None:
    report = amplification_report(loralens.open_base(tiny_bert), load(second_adapter), n_random=4, device="cpu")
    for name, ma in report.modules.items():
        assert ma.random_projection.shape == (2, 4) and ma.ranks == (6, 6)
        for layer in ma.layers:
            A, B, s = raw_factors(second_adapter, name, layer)
            W = raw_weight(tiny_bert, name, layer)
            dW = s * B @ A
            U, _, Vh = np.linalg.svd(dW)
            U, V = U[:, :6], Vh[:6].T
            S_W = np.linalg.svd(W, compute_uv=False)
            projection = np.linalg.norm(U.T @ W @ V)
            assert float(ma.dW_projection[layer]) == pytest.approx(projection, rel=REL)
            assert float(ma.W_top_projection[layer]) == pytest.approx(np.sqrt(np.sum(S_W[:6] ** 2)), rel=REL)
            assert float(ma.amplification[layer]) == pytest.approx(np.linalg.norm(dW) / projection, rel=REL)
            assert float(ma.W_norm[layer]) == pytest.approx(np.linalg.norm(W), rel=REL)
            assert float(ma.random_expected[layer]) == pytest.approx(6 * np.linalg.norm(W) / 32, rel=REL)
            assert bool((ma.random_projection[layer] < ma.W_top_projection[layer]).all())


def test_amplification_is_seeded_per_layer(tiny_bert: Path, second_adapter: Path) -> None:
    base, adapter = loralens.open_base(tiny_bert), load(second_adapter)
    whole = amplification_report(base, adapter, n_random=3, seed=1, device="cpu")
    batched = amplification_report(base, adapter, n_random=3, seed=1, device="cpu", layer_batch=1, modules=["value"])
    for field in ("random_projection", "dW_projection", "amplification"):
        torch.testing.assert_close(getattr(batched.modules["value"], field), getattr(whole.modules["value"], field))
    other = amplification_report(base, adapter, n_random=3, seed=2, device="cpu")
    assert not torch.equal(other.modules["value"].random_projection, whole.modules["value"].random_projection)
    assert math.isnan(float(amplification_report(base, adapter, n_random=0).modules["value"].random_mean[0]))


def test_rank_pattern_layers_use_their_own_rank(tiny_bert: Path, pattern_adapter: Path) -> None:
    base, adapter = loralens.open_base(tiny_bert), load(pattern_adapter)
    amp = amplification_report(base, adapter, n_random=0, device="cpu", modules=["query"]).modules["query"]
    spec = spectra_report(base, adapter, device="cpu", modules=["query"]).modules["query"]
    assert amp.ranks == (4, 8)
    for layer, r in ((0, 4), (1, 8)):
        A, B, s = raw_factors(pattern_adapter, "query", layer)
        W = raw_weight(tiny_bert, "query", layer)
        assert float(amp.W_top_projection[layer]) == pytest.approx(
            np.sqrt(np.sum(np.linalg.svd(W, compute_uv=False)[:r] ** 2)), rel=REL
        )
        S = np.linalg.svd(s * B @ A, compute_uv=False)[:r]
        np.testing.assert_allclose(spec.singular_values[layer, :r].numpy(), S, rtol=REL)
    assert bool(spec.singular_values[0, 4:].isnan().all()) and bool(spec.principal_angles[0, 4:].isnan().all())


# ------------------------------------------------------------------------------------------------ spectra


def test_spectra_match_dense_numpy_and_scipy(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    report = spectra_report(loralens.open_base(tiny_bert), load(tiny_bert_adapter), energy_threshold=0.75)
    for name, ms in report.modules.items():
        for layer in ms.layers:
            A, B, s = raw_factors(tiny_bert_adapter, name, layer)
            W = raw_weight(tiny_bert, name, layer)
            dW = s * B @ A
            S = np.linalg.svd(dW, compute_uv=False)[:4]
            U_W = np.linalg.svd(W)[0][:, :4]
            np.testing.assert_allclose(ms.singular_values[layer].numpy(), S, rtol=REL)
            angles = np.sort(scipy.linalg.subspace_angles(dW, U_W))
            np.testing.assert_allclose(ms.principal_angles[layer].numpy(), angles, atol=ANGLE_TOL)
            p = S / S.sum()
            assert float(ms.effective_rank_entropy[layer]) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=REL)
            energy = np.cumsum(S**2) / np.sum(S**2)
            assert int(ms.effective_rank_energy[layer]) == int(np.argmax(energy >= 0.75)) + 1
            assert float(ms.phi_W_top[layer]) == pytest.approx(phi_ref(dW, U_W), abs=PHI_TOL)
    with pytest.raises(LoralensError, match="threshold"):
        spectra_report(loralens.open_base(tiny_bert), load(tiny_bert_adapter), energy_threshold=1.5)


def test_reports_are_json_ready(tiny_bert: Path, tiny_bert_adapter: Path, second_adapter: Path) -> None:
    base, a, b = loralens.open_base(tiny_bert), load(tiny_bert_adapter), load(second_adapter)
    overlap = json.loads(json_text(rank_overlap(a, b, base=base).to_dict()))
    assert overlap["adapters"] == [str(a.path), str(b.path)] and "phi(i, j)" in overlap["definition"]
    assert len(overlap["modules"]["value"]["factors"]["B"]["grid"][1]) == 4
    amp = json.loads(json_text(amplification_report(base, a, n_random=2).to_dict()))
    assert set(amp["modules"]["query"]) >= {"dW_projection", "W_top_projection", "amplification", "random_expected"}
    assert len(amp["modules"]["query"]["random_projection_draws"][0]) == 2
    spec = json.loads(json_text(spectra_report(base, a).to_dict()))
    assert len(spec["modules"]["value"]["principal_angles_deg"][0]) == 4 and spec["settings"]["energy_threshold"] == 0.9


# ------------------------------------------------------------------------------------------ health checks


def dense_health(W: np.ndarray, dW: np.ndarray, r: int) -> tuple[float, float, float]:
    """dominance, spike ratio (NaN for r = 1), stable rank from numpy's dense SVDs of the formed dW and of W."""
    S = np.linalg.svd(dW, compute_uv=False)[:r]
    S_W = np.linalg.svd(W, compute_uv=False)
    return S[0] / S_W[0], (S[0] / S[1] if r > 1 else math.nan), float(np.sum(S**2) / S[0] ** 2)


def test_health_numbers_of_the_shipped_adapter_equal_dense_references(minilm_path: Path) -> None:
    """The shipped default adapter (r = alpha = 8, plain LoRA on the real MiniLM): every layer's dominance, spike
    ratio and stable rank equal those of the formed s B A and W0, the values are sane, and its config is clean."""
    from loralens.examples import default_adapter

    folder = default_adapter(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = spectra_report(loralens.open_base(minilm_path), load(folder), device="cpu")
    assert not [w for w in caught if issubclass(w.category, AdapterConfigWarning)]
    assert report.checks == ()
    for name, ms in report.modules.items():
        assert ms.ranks == (8,) * 6
        for n, layer in enumerate(ms.layers):
            A, B, s = raw_factors(folder, name, layer)
            rho, spike, stable = dense_health(raw_weight(minilm_path, name, layer), s * B @ A, 8)
            assert float(ms.dominance[n]) == pytest.approx(rho, rel=REL)
            assert float(ms.spike_ratio[n]) == pytest.approx(spike, rel=1e-8)
            assert float(ms.stable_rank[n]) == pytest.approx(stable, rel=REL)
            assert float(ms.dominance[n]) == pytest.approx(float(ms.singular_values[n, 0] / ms.W_singular_values[n, 0]))
        # sane: a trained update below 3x W's top stretch, one direction or a few, never more than r
        assert bool(((ms.dominance > 0.05) & (ms.dominance < 3)).all())
        assert bool(((ms.spike_ratio >= 1) & (ms.stable_rank >= 1) & (ms.stable_rank <= 8)).all())
    data = json.loads(json_text(report.to_dict()))
    assert data["checks"] == [] and "stable_rank" in data["definition"]
    value = data["modules"]["value"]
    assert value["stable_rank"] == [round(float(x), 10) for x in report.modules["value"].stable_rank]
    assert len(value["dominance"]) == len(value["spike_ratio"]) == 6


def test_spike_ratio_of_rank_one_layers_is_null(tiny_bert: Path, tmp_path: Path) -> None:
    """r = 1 (via rank_pattern): no second singular value, so the spike ratio is NaN, null in JSON; stable rank 1."""
    one = checkpoints.lora_adapter(
        tiny_bert, tmp_path / "r1", arch="bert", r=4, alpha=4, rank_pattern={"layer.0.attention.self.value": 1}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterConfigWarning)
        report = spectra_report(loralens.open_base(tiny_bert), load(one), modules=["value"])
    ms = report.modules["value"]
    assert ms.ranks == (1, 4) and math.isnan(float(ms.spike_ratio[0])) and float(ms.stable_rank[0]) == 1.0
    assert not math.isnan(float(ms.spike_ratio[1]))
    data = json.loads(json_text(report.to_dict()))["modules"]["value"]
    assert data["spike_ratio"][0] is None and data["stable_rank"][0] == 1.0
    A, B, s = raw_factors(one, "value", 1)
    rho, spike, stable = dense_health(raw_weight(tiny_bert, "value", 1), s * B @ A, 4)
    assert (float(ms.dominance[1]), float(ms.spike_ratio[1])) == (pytest.approx(rho), pytest.approx(spike))


def _edited_copy(adapter: Path, dst: Path, **changes: object) -> Path:
    """A copy of a real PEFT adapter folder whose adapter_config.json has ``changes`` (None deletes a key)."""
    shutil.copytree(adapter, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _names(adapter: Path) -> list[str]:
    return [c.check for c in config_checks(load(adapter))]


def test_config_checks_on_peft_adapters(
    tiny_bert: Path, tiny_bert_adapter: Path, pattern_adapter: Path, tmp_path: Path
) -> None:
    """Each check fires on the config it describes, and only there (adapters written by PEFT itself)."""
    # r = 4 under PEFT's default alpha 8: a default alpha, nothing else
    assert _names(tiny_bert_adapter) == ["default_alpha"]
    (check,) = config_checks(load(tiny_bert_adapter))
    assert "lora_alpha is 8, PEFT's default, while r is 4 in query, value" in check.message
    assert "2 at r = 4" in check.message and "suspicion" in check.message
    # ranks 4 and 8 (rank_pattern) under one alpha, no rsLoRA: the rsLoRA suspicion; alpha 8 at r = 4 too
    assert _names(pattern_adapter) == ["rslora_suspicion", "default_alpha"]
    message = config_checks(load(pattern_adapter))[0].message
    assert "ranks [4, 8] under one lora_alpha 8" in message and "use_rslora is false" in message
    # only the selected modules count: value has rank 4 everywhere
    assert [c.check for c in config_checks(load(pattern_adapter), ["value"])] == ["default_alpha"]
    # alpha = sqrt(r) without rsLoRA
    root = checkpoints.lora_adapter(tiny_bert, tmp_path / "root", arch="bert", r=4, alpha=2)
    assert _names(root) == ["rslora_suspicion"]
    assert "lora_alpha 2 = sqrt(r) at r = 4" in config_checks(load(root))[0].message
    # clean: rsLoRA with per-rank alphas; or alpha_pattern that keeps alpha / r = 1 across ranks
    rs = checkpoints.lora_adapter(
        tiny_bert,
        tmp_path / "rs",
        arch="bert",
        r=4,
        alpha=4,
        use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 8},
    )
    assert _names(rs) == []
    matched = checkpoints.lora_adapter(
        tiny_bert,
        tmp_path / "matched",
        arch="bert",
        r=4,
        alpha=4,
        rank_pattern={"layer.1.attention.self.query": 8},
        alpha_pattern={"layer.1.attention.self.query": 8},
    )
    assert _names(matched) == []
    # DoRA in the config, but the magnitudes were not saved
    dora = checkpoints.lora_adapter(tiny_bert, tmp_path / "dora", arch="bert", r=4, alpha=4, use_dora=True)
    weights = dora / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "lora_magnitude_vector" not in k}, str(weights))
    assert json.loads((dora / "adapter_config.json").read_text())["use_dora"] is True
    (check,) = config_checks(load(dora))
    assert check.check == "dora_without_magnitudes" and "no lora_magnitude_vector for query, value" in check.message


def test_config_checks_on_edited_configs(tiny_bert_adapter: Path, tmp_path: Path) -> None:
    """Fields PEFT writes for other runs, written into copies of a real adapter's config."""
    missing = _edited_copy(tiny_bert_adapter, tmp_path / "missing", lora_alpha=None)
    (check,) = config_checks(load(missing))
    assert check.check == "missing_alpha" and "loralens took alpha = r" in check.message
    assert "PEFT's LoraConfig would default to lora_alpha = 8" in check.message
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "PiSSA"):
        folder = _edited_copy(tiny_bert_adapter, tmp_path / init, init_lora_weights=init, lora_alpha=4)
        (check,) = config_checks(load(folder))
        assert check.check == "modified_base_init" and f"init_lora_weights is {init!r}" in check.message
        assert "path_initial_model_for_weight_conversion=init_dir" in check.message
        assert "s (B A - B0 A0)" in check.message and "rank 2r" in check.message
    loftq = _edited_copy(tiny_bert_adapter, tmp_path / "loftq", init_lora_weights="loftq", lora_alpha=4)
    (check,) = config_checks(load(loftq))
    assert "LoftQ replaced the base weight by a quantised Q" in check.message
    # not modified at init: EVA (sets lora_A only), Gaussian, orthogonal, PEFT's default and random inits
    for init in ("eva", "gaussian", "orthogonal", True, False):
        folder = _edited_copy(tiny_bert_adapter, tmp_path / f"ok-{init}", init_lora_weights=init, lora_alpha=4)
        assert _names(folder) == [], init


def test_spectra_report_warns_its_checks_and_keeps_them(
    tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path
) -> None:
    pissa = _edited_copy(tiny_bert_adapter, tmp_path / "pissa", init_lora_weights="pissa_niter_4")
    with pytest.warns(AdapterConfigWarning) as record:
        report = spectra_report(loralens.open_base(tiny_bert), load(pissa))
    ours = [str(w.message) for w in record if issubclass(w.category, AdapterConfigWarning)]
    assert [c.message for c in report.checks] == ours and len(ours) == 2
    data = json.loads(json_text(report.to_dict()))
    assert [c["check"] for c in data["checks"]] == ["default_alpha", "modified_base_init"]
    assert all(set(c) == {"check", "message"} for c in data["checks"])
    # the numbers are those of s B A as the config says, the same as without the field
    with pytest.warns(AdapterConfigWarning, match="default alpha"):
        plain = spectra_report(loralens.open_base(tiny_bert), load(tiny_bert_adapter))
    torch.testing.assert_close(report.modules["query"].stable_rank, plain.modules["query"].stable_rank)


# ------------------------------------------------------------------------------------------- real MiniLM


def test_real_minilm_adapters_r4_r16_against_references(minilm_path: Path, rt_adapters: dict[int, Path]) -> None:
    a4, a16 = load(rt_adapters[4]), load(rt_adapters[16])
    base = loralens.open_base(minilm_path)
    overlap = rank_overlap(a4, a16, base=base, device="cpu")
    grid = overlap.modules["value"].factors["A"].grid
    assert grid.shape == (6, 4, 16)
    for layer in (0, 5):
        U1 = right_basis(raw_factors(rt_adapters[4], "value", layer)[0])
        U2 = right_basis(raw_factors(rt_adapters[16], "value", layer)[0])
        for i, j in ((1, 1), (4, 4), (4, 16), (2, 9)):
            assert abs(float(grid[layer, i - 1, j - 1]) - phi_ref(U1[:, :i], U2[:, :j])) < PHI_TOL
    amp = amplification_report(base, a16, n_random=2, device="cpu").modules["query"]
    A, B, s = raw_factors(rt_adapters[16], "query", 3)
    W = raw_weight(minilm_path, "query", 3)
    U, _, Vh = np.linalg.svd(s * B @ A)
    assert float(amp.dW_projection[3]) == pytest.approx(np.linalg.norm(U[:, :16].T @ W @ Vh[:16].T), rel=REL)
    # trained dW is no random direction of W's top-r: it projects less of W than W's own top-16 directions
    assert bool((amp.dW_projection < amp.W_top_projection).all())


# ------------------------------------------------------------------- W's top-r from the spectral engine (#15)

ENGINE_REL = 1e-6  # sigma, norms and angles: the engine (default float64 tol 1e-10) against the dense path


def synthetic_llama(folder: Path, *, d: int, layers: int, r: int, spectra: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """A Llama-keyed base (``model.layers.N.self_attn.{module}.weight``, float32, one file) whose weights have the
    given singular values under random orthogonal vectors, and a PEFT-format LoRA adapter (random A and B)."""
    gen = torch.Generator().manual_seed(7)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    weights, lora = {}, {}
    for layer in range(layers):
        for module, sigma in spectra.items():
            U, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
            weights[f"model.layers.{layer}.self_attn.{module}.weight"] = (
                (U * torch.tensor(sigma.copy())) @ V.T
            ).float()
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=gen) / d**0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(d, r, generator=gen) * 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers})
    )
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(spectra),
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def clustered_spectrum(d: int, seed: int = 0) -> np.ndarray:
    """Descending, with a cluster of four equal values (and one 1e-9 below) on top and a relative gap of 5 % after
    the 8th value; the rest decays."""
    rng = np.random.default_rng(seed)
    head = [5.0, 5.0, 5.0, 5.0 * (1 - 1e-9), 4.0, 3.9, 3.8, 3.7]
    tail = np.sort(rng.uniform(0.01, 3.5, d - len(head)))[::-1]
    return np.concatenate([head, tail])


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> None:
    assert got.shape == want.shape, what
    both = ~(torch.isnan(got) & torch.isnan(want))
    err = (got - want).abs()[both]
    bound = (rel * want.abs() + floor)[both]
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.2e}"


def compare_engine_with_dense(base_dir: Path, adapter_dir: Path, engine_calls: list[str]) -> None:
    base, adapter = loralens.open_base(base_dir), load(adapter_dir)
    options = {"cache": False, "record_inputs": False}
    for report in (amplification_report, spectra_report):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdapterConfigWarning)
            dense = report(base, adapter, exact=True, **options)
            engine = report(base, adapter, **options)
        assert dense.settings["exact"] is True and engine.settings["exact"] is False
        for name, d_mod in dense.modules.items():
            e_mod = engine.modules[name]
            fields = (
                ("W_norm", "dW_norm", "dW_projection", "W_top_projection", "random_expected", "amplification")
                if report is amplification_report
                else ("W_singular_values", "singular_values", "phi_W_top", "dominance")
            )
            for field in fields:
                assert_close(getattr(e_mod, field), getattr(d_mod, field), ENGINE_REL, f"{name}.{field}")
            if report is spectra_report:
                # angles near 0 carry no relative precision: 1e-6 relative plus 1e-7 rad absolute
                assert_close(e_mod.principal_angles, d_mod.principal_angles, ENGINE_REL, f"{name}.angles", 1e-7)
    assert engine_calls, "the engine was not used"


@pytest.fixture
def engine_methods(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods (krylov / dense) of the engine's calls made by the analyses."""
    import loralens.analyses.lowrank as lowrank_module
    from loralens.core.spectral import top_singular_triplets

    calls: list[str] = []

    def spy(*args: object, **kwargs: object) -> object:
        res = top_singular_triplets(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(res.method)
        return res

    monkeypatch.setattr(lowrank_module, "top_singular_triplets", spy)
    return calls


def test_engine_equals_dense_on_the_real_minilm(minilm_path: Path, engine_methods: list[str]) -> None:
    compare_engine_with_dense(minilm_path, loralens.examples.default_adapter(), engine_methods)


def test_engine_equals_dense_on_random_and_clustered_spectra(tmp_path: Path, engine_methods: list[str]) -> None:
    d = 448  # above the float64 dense cross-over (384): the Krylov path runs
    rng = np.random.default_rng(1)
    spectra = {"q_proj": np.sort(rng.uniform(0.1, 4.0, d))[::-1], "v_proj": clustered_spectrum(d)}
    base, adapter = synthetic_llama(tmp_path, d=d, layers=2, r=8, spectra=spectra)
    compare_engine_with_dense(base, adapter, engine_methods)
    assert set(engine_methods) == {"krylov"}

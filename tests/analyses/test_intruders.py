"""Intruder dimensions of the real embedded MiniLM adapters against a dense float64 numpy reference.

The reference reads the base weights itself (safetensors) and the adapter's factors (PEFT's files), forms
``W0 + s B A`` and takes full float64 SVDs (torch's: numpy's multithreaded OpenBLAS ran 100x slower on the loaded
2-core test machine; numpy is the reference of the small cases in tests/core/test_intruders.py); the analysis uses
the spectral engine and the factored share. Counts must be
equal and ``c_j`` agree to 1e-6 (the engine's float64 tolerance bounds the error by ~1e-10 / relative gap).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loralens.analyses.intruders import EPSILON_SWEEP, intruder_dimensions
from loralens.errors import LoralensError, UnsupportedAdapterError
from loralens.examples import default_adapter
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base


def _reference(minilm_path: Path, adapter_dir: Path, module: str, k: int, epsilon: float):
    """Per layer: (c (k,), count, share) from dense float64 SVDs; the factors from the adapter's own file."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    weights = next(minilm_path.rglob("model.safetensors"))
    out = []
    with (
        safe_open(str(weights), "pt") as base,
        safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as ad,
    ):
        for layer in range(6):
            name = f"encoder.layer.{layer}.attention.self.{module}.weight"
            W0 = base.get_tensor(name).double().numpy()
            stem = next(key for key in ad.keys() if f"layer.{layer}.attention.self.{module}.lora_A" in key)
            A = ad.get_tensor(stem).double().numpy()
            B = ad.get_tensor(stem.replace("lora_A", "lora_B")).double().numpy()
            dW = s * B @ A
            U = torch.linalg.svd(torch.from_numpy(W0 + dW))[0][:, :k].numpy()
            U0 = torch.linalg.svd(torch.from_numpy(W0))[0].numpy()
            c = np.abs(U.T @ U0).max(axis=1)
            Ui = U[:, c < epsilon]
            out.append((c, int((c < epsilon).sum()), np.linalg.norm(Ui.T @ dW) / np.linalg.norm(dW)))
    return out


def test_real_adapter_matches_the_dense_reference(minilm_path: Path) -> None:
    adapter = load_lora_adapter(default_adapter())
    report = intruder_dimensions(open_base(minilm_path), adapter, device="cpu")
    assert set(report.modules) == {"query", "value"}
    total = 0
    for name, m in report.modules.items():
        assert m.layers == tuple(range(6)) and m.max_cos.shape == (6, 10) and m.sweep.shape == (len(EPSILON_SWEEP), 6)
        for layer, (c, count, share) in enumerate(_reference(minilm_path, default_adapter(), name, 10, 0.5)):
            np.testing.assert_allclose(m.max_cos[layer].numpy(), c, rtol=0, atol=1e-6)
            assert int(m.count[layer]) == count
            np.testing.assert_allclose(float(m.update_share[layer]), share, rtol=0, atol=1e-6)
            total += count
        sweep = dict(zip(EPSILON_SWEEP, m.sweep.tolist(), strict=True))
        assert sweep[0.5] == m.count.tolist()
    # measured on this adapter (value, layer 0: the top direction's best base cosine is 0.215): it has intruders
    assert total > 0
    data = report.to_dict()
    assert data["settings"]["k"] == 10 and data["settings"]["epsilon"] == 0.5 and data["settings"]["dtype"] == "float64"
    assert data["modules"]["value"]["count"] == report.modules["value"].count.tolist()
    assert len(data["modules"]["value"]["epsilon_sweep"]["count"]) == len(EPSILON_SWEEP)


def test_layer_batches_and_exact_give_the_same_result(minilm_path: Path) -> None:
    adapter = load_lora_adapter(default_adapter(1))
    base = open_base(minilm_path)
    whole = intruder_dimensions(base, adapter, modules=["value"], k=4, device="cpu")
    batched = intruder_dimensions(base, adapter, modules=["value"], k=4, device="cpu", layer_batch=4, exact=True)
    torch.testing.assert_close(whole.modules["value"].max_cos, batched.modules["value"].max_cos, rtol=0, atol=1e-9)
    assert torch.equal(whole.modules["value"].intruder, batched.modules["value"].intruder)


def test_bad_settings_and_dora_are_refused(minilm_path: Path, tmp_path: Path) -> None:
    adapter = load_lora_adapter(default_adapter())
    base = open_base(minilm_path)
    for bad in ({"k": 0}, {"k": 385}, {"epsilon": 0.0}, {"epsilon": 1.5}, {"epsilon": float("nan")}):
        with pytest.raises(LoralensError, match="k |epsilon"):
            intruder_dimensions(base, adapter, **bad)  # type: ignore[arg-type]
    import checkpoints

    bert = checkpoints.bert_base(tmp_path / "bert", layers=2, hidden=32)
    dora = checkpoints.dora_adapter(bert, tmp_path / "dora")
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        intruder_dimensions(open_base(bert), load_lora_adapter(dora))

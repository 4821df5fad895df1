"""DoRA's magnitude and direction on the real MiniLM base, against dense float64 references that form ``W'``.

- A real PEFT DoRA adapter (``checkpoints.dora_adapter``: ``get_peft_model(use_dora=True)``, magnitudes moved as
  in training) is merged by PEFT itself (``merge_and_unload`` in float64): ``W'`` is then PEFT's own
  ``m (W0 + s B A) / ||W0 + s B A||_row``, and dM, dD come from its rows, independently of how loralens reads the
  magnitudes or which norm it takes.
- The shipped plain LoRA adapter: ``W' = W0 + s B A`` formed in numpy from the safetensors files.

Both agree with the factored analysis to 1e-10 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import checkpoints
from loralens.analyses.dora import magnitude_direction, magnitude_direction_series
from loralens.core.dora import linear_fit
from loralens.errors import LoralensError
from loralens.examples import default_adapter
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base


@pytest.fixture(scope="module")
def minilm_dora(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A real PEFT DoRA adapter (r = 4, alpha = 8, query + value) on MiniLM, magnitudes moved by 1 + 0.3 z."""
    return checkpoints.dora_adapter(minilm_path, tmp_path_factory.mktemp("minilm-dora"), r=4)


def _stats(W0: np.ndarray, Wp: np.ndarray) -> tuple[float, float]:
    n0, n1 = np.linalg.norm(W0, axis=-1), np.linalg.norm(Wp, axis=-1)
    return float(np.abs(n1 - n0).mean()), float((1 - (Wp * W0).sum(-1) / (n1 * n0)).mean())


def _peft_merged_reference(minilm_path: Path, adapter_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """(dM, dD) per module and layer from PEFT's own merged float64 weights."""
    from peft import PeftModel
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_path)).double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).double().merge_and_unload().state_dict()
    out: dict[str, list[tuple[float, float]]] = {}
    for module in ("query", "value"):
        key = "encoder.layer.{}.attention.self." + module + ".weight"
        out[module] = [_stats(base[key.format(n)].numpy(), merged[key.format(n)].numpy()) for n in range(6)]
    return out


def _lora_reference(minilm_path: Path, adapter_dir: Path, module: str) -> list[tuple[float, float]]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    out = []
    with (
        safe_open(str(next(minilm_path.rglob("model.safetensors"))), "pt") as base,
        safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as ad,
    ):
        for layer in range(6):
            W0 = base.get_tensor(f"encoder.layer.{layer}.attention.self.{module}.weight").double().numpy()
            stem = next(key for key in ad.keys() if f"layer.{layer}.attention.self.{module}.lora_A" in key)
            A = ad.get_tensor(stem).double().numpy()
            B = ad.get_tensor(stem.replace("lora_A", "lora_B")).double().numpy()
            out.append(_stats(W0, W0 + s * B @ A))
    return out


def test_real_dora_adapter_matches_peft_merged_weights(minilm_path: Path, minilm_dora: Path) -> None:
    adapter = load_lora_adapter(minilm_dora)
    assert adapter.is_dora
    report = magnitude_direction(open_base(minilm_path), adapter, device="cpu")
    reference = _peft_merged_reference(minilm_path, minilm_dora)
    for name, m in report.modules.items():
        assert m.dora and m.layers == tuple(range(6)) and m.dM.shape == m.dD.shape == (6,)
        ref = np.array(reference[name])
        np.testing.assert_allclose(m.dM.numpy(), ref[:, 0], rtol=1e-10)
        np.testing.assert_allclose(m.dD.numpy(), ref[:, 1], rtol=1e-10)
        slope, intercept, r = linear_fit(m.dD, m.dM)
        assert (m.slope, m.intercept, m.r) == (slope, intercept, r)
    data = report.to_dict()
    assert data["modules"]["query"]["dora"] is True and data["modules"]["query"]["fit"]["n"] == 6
    assert data["modules"]["value"]["dM"] == report.modules["value"].dM.tolist()


def test_shipped_lora_adapter_matches_the_dense_reference(minilm_path: Path) -> None:
    adapter = load_lora_adapter(default_adapter())
    base = open_base(minilm_path)
    report = magnitude_direction(base, adapter, device="cpu")
    for name, m in report.modules.items():
        assert not m.dora
        ref = np.array(_lora_reference(minilm_path, default_adapter(), name))
        np.testing.assert_allclose(m.dM.numpy(), ref[:, 0], rtol=1e-10)
        np.testing.assert_allclose(m.dD.numpy(), ref[:, 1], rtol=1e-10)
    # measured on this adapter: dM and dD grow together over the layers (LoRA's positive slope in the paper)
    assert report.modules["query"].slope > 0 and report.modules["query"].r > 0.9
    # float32, batched and within a memory budget: the same numbers (float32 to its precision)
    other = magnitude_direction(base, adapter, modules=["value"], device="cpu", dtype=torch.float32, layer_batch=4,
                                max_memory="20MB", record_inputs=False)  # fmt: skip
    assert list(other.modules) == ["value"] and "inputs" not in other.settings
    assert other.settings["dtype"] == "float32" and other.settings["max_memory"] == 20_000_000
    torch.testing.assert_close(other.modules["value"].dM.double(), report.modules["value"].dM, rtol=1e-5, atol=0)
    torch.testing.assert_close(other.modules["value"].dD.double(), report.modules["value"].dD, rtol=1e-4, atol=0)
    assert report.settings["inputs"]


def test_series_of_checkpoints(minilm_path: Path, minilm_dora: Path) -> None:
    base = open_base(minilm_path)
    adapters = [load_lora_adapter(default_adapter(0)), load_lora_adapter(default_adapter(1))]
    series = magnitude_direction_series(base, adapters, modules=["value"], device="cpu", record_inputs=False)
    single = magnitude_direction(base, adapters[1], modules=["value"], device="cpu", record_inputs=False)
    assert series.adapters == tuple(str(a.path) for a in adapters) and len(series.runs) == 2
    torch.testing.assert_close(series.runs[1].modules["value"].dM, single.modules["value"].dM, rtol=0, atol=0)
    dD = torch.cat([run.modules["value"].dD for run in series.runs])
    dM = torch.cat([run.modules["value"].dM for run in series.runs])
    assert series.pooled["value"] == (*linear_fit(dD, dM), 12)
    data = series.to_dict()
    assert set(data) == {"adapters", "runs", "pooled", "definition", "settings"}
    assert data["runs"][1] == single.to_dict() and data["settings"]["n_adapters"] == 2
    assert data["pooled"]["value"]["n"] == 12


def test_bad_input_is_refused(minilm_path: Path) -> None:
    adapter = load_lora_adapter(default_adapter())
    base = open_base(minilm_path)
    with pytest.raises(LoralensError, match="matches no modules"):
        magnitude_direction(base, adapter, modules=["key"])
    with pytest.raises(LoralensError, match="float32 or float64"):
        magnitude_direction(base, adapter, dtype=torch.float16)
    with pytest.raises(LoralensError, match="at least one adapter"):
        magnitude_direction_series(base, [])
    with pytest.raises(LoralensError, match="max_memory"):
        magnitude_direction(base, adapter, max_memory="1kB")

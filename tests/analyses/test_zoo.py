"""The adapter zoo on real adapters: the shipped Rotten Tomatoes LoRA seeds and (training lane) a VADER adapter,
against dense float64 references formed from the adapters' own files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from loralens.analyses.zoo import ZooReport, adapter_zoo
from loralens.errors import LoralensError, ModelMismatchError
from loralens.examples import default_adapter
from loralens.io.adapters import index_lora_adapter, load_lora_adapter


def _dense_updates(folder: Path, module: str) -> list[np.ndarray]:
    """``s B A`` per layer, from the adapter's safetensors and config (float64)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    s = config["lora_alpha"] / config["r"]
    out = []
    for layer in range(6):
        stem = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
        A = tensors[f"{stem}.lora_A.weight"].double().numpy()
        B = tensors[f"{stem}.lora_B.weight"].double().numpy()
        out.append(s * B @ A)
    return out


def _phi(X: np.ndarray, Y: np.ndarray, k: int, side: str) -> float:
    def basis(M: np.ndarray) -> np.ndarray:
        U, _, Vt = np.linalg.svd(M, full_matrices=False)
        return U[:, :k] if side == "left" else Vt[:k].T

    return float(np.linalg.norm(basis(X).T @ basis(Y)) ** 2 / k)


def test_shipped_seeds_match_the_dense_reference() -> None:
    folders = [default_adapter(seed) for seed in (0, 1, 2)]
    adapters = [load_lora_adapter(f) for f in folders]
    zoo = adapter_zoo(adapters, device="cpu")
    assert zoo.adapters == tuple(str(f) for f in folders) and set(zoo.modules) == {"query", "value"}
    for name, m in zoo.modules.items():
        updates = [_dense_updates(f, name) for f in folders]
        tensors = [load_file(f / "adapter_model.safetensors") for f in folders]
        for layer in range(6):
            for i in range(3):
                for j in range(3):
                    a, b = updates[i][layer], updates[j][layer]
                    ref = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
                    assert float(m.cosine[layer, i, j]) == pytest.approx(ref, abs=1e-10)
            stem = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{name}"
            B0, B1 = (t[f"{stem}.lora_B.weight"].double().numpy() for t in tensors[:2])
            A0, A2 = (
                tensors[0][f"{stem}.lora_A.weight"].double().numpy(),
                tensors[2][f"{stem}.lora_A.weight"].double().numpy(),
            )
            assert float(m.phi_B[layer, 0, 1]) == pytest.approx(_phi(B0, B1, 8, "left"), abs=1e-10)
            assert float(m.phi_A[layer, 0, 2]) == pytest.approx(_phi(A0, A2, 8, "right"), abs=1e-10)
        # overall cosine: the updates concatenated over layers
        flat = [np.concatenate([u.ravel() for u in upd]) for upd in updates]
        ref = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in flat] for x in flat])
        np.testing.assert_allclose(m.cosine_overall.numpy(), ref, rtol=0, atol=1e-10)
        # an adapter against itself: cosine 1, phi 1
        np.testing.assert_allclose(m.cosine_overall.diagonal().numpy(), 1.0, atol=1e-12)
        np.testing.assert_allclose(m.phi_B.diagonal(dim1=-2, dim2=-1).numpy(), 1.0, atol=1e-12)
        assert sorted(m.order) == [0, 1, 2] and m.linkage.shape == (2, 4)
    data = zoo.to_dict()
    assert len(data["modules"]["value"]["cosine"]["per_layer"]) == 6
    assert data["modules"]["value"]["cosine"]["overall"][0][0] == pytest.approx(1.0)


def test_tiles_of_one_adapter_give_the_same_numbers() -> None:
    adapters = [load_lora_adapter(default_adapter(seed)) for seed in (0, 1, 2)]
    whole = adapter_zoo(adapters, modules=["value"], device="cpu")
    tiled = adapter_zoo(adapters, modules=["value"], block=1, device="cpu")
    for field in ("cosine", "phi_B", "phi_A", "cosine_overall"):
        torch.testing.assert_close(getattr(tiled.modules["value"], field), getattr(whole.modules["value"], field))
    single = adapter_zoo(adapters, modules=["value"], device="cpu", dtype=torch.float32)
    torch.testing.assert_close(
        single.modules["value"].cosine.double(), whole.modules["value"].cosine, atol=1e-5, rtol=0
    )


def test_bad_zoos_are_refused(vader_adapter: Path) -> None:
    rt = load_lora_adapter(default_adapter(0))
    with pytest.raises(LoralensError, match="at least two"):
        adapter_zoo([rt])
    with pytest.raises(LoralensError, match="no module 'key'"):
        adapter_zoo([rt, rt], modules=["key"])
    vader = load_lora_adapter(vader_adapter)  # recorded base: a local folder, not the hub name
    with pytest.raises(ModelMismatchError, match="different bases"):
        adapter_zoo([rt, vader])


def test_same_task_adapters_cluster_together(vader_adapter: Path) -> None:
    """Three Rotten Tomatoes seeds and one VADER adapter: measured, the RT seeds merge first and VADER joins last
    (if this ever fails, the finding changed: report it rather than loosen the test)."""
    adapters = [load_lora_adapter(default_adapter(seed)) for seed in (0, 1, 2)] + [load_lora_adapter(vader_adapter)]
    zoo = adapter_zoo(adapters, assume_same_base=True, device="cpu")
    assert len(zoo.settings["bases"]) == 2
    for m in zoo.modules.values():
        last_merge = m.linkage[-1]
        first_two = {int(last_merge[0]), int(last_merge[1])}
        assert 3 in first_two, f"{m.name}: VADER is not the last to join ({m.linkage.tolist()})"


# ------------------------------------------------------------------ streamed (indexed) adapters against loaded (#16)

_FIELDS = ("cosine", "phi_B", "phi_A", "cosine_overall", "phi_B_overall", "phi_A_overall", "linkage")


def _assert_same_zoo(loaded: ZooReport, streamed: ZooReport) -> None:
    """The streamed zoo's numbers equal the loaded one's to float64 rounding (1e-12), and all else is equal."""
    assert streamed.adapters == loaded.adapters and streamed.settings == loaded.settings
    assert list(streamed.modules) == list(loaded.modules)
    for name, a in loaded.modules.items():
        b = streamed.modules[name]
        assert (b.layers, b.k, b.order) == (a.layers, a.k, a.order)
        for field in _FIELDS:
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=0, atol=1e-12, equal_nan=True)


def _both_ways(folders: list[Path], **options: Any) -> None:
    """Loaded adapters, their folders, their indexes and a mix of loaded and indexed: one zoo."""
    loaded = adapter_zoo([load_lora_adapter(f) for f in folders], device="cpu", **options)
    _assert_same_zoo(loaded, adapter_zoo(folders, device="cpu", **options))
    _assert_same_zoo(loaded, adapter_zoo([index_lora_adapter(f) for f in folders], device="cpu", **options))
    mixed = [load_lora_adapter(f) if i % 2 else index_lora_adapter(f) for i, f in enumerate(folders)]
    _assert_same_zoo(loaded, adapter_zoo(mixed, device="cpu", **options))


def test_streamed_zoo_equals_the_loaded_one_on_the_shipped_adapters() -> None:
    folders = [default_adapter(seed) for seed in (0, 1, 2)]
    _both_ways(folders)
    _both_ways(folders, block=2, modules=["value"])
    _both_ways(folders, dtype=torch.float32)


def test_streamed_zoo_equals_the_loaded_one_on_peft_adapters(tmp_path: Path, tiny_bert: Path, tiny_llama: Path) -> None:
    """Real PEFT folders of unequal ranks (rank_pattern, rsLoRA, alpha_pattern), one a pickled .bin."""
    bert = [
        checkpoints.lora_adapter(tiny_bert, tmp_path / "b0", arch="bert", r=4, seed=0),
        checkpoints.lora_adapter(
            tiny_bert, tmp_path / "b1", arch="bert", r=2, rank_pattern={"layer.1.attention.self.query": 6}, seed=1
        ),
        checkpoints.lora_adapter(
            tiny_bert, tmp_path / "b2", arch="bert", r=3, use_rslora=True, seed=2, safe_serialization=False
        ),  # fmt: skip
        checkpoints.lora_adapter(tiny_bert, tmp_path / "b3", arch="bert", r=5, alpha_pattern={"value": 32}, seed=3),
    ]
    _both_ways(bert)
    _both_ways(bert, block=3)
    llama = [
        checkpoints.lora_adapter(
            tiny_llama, tmp_path / f"l{r}", arch="llama", r=r, targets=["q_proj", "v_proj"], seed=r
        )  # fmt: skip
        for r in (2, 4, 8)
    ]
    _both_ways(llama)


def _synthetic_adapter(
    folder: Path, ranks: dict[str, list[int]], layers: list[int], seed: int, dtype: torch.dtype
) -> Path:
    """A PEFT-style folder written directly: ``ranks[module][position]`` per layer (rank_pattern), alpha 16."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"query": (10, 10), "value": (12, 10)}
    tensors, pattern = {}, {}
    for module, per_layer in ranks.items():
        d_out, d_in = shapes[module]
        for layer, r in zip(layers, per_layer, strict=True):
            stem = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype)
            tensors[f"{stem}.lora_B.weight"] = torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype)
            pattern[f"encoder.layer.{layer}.attention.self.{module}"] = r
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 16, "rank_pattern": pattern, "base_model_name_or_path":
              "synthetic", "target_modules": sorted(ranks)}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_streamed_zoo_equals_the_loaded_one_on_random_unequal_ranks(tmp_path: Path) -> None:
    """Random adapters whose ranks differ between adapters and layers, in float64, float32 and bfloat16, one of
    them without layer 2 (the zoo then compares the shared layers)."""
    g = torch.Generator().manual_seed(16)
    folders = []
    for i, dtype in enumerate([torch.float64, torch.float32, torch.bfloat16, torch.float64, torch.float32]):
        layers = [0, 1, 3] if i == 3 else [0, 1, 2, 3]
        ranks = {m: [int(r) for r in torch.randint(2, 7, (len(layers),), generator=g)] for m in ("query", "value")}
        folders.append(_synthetic_adapter(tmp_path / f"a{i}", ranks, layers, seed=i, dtype=dtype))
    assert len({load_lora_adapter(f).modules["query"].ranks for f in folders}) > 1
    _both_ways(folders)
    _both_ways(folders, block=2)
    zoo = adapter_zoo(folders, device="cpu")
    assert zoo.modules["query"].layers == (0, 1, 3) and zoo.settings["notes"]

"""The on-disk spectral cache of base weights (loralens.io.spectral_cache), through the analyses that use it.

A hit reads the entry and runs no decomposition (counted by wrapping the engine, or intruders' thin SVD); a miss
computes and writes. A corrupt or mismatching entry (truncated file, wrong shapes, another key's entry) is never
trusted: it is ignored with a WARNING on the ``loralens.io.spectral_cache`` logger (no Python warning) and
rebuilt. Results are identical cold and warm. Every cache lives under ``tmp_path`` (``XDG_CACHE_HOME`` is
pointed there for the default folder).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import loralens
import loralens.analyses.intruders as intruders_module
import loralens.analyses.lowrank as lowrank_module
from loralens.analyses.intruders import intruder_dimensions
from loralens.analyses.lowrank import amplification_report, spectra_report
from loralens.errors import AdapterConfigWarning
from loralens.io.spectral_cache import (
    CACHE_VERSION,
    SpectralCache,
    SpectralKey,
    default_cache_dir,
    open_spectral_cache,
)

D = 400  # above the float64 dense cross-over (384): W's top-r come from the Krylov path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Llama-keyed float32 base (2 layers, q_proj + v_proj, 400 x 400) and a PEFT-format adapter (r = 4)."""
    folder = tmp_path_factory.mktemp("spectral-cache-case")
    gen = torch.Generator().manual_seed(0)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir()
    adapter.mkdir()
    weights, lora = {}, {}
    for layer in range(2):
        for m in ("q_proj", "v_proj"):
            weights[f"model.layers.{layer}.self_attn.{m}.weight"] = torch.randn(D, D, generator=gen) / D**0.5
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(4, D, generator=gen) / D**0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(D, 4, generator=gen) * 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": D}))
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return base, adapter


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of the engine (amplification, spectra) and of intruders' W0 thin SVD."""
    calls = {"engine": 0, "svd": 0}
    engine, thin_svd = lowrank_module.top_singular_triplets, intruders_module._thin_svd

    def counted_engine(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["engine"] += 1
        return engine(*args, **kwargs)

    def counted_svd(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["svd"] += 1
        return thin_svd(*args, **kwargs)

    monkeypatch.setattr(lowrank_module, "top_singular_triplets", counted_engine)
    monkeypatch.setattr(intruders_module, "_thin_svd", counted_svd)
    return calls


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default cache folder, moved under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "loralens"


def run(report, case: tuple[Path, Path], **options):  # type: ignore[no-untyped-def]
    base, adapter = loralens.open_base(case[0]), loralens.load_lora_adapter(case[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterConfigWarning)
        return report(base, adapter, device="cpu", record_inputs=False, **options)


def entries(folder: Path) -> list[Path]:
    return sorted((folder / CACHE_VERSION).glob("*.safetensors"))


def assert_same(first, second) -> None:  # type: ignore[no-untyped-def]
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())


# ------------------------------------------------------------------------------------------------ hit, miss


def test_default_folder_follows_xdg(user_cache: Path) -> None:
    assert default_cache_dir() == user_cache
    cache = open_spectral_cache()
    assert cache is not None and cache.root == user_cache
    assert open_spectral_cache(cache=False) is None


def test_second_run_reads_the_cache_and_computes_nothing(
    case: tuple[Path, Path], counts: dict[str, int], user_cache: Path
) -> None:
    cold = run(spectra_report, case)
    assert counts["engine"] == 2  # one batch per module
    assert len(entries(user_cache)) == 4  # 2 layers x 2 modules, in the default folder
    warm = run(spectra_report, case)
    assert counts["engine"] == 2
    assert_same(cold, warm)
    for name in cold.modules:  # bit for bit
        assert torch.equal(cold.modules[name].principal_angles, warm.modules[name].principal_angles)
    # amplification with the engine shares spectra's entries
    amp_cold = run(amplification_report, case, cache=False)
    assert counts["engine"] == 4
    amp_warm = run(amplification_report, case)
    assert counts["engine"] == 4
    assert_same(amp_cold, amp_warm)


def test_exact_path_and_intruders_are_cached_under_their_own_keys(
    case: tuple[Path, Path], counts: dict[str, int], tmp_path: Path
) -> None:
    folder = tmp_path / "own"
    run(spectra_report, case, cache_dir=folder)
    assert counts["engine"] == 2
    exact = run(spectra_report, case, cache_dir=folder, exact=True)  # method "exact": a miss, no engine
    assert counts["engine"] == 2 and len(entries(folder)) == 8
    assert_same(exact, run(spectra_report, case, cache_dir=folder, exact=True))
    assert len(entries(folder)) == 8
    cold = run(intruder_dimensions, case, cache_dir=folder, k=4)
    assert counts["svd"] == 2 and len(entries(folder)) == 12
    warm = run(intruder_dimensions, case, cache_dir=folder, k=4)
    assert counts["svd"] == 2
    assert_same(cold, warm)
    assert_same(cold, run(intruder_dimensions, case, cache=False, k=4))
    assert counts["svd"] == 4


def test_no_cache_reads_and_writes_nothing(case: tuple[Path, Path], counts: dict[str, int], tmp_path: Path) -> None:
    folder = tmp_path / "c"
    run(amplification_report, case, cache_dir=folder)
    n = counts["engine"]
    run(amplification_report, case, cache_dir=folder, cache=False)
    assert counts["engine"] == 2 * n
    run(intruder_dimensions, case, cache=False, cache_dir=tmp_path / "unused", k=2)
    assert not (tmp_path / "unused").exists()


# ------------------------------------------------------------------------------------- corrupt entries


@pytest.mark.parametrize("damage", ["truncated", "wrong shapes", "another key", "not descending", "garbage"])
def test_a_bad_entry_is_ignored_logged_and_rebuilt(
    case: tuple[Path, Path], counts: dict[str, int], tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "c"
    cold = run(spectra_report, case, cache_dir=folder)
    files = entries(folder)
    victim = files[0]
    if damage == "truncated":
        checkpoints.truncate_file(victim, victim.stat().st_size // 2)
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
    elif damage == "another key":
        shutil.copyfile(files[1], victim)
    else:
        from safetensors import safe_open

        with safe_open(str(victim), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(victim))
        if damage == "wrong shapes":
            tensors["U"] = tensors["U"][:-1]
        else:
            tensors["S"] = tensors["S"].flip(0)
        save_file(tensors, str(victim), metadata=meta)
    engine_calls = counts["engine"]
    with caplog.at_level(logging.WARNING, logger="loralens.io.spectral_cache"):
        warm = run(spectra_report, case, cache_dir=folder)
    assert counts["engine"] == engine_calls + 1  # the bad layer's module batch is computed again
    assert any("ignoring" in r.getMessage() and str(victim) in r.getMessage() for r in caplog.records)
    assert_same(cold, warm)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loralens.io.spectral_cache"):
        again = run(spectra_report, case, cache_dir=folder)  # rebuilt: a clean hit now
    assert counts["engine"] == engine_calls + 1 and not caplog.records
    assert_same(cold, again)


def test_a_changed_base_file_gets_new_entries(case: tuple[Path, Path], counts: dict[str, int], tmp_path: Path) -> None:
    copy = tmp_path / "case"
    shutil.copytree(case[0], copy / "base")
    shutil.copytree(case[1], copy / "adapter")
    folder = tmp_path / "c"
    run(amplification_report, (copy / "base", copy / "adapter"), cache_dir=folder)
    path = copy / "base" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(path), metadata={"format": "pt"})
    n = counts["engine"]
    changed = run(amplification_report, (copy / "base", copy / "adapter"), cache_dir=folder)
    assert counts["engine"] == n + 2  # a new file digest: every entry of it misses
    fresh = run(amplification_report, (copy / "base", copy / "adapter"), cache=False)
    assert_same(changed, fresh)


# ------------------------------------------------------------------------------------------------ the API


def key(k: int = 3, **changes: object) -> SpectralKey:
    fields = {"file_digest": "ab" * 32, "tensor": "w", "shape": (6, 5), "k": k, "dtype": "float64", "method": "engine"}
    return SpectralKey(**{**fields, **changes})  # type: ignore[arg-type]


def test_put_get_roundtrip_and_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = SpectralCache(tmp_path)
    U, S, V = torch.randn(6, 3, dtype=torch.float64), torch.tensor([3.0, 2.0, 1.0]), torch.randn(5, 3)
    assert cache.get(key()) is None  # a miss
    cache.put(key(), {"U": U, "S": S, "V": V})
    got = cache.get(key())
    assert got is not None and torch.equal(got["U"], U) and got["S"].dtype == torch.float64
    assert cache.get(key(), ("S",)).keys() == {"S"}  # type: ignore[union-attr]
    assert cache.get(key(dtype="float32")) is None and cache.get(key(k=2)) is None  # other keys: misses
    cache.put(key(method="exact-values"), {"S": S})
    with caplog.at_level(logging.WARNING, logger="loralens.io.spectral_cache"):
        assert cache.get(key(method="exact-values"), ("U", "S")) is None  # a part missing
        cache.put(key(k=2), {"S": torch.tensor([1.0, np.nan])})
        assert cache.get(key(k=2), ("S",)) is None  # NaN
    assert len(caplog.records) == 2
    assert not list(cache.folder.glob(".tmp-*"))  # no temporary file left behind


def test_a_failed_write_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = SpectralCache(blocker)  # its folder cannot be created under a file
    with caplog.at_level(logging.WARNING, logger="loralens.io.spectral_cache"):
        cache.put(key(), {"S": torch.tensor([3.0, 2.0, 1.0])})
    assert "could not write" in caplog.text

"""The engine's one streaming path and one seeding policy: budgeted layer batches that read per batch and give
the unbatched result, and draws that depend on what is drawn alone (not on batching, module selection or device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loralens
from loralens.analyses.engine import module_batches, seeded_generator
from loralens.analyses.intruders import intruder_dimensions
from loralens.analyses.lowrank import amplification_report, spectra_report
from loralens.errors import LoralensError


def test_module_batches_cover_every_layer_once_within_the_budget(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    base, adapter = loralens.open_base(tiny_bert), loralens.load_lora_adapter(tiny_bert_adapter)
    name = next(iter(adapter.modules))
    mod = adapter.modules[name]
    d_out, d_in = mod.shape
    r = mod.A.shape[-2]
    per_layer = d_out * d_in * (4 + 3 * 8) + 2 * (d_out + d_in) * r * 8  # the documented cost model, float64
    whole = list(module_batches(base, adapter, name, device=torch.device("cpu"), dtype=torch.float64))
    assert len(whole) == 1 and whole[0].W.shape == (len(mod.layers), d_out, d_in)
    one = list(
        module_batches(base, adapter, name, device=torch.device("cpu"), dtype=torch.float64, max_memory=per_layer)
    )
    assert [b.positions for b in one] == [slice(k, k + 1) for k in range(len(mod.layers))]
    assert torch.equal(torch.cat([b.W for b in one]), whole[0].W)
    assert sum((b.keys for b in one), ()) == whole[0].keys
    with pytest.raises(LoralensError, match=r"^max_memory .* below what one layer of 'query'|^max_memory") as info:
        next(module_batches(base, adapter, name, device=torch.device("cpu"), dtype=torch.float64, max_memory=1000))
    assert info.value.option == "max_memory"
    with pytest.raises(LoralensError, match="layer_batch must be at least 1"):
        next(module_batches(base, adapter, name, device=torch.device("cpu"), dtype=torch.float64, layer_batch=0))


def test_budgeted_lowrank_and_intruders_equal_unbatched(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    base, adapter = loralens.open_base(tiny_bert), loralens.load_lora_adapter(tiny_bert_adapter)
    tight = "40kB"  # one 32 x 32 layer at a time (float64): every analysis streams layer by layer
    for analysis, fields in (
        (amplification_report, ("dW_norm", "dW_projection", "random_projection")),
        (spectra_report, ("singular_values", "W_singular_values", "principal_angles")),
        (intruder_dimensions, ("max_cos", "sigma")),
    ):
        whole = analysis(base, adapter, device="cpu", record_inputs=False)
        batched = analysis(base, adapter, device="cpu", record_inputs=False, max_memory=tight)
        assert batched.settings["max_memory"] == 40_000
        for name, m in whole.modules.items():
            for f in fields:
                torch.testing.assert_close(getattr(batched.modules[name], f), getattr(m, f), rtol=1e-12, atol=1e-12)


def test_seeded_generator_depends_on_what_is_drawn_alone() -> None:
    def first(seed: int, module: str, layer: int | None = None, purpose: str = "") -> float:
        return float(torch.randn(1, generator=seeded_generator(seed, module, layer, purpose)))

    assert first(0, "query", 3) == first(0, "query", 3)
    draws = {first(0, "query", 3), first(1, "query", 3), first(0, "value", 3), first(0, "query", 4),
             first(0, "query", 3, "w_null:A"), first(0, "query")}  # fmt: skip
    assert len(draws) == 6
    assert seeded_generator(0, "query", 3).device.type == "cpu"


def test_random_baselines_do_not_depend_on_module_selection(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    base, adapter = loralens.open_base(tiny_bert), loralens.load_lora_adapter(tiny_bert_adapter)
    names = list(adapter.modules)
    both = loralens.adapter_similarity(base, [adapter], device="cpu")[0]
    alone = loralens.adapter_similarity(base, [adapter], modules=[names[-1]], device="cpu")[0]
    for factor, s in alone.modules[names[-1]].items():
        assert torch.equal(s.random_phi, both.modules[names[-1]][factor].random_phi)
    amp_both = amplification_report(base, adapter, device="cpu", record_inputs=False)
    amp_alone = amplification_report(base, adapter, modules=[names[-1]], device="cpu", record_inputs=False)
    assert torch.equal(amp_alone.modules[names[-1]].random_projection, amp_both.modules[names[-1]].random_projection)

"""The engine's one streaming path and one seeding policy: budgeted layer batches that read per batch and give
the unbatched result, and draws that depend on what is drawn alone (not on batching, module selection or device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loralens
from loralens.analyses.dora import magnitude_direction, magnitude_direction_series
from loralens.analyses.engine import module_batches, seeded_generator
from loralens.analyses.intruders import intruder_dimensions
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.analyses.zoo import adapter_zoo
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


def _with_recorded_base(adapter: Path, out: Path, recorded: str) -> Path:
    """A copy of ``adapter`` whose adapter_config.json records ``recorded`` as base_model_name_or_path."""
    import json
    import shutil

    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
    return out


def test_base_for_a_relative_recorded_base(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT records the base as training named it ("smol-base", relative to where it ran): found from another
    working directory beside the adapter's folder (in its parent folder) or inside it; when nothing resolves the
    error says the value came from adapter_config.json and asks for the base (option "base")."""
    import shutil

    from loralens.analyses.engine import base_for
    from loralens.errors import InputPathError
    from loralens.io.adapters import load_lora_adapter

    shutil.copytree(tiny_bert, tmp_path / "run" / "smol-base")
    beside = _with_recorded_base(tiny_bert_adapter, tmp_path / "run" / "adapter", "smol-base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert base_for(load_lora_adapter(beside)).root == tmp_path / "run" / "smol-base"
    inside = _with_recorded_base(tiny_bert_adapter, tmp_path / "other" / "adapter", "base")
    shutil.copytree(tiny_bert, inside / "base")
    assert base_for(load_lora_adapter(inside)).root == inside / "base"
    monkeypatch.chdir(tmp_path / "run")  # the working directory wins where the path exists from it
    assert base_for(load_lora_adapter(inside)).root == inside / "base"
    assert base_for(load_lora_adapter(beside)).root.resolve() == (tmp_path / "run" / "smol-base").resolve()
    lost = _with_recorded_base(tiny_bert_adapter, tmp_path / "lost" / "adapter", "gone-base")
    with pytest.raises(InputPathError) as info:
        base_for(load_lora_adapter(lost))
    message = str(info.value)
    assert message.startswith(f"{lost / 'adapter_config.json'}: its base_model_name_or_path 'gone-base'")
    assert str(lost / "gone-base") in message and str(tmp_path / "lost" / "gone-base") in message
    assert "give the base model explicitly" in message and "--" not in message
    assert info.value.options[0] == "base"
    assert base_for(load_lora_adapter(lost), tiny_bert).root == tiny_bert  # an explicit base is used as given


def test_errors_name_many_layers_as_a_span() -> None:
    from loralens.analyses.engine import at_model_layers
    from loralens.errors import RankError

    core = RankError("subspace dimension 32 exceeds the rank", tuple(range(30)), option=("i", "j"))
    e = at_model_layers(core, "q_proj (A)", list(range(30)), None)
    assert "at layers 0-29 (30 layers):" in str(e) and "[0, 1" not in str(e) and e.option == ("i", "j")
    few = at_model_layers(RankError("x", (1, 2)), "q", [0, 1, 2], None)
    assert "at layers [1, 2]:" in str(few)


def test_streamed_analyses_report_layers_done(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """amplification, spectra and intruders call progress("layers", done, total) as batches finish, up to every
    layer of every selected module."""
    base, adapter = loralens.open_base(tiny_bert), loralens.load_lora_adapter(tiny_bert_adapter)
    total = sum(len(m.layers) for m in adapter.modules.values())
    for analysis in (amplification_report, spectra_report, intruder_dimensions):
        calls: list[tuple[str, int, int]] = []
        analysis(
            base, adapter, device="cpu", record_inputs=False, layer_batch=1, cache=False,
            progress=lambda stage, done, n, calls=calls: calls.append((stage, done, n)),
        )  # fmt: skip
        assert calls == [("layers", k, total) for k in range(1, total + 1)], analysis.__name__


def test_dora_zoo_and_overlap_report_layers_done(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """dora (one adapter, and a series counted across its checkpoints) per batch of layers, the zoo per shared layer,
    the overlap per module and factor (its layers once per factor): progress("layers", done, total) up to total."""
    base, adapter = loralens.open_base(tiny_bert), loralens.load_lora_adapter(tiny_bert_adapter)
    layers = [len(m.layers) for m in adapter.modules.values()]
    total = sum(layers)
    calls: list[tuple[str, int, int]] = []

    def record(stage: str, done: int, n: int) -> None:
        calls.append((stage, done, n))

    magnitude_direction(base, adapter, device="cpu", record_inputs=False, layer_batch=1, progress=record)
    assert calls == [("layers", k, total) for k in range(1, total + 1)]
    calls.clear()
    second = loralens.load_lora_adapter(tiny_bert_adapter)
    magnitude_direction_series(
        base, [adapter, second], device="cpu", record_inputs=False, layer_batch=1, progress=record
    )
    assert calls == [("layers", k, 2 * total) for k in range(1, 2 * total + 1)]
    calls.clear()
    adapter_zoo([adapter, second], device="cpu", progress=record)
    assert calls == [("layers", k, total) for k in range(1, total + 1)]
    calls.clear()
    rank_overlap(adapter, second, device="cpu", record_inputs=False, progress=record)
    steps = [n for n in layers for _ in ("A", "B")]
    assert calls == [("layers", sum(steps[: k + 1]), 2 * total) for k in range(len(steps))]


def test_module_batches_count_the_stored_dtype(tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path) -> None:
    # The budget counts the stored weight at its own size: half-precision weights leave room for more layers.
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text((tiny_bert / "config.json").read_text())
    stored = load_file(str(tiny_bert / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in stored.items()}, str(half / "model.safetensors"))
    adapter = loralens.load_lora_adapter(tiny_bert_adapter)
    d, r = 32, 4
    per_layer = {4: d * d * (4 + 3 * 8) + 2 * 2 * d * r * 8, 2: d * d * (2 + 3 * 8) + 2 * 2 * d * r * 8}
    budget = 2 * per_layer[2]  # two fp16 layers fit, two fp32 layers do not
    assert budget < 2 * per_layer[4]
    sizes = {}
    for name, folder in (("fp32", tiny_bert), ("fp16", half)):
        batches = module_batches(
            loralens.open_base(folder), adapter, "query", device=torch.device("cpu"), dtype=torch.float64,
            max_memory=budget,
        )  # fmt: skip
        sizes[name] = [b.W.shape[0] for b in batches]
    assert sizes == {"fp32": [1, 1], "fp16": [2]}

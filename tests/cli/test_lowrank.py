"""``loralens overlap``, ``amplification`` and ``spectra`` end to end.

The real case runs each command as a subprocess on two PEFT adapters (r = 4 and r = 16, different seeds) trained on
Rotten Tomatoes on the real MiniLM base, parses ``--json`` and checks it against the Python API and the identities
(phi in [0, 1], projections bounded by W's top-r, the random expectation's closed form). User errors are checked
in process (fast) and once through a subprocess: one line ``error: ...``, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
import loralens
from clitools import record_progress, run_cli
from loralens.analyses.lowrank import amplification_report
from loralens.render.report import DPI, overlap_picture


def run_json(*args: str | Path) -> dict:
    proc = run_cli(*args, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_overlap_on_real_minilm_adapters(tmp_path: Path, minilm_path: Path, rt_adapters: dict[int, Path]) -> None:
    out = tmp_path / "overlap"
    data = run_json(
        "overlap", "--base", minilm_path, "--adapter", rt_adapters[4], "--adapter", rt_adapters[16], "--out", out
    )
    assert set(data["modules"]) == {"query", "value"}
    for mo in data["modules"].values():
        assert mo["layers"] == list(range(6)) and mo["ranks"] == [[4] * 6, [16] * 6] and mo["shape"] == [384, 384]
        for f, fo in mo["factors"].items():
            assert fo["side"] == {"A": "right", "B": "left"}[f] and fo["dim"] == 384
            assert len(fo["grid"]) == 6 and all(len(g) == 4 and len(g[0]) == 16 for g in fo["grid"])
            assert all(0 <= v <= 1 for g in fo["grid"] for row in g for v in row)
            assert fo["random_expected"][0][15] == pytest.approx(16 / 384)
            assert fo["top_direction"] == [g[0][0] for g in fo["grid"]]
    assert data["settings"]["dtype"] == "float64" and len(data["settings"]["inputs"]["adapters"]) == 2
    assert sorted(p.name for p in out.iterdir()) == [".loralens-output", "overlap.json", "overlap.png", "overlap.svg"]
    assert (out / "overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "overlap.svg").read_bytes()[:2000]
    saved = json.loads((out / "overlap.json").read_text())
    assert saved["modules"] == data["modules"]
    assert (out / "overlap.png").read_bytes() == overlap_picture(saved, DPI).png  # the report's picture, from JSON


def test_amplification_on_real_minilm_adapters(minilm_path: Path, rt_adapters: dict[int, Path]) -> None:
    data = run_json("amplification", "--base", minilm_path, "--adapter", rt_adapters[4], "--n-random", "5")
    api = amplification_report(
        loralens.open_base(minilm_path), loralens.load_lora_adapter(rt_adapters[4]), n_random=5, device="cpu"
    ).to_dict()
    assert data["modules"] == api["modules"]  # the CLI is the API, seeds included
    for ma in data["modules"].values():
        assert ma["ranks"] == [4] * 6 and ma["scaling"] == [2.0] * 6  # alpha 8 / r 4
        for n in range(6):
            assert ma["dW_projection"][n] < ma["W_top_projection"][n] < ma["W_norm"][n]
            assert ma["random_expected"][n] == pytest.approx(4 * ma["W_norm"][n] / 384, rel=1e-9)
            assert ma["amplification"][n] == pytest.approx(ma["dW_norm"][n] / ma["dW_projection"][n], rel=1e-9)
            assert len(ma["random_projection_draws"][n]) == 5
    assert "Table 7" in data["definition"] and data["settings"]["seed"] == 0


def test_spectra_on_real_minilm_adapters(tmp_path: Path, minilm_path: Path, rt_adapters: dict[int, Path]) -> None:
    out = tmp_path / "spectra"
    data = run_json(
        "spectra", "--base", minilm_path, "--adapter", rt_adapters[16], "--energy-threshold", "0.8", "--out", out
    )
    for ms in data["modules"].values():
        assert ms["ranks"] == [16] * 6
        for n in range(6):
            S = ms["singular_values"][n]
            assert len(S) == 16 and S == sorted(S, reverse=True) and S[-1] > 0
            assert 1 <= ms["effective_rank_entropy"][n] <= 16 and 1 <= ms["effective_rank_energy"][n] <= 16
            angles = ms["principal_angles_deg"][n]
            assert angles == sorted(angles) and 0 <= angles[0] and angles[-1] <= 90
    assert data["settings"]["energy_threshold"] == 0.8
    assert sorted(p.name for p in out.iterdir()) == [".loralens-output", "spectra.json", "spectra.png", "spectra.svg"]


def test_tables_and_self_overlap_in_process(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    result = run_cli("overlap", "--adapter", tiny_bert_adapter, "--adapter", tiny_bert_adapter)
    assert result.returncode == 0, result.stderr
    assert "phi(1,1)" in result.stdout and "1.0000" in result.stdout
    assert "Layers numbered from 1" in result.stdout
    data = json.loads(
        run_cli("overlap", "--adapter", tiny_bert_adapter, "--adapter", tiny_bert_adapter, "--json").stdout
    )
    assert all(v == pytest.approx(1.0) for g in data["modules"]["value"]["factors"]["A"]["diagonal"] for v in g)
    for command in ("amplification", "spectra"):
        result = run_cli(command, "--base", tiny_bert, "--adapter", tiny_bert_adapter)
        assert result.returncode == 0, result.stderr
        assert "query" in result.stdout and "value" in result.stdout


def _bad_inputs(tmp: Path, tiny_bert: Path, adapter: Path, minilm: Path) -> list[tuple[str, list[str], str]]:
    """(case, argv, expected words in the one-line error)."""
    a = str(adapter)
    only_query = str(checkpoints.lora_adapter(tiny_bert, tmp / "q", arch="bert", targets=["query"]))
    one_layer = str(checkpoints.lora_adapter(tiny_bert, tmp / "l1", arch="bert", layers_to_transform=[1]))
    other_base = checkpoints.bert_base(tmp / "wide", layers=2, hidden=48)
    wide = str(checkpoints.lora_adapter(other_base, tmp / "wide-lora", arch="bert"))
    (tmp / "f.txt").write_text("x")
    return [
        ("one adapter", ["overlap", "--adapter", a], "exactly two adapters"),
        ("different bases", ["overlap", "--adapter", a, "--adapter", wide], "record different bases"),
        ("not this base", ["overlap", "--base", str(tiny_bert), "--adapter", a, "--adapter", wide], "another base"),
        ("module missing", ["overlap", "--adapter", a, "--adapter", only_query], "value only in"),
        ("layers differ", ["overlap", "--adapter", a, "--adapter", one_layer], "different layers: [0] only in"),
        ("i above rank", ["overlap", "--adapter", a, "--adapter", a, "--i", "5"], "i=5 exceeds the rank 4"),
        ("unknown factor", ["overlap", "--adapter", a, "--adapter", a, "--factors", "C"], "unknown factor 'C'"),
        ("adapter of another base", ["amplification", "--base", str(minilm), "--adapter", a], "another base"),
        ("unknown module", ["spectra", "--base", str(tiny_bert), "--adapter", a, "--modules", "key"], "matches no"),
        (
            "output is a file",
            ["spectra", "--base", str(tiny_bert), "--adapter", a, "--out", str(tmp / "f.txt")],
            "is a file",
        ),
    ]


def test_bad_input_gives_one_line_and_exit_2(
    tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, minilm_path: Path
) -> None:
    for case, argv, words in _bad_inputs(tmp_path, tiny_bert, tiny_bert_adapter, minilm_path):
        result = run_cli(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (case, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
        assert words in lines[0], (case, lines[0])
        assert result.stdout == "", case
    # an option the command checks against the adapter, not the parser
    proc = run_cli("overlap", "--adapter", tiny_bert_adapter, "--adapter", tiny_bert_adapter, "--j", "7")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "j=7 exceeds the rank 4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_json_is_the_python_apis_to_dict(minilm_path: Path) -> None:
    """Each command's --json is its library function's to_dict(): numbers, run settings and inputs (provenance),
    which the library records itself (float32 and one module keep it quick)."""
    from loralens.analyses.lowrank import rank_overlap, spectra_report
    from loralens.examples import default_adapter
    from loralens.io.outputs import json_text

    first, second = default_adapter(0), default_adapter(1)
    lora, other = loralens.load_lora_adapter(first), loralens.load_lora_adapter(second)
    base = loralens.base_for(lora, minilm_path)
    api: dict = {"modules": ["value"], "device": "cpu", "dtype": torch.float32}
    flags = ("--modules", "value", "--dtype", "float32")

    def plain(data: dict) -> dict:
        return json.loads(json_text(data))

    got = run_json("amplification", "--base", minilm_path, "--adapter", first, "--n-random", "2", *flags)
    budget = {"max_memory": "2GB"}  # the commands' default budget, recorded in the settings
    assert got == plain(amplification_report(base, lora, n_random=2, **api, **budget).to_dict())
    assert got["settings"]["inputs"]["adapter"]["path"] == str(lora.path)
    got = run_json("spectra", "--base", minilm_path, "--adapter", first, *flags)
    assert got == plain(spectra_report(base, lora, **api, **budget).to_dict())
    got = run_json("overlap", "--base", minilm_path, "--adapter", first, "--adapter", second, *flags)
    assert got == plain(rank_overlap(lora, other, base=base, **api).to_dict())
    assert [a["path"] for a in got["settings"]["inputs"]["adapters"]] == [str(first), str(second)]
    got = run_json("overlap", "--adapter", first, "--adapter", second, *flags)  # no base: the adapters alone
    assert got == plain(rank_overlap(lora, other, **api).to_dict())
    assert set(got["settings"]["inputs"]) == {"adapters"}


def test_spectra_health_columns_and_config_warnings(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """Health numbers in the table and the JSON; each config check one ``warning:`` line on stderr, exit code 0,
    and the same findings under ``checks`` in ``--json``."""
    pissa = tmp_path / "pissa"
    shutil.copytree(tiny_bert_adapter, pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    (pissa / "adapter_config.json").write_text(json.dumps(config))
    argv = ["spectra", "--base", str(tiny_bert), "--adapter", str(pissa)]
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert all(column in header for column in ("dominance", "spike", "stable rank"))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines), result.stderr
    assert "lora_alpha is 8, PEFT's default, while r is 4" in lines[0]
    assert "init_lora_weights is 'pissa_niter_4'" in lines[1] and "path_initial_model_for_weight_conversion" in lines[1]
    data = json.loads(run_cli(*argv, "--json").stdout)
    assert [c["check"] for c in data["checks"]] == ["default_alpha", "modified_base_init"]
    assert [f"warning: {c['message']}" for c in data["checks"]] == lines
    for ms in data["modules"].values():
        assert len(ms["dominance"]) == len(ms["spike_ratio"]) == len(ms["stable_rank"]) == len(ms["layers"])
        assert all(1 <= x <= 4 for x in ms["stable_rank"]) and all(x >= 1 for x in ms["spike_ratio"])


def test_spectra_of_the_shipped_adapter_warns_nothing(minilm_path: Path) -> None:
    from loralens.examples import default_adapter

    proc = run_cli("spectra", "--base", minilm_path, "--adapter", default_adapter(0), "--json", "--modules", "value")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    data = json.loads(proc.stdout)
    assert data["checks"] == [] and len(data["modules"]["value"]["stable_rank"]) == 6


def test_exact_and_cache_options(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """--exact, --cache-dir and --no-cache on amplification and spectra (#15): the same numbers every way; the
    cache folder holds entries after a cached run and none is written with --no-cache."""
    for command in ("amplification", "spectra"):
        common = [command, "--base", str(tiny_bert), "--adapter", str(tiny_bert_adapter), "--json", "--device", "cpu"]
        folder = tmp_path / command
        outputs = []
        for extra in (["--cache-dir", str(folder)], ["--cache-dir", str(folder)], ["--exact", "--no-cache"]):
            result = run_cli(*common, *extra)
            assert result.returncode == 0, result.stderr
            outputs.append(json.loads(result.stdout))
        assert list(folder.glob("spectral-v1/*.safetensors"))  # written by the first run, read by the second
        assert outputs[0]["modules"] == outputs[1]["modules"]
        assert outputs[0]["settings"]["exact"] is False and outputs[2]["settings"]["exact"] is True
        field = "W_top_projection" if command == "amplification" else "W_singular_values"
        for name, mod in outputs[0]["modules"].items():
            got, want = torch.tensor(mod[field], dtype=torch.float64), outputs[2]["modules"][name][field]
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
        empty = tmp_path / f"{command}-none"
        assert run_cli(*common, "--no-cache", "--cache-dir", empty).returncode == 0
        assert not empty.exists()


def test_overlap_passes_its_progress_bar(tiny_bert_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """overlap runs under the delayed progress bar (none with --quiet, nor when piped), counting each module's
    layers once per factor."""
    import loralens.cli.lowrank

    record = record_progress(monkeypatch, loralens.cli.lowrank)
    args = ["overlap", "--adapter", tiny_bert_adapter, "--adapter", tiny_bert_adapter, "--modules", "query"]
    for extra in ([], ["--quiet"]):
        proc = run_cli(*args, "--device", "cpu", "--json", *extra)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert record.quiet_flags == [False, True]
    assert record.calls == [("layers", 2, 4), ("layers", 4, 4)] * 2  # 2 layers of query, factors A then B; each run

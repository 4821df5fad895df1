"""Output paths that would lose data or fail late, adapter configs that would hang, and
faults of our own choosing beyond the issue's list (special files that block a reader, closed streams, absurd
scalings, empty option values).

Rows are checked exactly as ``tests/cli/test_bad_input.py`` checks its table: the exit code, one ``error:`` line
with the expected words, empty stdout, nothing written. Beyond that each row says what must be left intact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from clitools import BadInput, check_bad_input, run_cli
from loralens.io.outputs import MARKER, STALE_AFTER_S, json_writer, remove_stale_staging, write_outputs


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _exported_adapter(src: Path, dst: Path) -> Path:
    """An adapter folder as ``loralens export`` leaves it: it carries the output marker, so --force may replace it."""
    shutil.copytree(src, dst)
    (dst / MARKER).write_text(json.dumps({"loralens_output": ["adapter_config.json", "adapter_model.safetensors"]}))
    return dst


def _expect_refusal(argv: list, words: str) -> str:
    result = run_cli(*argv)
    check_bad_input(BadInput(argv, words), result)
    return result.stderr.strip()


@pytest.mark.parametrize(
    ("command", "where"),
    [
        ("conversion", "the adapter itself"),
        ("conversion", "inside the adapter"),
        ("conversion", "above the adapter"),
        ("conversion", "the base itself"),
        ("figure", "the adapter itself"),
        ("report", "the adapter itself"),
        ("spectra", "inside the adapter"),
        ("overlap", "the adapter itself"),
    ],
)
def test_an_output_never_replaces_or_nests_with_an_input(
    command: str, where: str, tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path
) -> None:
    """`conversion --out X --force` with X the adapter being analysed replaced the adapter with the results."""
    project = tmp_path / "project"
    adapter = _exported_adapter(tiny_bert_adapter, project / "adapter")
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    (base / MARKER).write_text("{}")
    out = {
        "the adapter itself": adapter,
        "inside the adapter": adapter / "results",
        "above the adapter": project,
        "the base itself": base,
    }[where]
    before = _tree(tmp_path)
    argv = [command, "--base", base, "--adapter", adapter, "--out", out, "--force"]
    if command == "overlap":
        argv = ["overlap", "--adapter", adapter, "--adapter", tiny_bert_adapter, "--out", out, "--force"]
    line = _expect_refusal(argv, "write the results to another folder")
    assert {"the adapter itself": "is the input", "the base itself": "is the input"}.get(where, "") in line
    assert _tree(tmp_path) == before  # every input byte-identical, nothing added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "project"]


@pytest.mark.parametrize("case", ["dot", "below a file", "dangling link"])
def test_unusable_output_paths_are_refused_before_any_work(
    case: str, tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """These failed only after the whole computation, with "Device or resource busy" / "Not a directory" /
    "File exists"; now each is named up front (no analysis runs: the adapter is never even opened)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("x")
    (work / "link").symlink_to(work / "nowhere")
    monkeypatch.chdir(work)
    out, words = {
        "dot": (".", "a folder of its own"),
        "below a file": ("file.txt/out", "file.txt is a file"),
        "dangling link": ("link", "dangling symbolic link"),
    }[case]
    opened = []
    monkeypatch.setattr("loralens.cli.core.load_inputs", lambda *a: opened.append(a))
    _expect_refusal(["conversion", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out], words)
    assert opened == []
    assert sorted(p.name for p in work.iterdir()) == ["file.txt", "link"]


def test_a_catastrophic_pattern_is_matched_in_linear_time(
    tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path
) -> None:
    """`(a|a)*$`-style keys compile in Python's re and then backtrack for minutes on a module name; RE2 matches
    them in linear time, so the run finishes (that pattern matches no module: the default rank applies)."""
    import re

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_bert_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    evil = "(.*a){25}x"
    config["rank_pattern"] = {evil: 2}
    config["alpha_pattern"] = {"(a|aa)+$": 3.0}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    name = "encoder.layer.0.attention.self.query" + "a" * 30
    start = time.perf_counter()
    assert re.compile(evil).pattern and not _re2_match(evil, name)
    assert time.perf_counter() - start < 5  # the same match by Python's re takes longer than this test runs
    result = run_cli("similarity", "--base", tiny_bert, "--adapter", adapter, "--json")
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert json.loads(out)["modules"]["query"]


def _re2_match(key: str, name: str) -> bool:
    from loralens.io.keys import compile_module_pattern

    return compile_module_pattern(key).match(name) is not None


@pytest.mark.parametrize(
    ("key", "words"),
    [
        (r"(query)\1", "cannot be matched in linear time"),
        (r"(?=query)query", "cannot be matched in linear time"),
        ("q" * 1001, "longer than 1000 characters"),
        ("(", "not a valid regular expression"),
    ],
)
def test_patterns_that_only_a_backtracking_engine_takes_are_refused(
    key: str, words: str, tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_bert_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {key: 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = _expect_refusal(["similarity", "--base", tiny_bert, "--adapter", adapter], words)
    assert "adapter_config.json" in line and "rank_pattern" in line


def test_peft_pattern_rule_is_kept() -> None:
    """RE2 gives PEFT's matches: a key matches a whole dotted suffix of the module name, first key wins."""
    from loralens.io.keys import peft_pattern_value

    pattern = {"layer.0.attention.self.query": 2, "query": 4, r"layer\.[12]\..*value": 6}
    assert peft_pattern_value(pattern, "encoder.layer.0.attention.self.query", 8) == 2
    assert peft_pattern_value(pattern, "encoder.layer.3.attention.self.query", 8) == 4
    assert peft_pattern_value(pattern, "encoder.layer.2.attention.self.value", 8) == 6
    assert peft_pattern_value(pattern, "encoder.layer.3.attention.self.value", 8) == 8
    assert peft_pattern_value(pattern, "encoder.layer.3.attention.self.xquery", 8) == 8  # not a dotted suffix


def test_stale_staging_of_a_killed_run_is_removed(tmp_path: Path) -> None:
    """SIGKILL (or a power cut) can leave `.out.<random>.tmp` beside the output; the next run of the same output
    removes what is older than STALE_AFTER_S, puts back a set-aside previous output, and leaves fresh ones (a
    run still writing) and other people's files alone."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.abcd1234.tmp"
    fresh = tmp_path / ".out.efgh5678.tmp"
    other = tmp_path / ".out.notes.tmp"  # not a name mkdtemp makes
    for folder in (stale, fresh, other):
        folder.mkdir()
        (folder / "x.json").write_text("{}")
    old_output = tmp_path / ".out.ijkl9012.old"
    old_output.mkdir()
    (old_output / MARKER).write_text("{}")
    past = time.time() - STALE_AFTER_S - 60
    for folder in (stale, other, old_output):
        os.utime(folder, (past, past))
    assert remove_stale_staging(out) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.efgh5678.tmp", ".out.notes.tmp", "out"]
    assert (out / MARKER).is_file()  # the previous output, put back where a killed swap had left none
    write_outputs(out, {"a.json": json_writer({})}, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.efgh5678.tmp", ".out.notes.tmp", "out"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("base weights are a FIFO", "named pipe (FIFO), not a regular file"),
        ("adapter config is a FIFO", "named pipe (FIFO), not a regular file"),
        ("adapter weights are /dev/zero", "character device, not a regular file"),
        ("adapter config is /dev/urandom", "character device, not a regular file"),
        ("lora_alpha 1e308", "makes the update s B A overflow"),
        ("--modules ,", "names no module"),
        ("keys carry the adapter name", "re-save the adapter with model.save_pretrained"),
    ],
)
def test_faults_of_our_own(case: str, words: str, tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path) -> None:
    """Before: a FIFO base hung the run forever (it was opened to test permissions); FIFO or device configs and
    weights were reported as missing ("no adapter_config.json"); lora_alpha 1e308 overflowed s B A to inf and was
    reported as an all-zero, untrained adapter; `--modules ,` silently analysed every module; a PeftModel's own
    state dict (keys `lora_A.default.weight`) was "no LoRA factors" with no hint why."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(tiny_bert, base)
    shutil.copytree(tiny_bert_adapter, adapter)
    command = "similarity"
    extra: list[str] = []
    if case == "base weights are a FIFO":
        (base / "model.safetensors").unlink()
        os.mkfifo(base / "model.safetensors")
    elif case == "adapter config is a FIFO":
        (adapter / "adapter_config.json").unlink()
        os.mkfifo(adapter / "adapter_config.json")
    elif case == "adapter weights are /dev/zero":
        (adapter / "adapter_model.safetensors").unlink()
        (adapter / "adapter_model.safetensors").symlink_to("/dev/zero")
    elif case == "adapter config is /dev/urandom":
        (adapter / "adapter_config.json").unlink()
        (adapter / "adapter_config.json").symlink_to("/dev/urandom")
    elif case == "lora_alpha 1e308":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
        command = "amplification"
    elif case == "--modules ,":
        extra = ["--modules", ","]
    elif case == "keys carry the adapter name":  # torch.save(peft_model.state_dict()) instead of save_pretrained
        tensors = load_file(adapter / "adapter_model.safetensors")
        named = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
        save_file(named, str(adapter / "adapter_model.safetensors"))
    _expect_refusal([command, "--base", base, "--adapter", adapter, *extra], words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_a_closed_stdout_is_one_line(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """`loralens ... >&-` started Python with no sys.stdout: an AttributeError traceback on the first print."""
    proc = subprocess.run(
        [sys.executable, "-m", "loralens", "similarity", "--base", str(tiny_bert), "--adapter", str(tiny_bert_adapter)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.close(1),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: standard output is closed; redirect it to a file or to /dev/null"


def test_dora_product_is_said_to_be_the_factors_not_the_update(tiny_bert: Path, tmp_path: Path) -> None:
    """similarity's BA (W^-1 B A) and compare's BA column use B A; for DoRA that is not the update, so it is said
    once, in one warning line; A and B, which DoRA trains as LoRA does, are computed as before."""
    import checkpoints

    dora = checkpoints.dora_adapter(tiny_bert, tmp_path / "dora")
    result = run_cli("similarity", "--base", tiny_bert, "--adapter", dora, "--json")
    code, out, err = result.returncode, result.stdout, result.stderr
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("warning: "), err
    assert "DoRA adapter: the B A results (W^-1 B A, phi of BA) are of the product" in lines[0]
    assert str(dora) in lines[0]
    assert set(json.loads(out)["modules"]["query"]) == {"A", "B", "BA"}


def test_adapters_with_ignored_fan_in_fan_out_flags_go_together(
    tiny_bert: Path, tiny_bert_adapter: Path, tmp_path: Path
) -> None:
    """Two adapters of one BERT base, one with a wrong `fan_in_fan_out: true` (PEFT ignores it on nn.Linear): the
    weights are read the same way, so several-adapter similarity takes both (it compared the raw flags)."""
    flagged = tmp_path / "flagged"
    shutil.copytree(tiny_bert_adapter, flagged)
    config = json.loads((flagged / "adapter_config.json").read_text())
    (flagged / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    argv = ["similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--adapter", flagged, "--json"]
    result = run_cli(*argv)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert [line.split(":")[0] for line in err.strip().splitlines()] == ["warning"]  # the flag is ignored, once
    one, two = json.loads(out)["adapters"]
    assert one["modules"]["query"]["B"]["phi"] == two["modules"]["query"]["B"]["phi"]  # same factors, same numbers

"""Faults that used to end in a Python traceback: each is now one ``error:`` line, exit code 2, stdout empty.

The table rows run the real entry point in this process and assert what ``test_bad_input.test_bad_input``
asserts (exit code, one ``error:`` line holding the expected words, empty stdout, nothing written into the
working folder). Faults that need the operating system's help run ``python -m loralens`` in a subprocess: a
file-size limit (RLIMIT_FSIZE), a full disk (a small tmpfs), stdout on ``/dev/full``, and a base folder the user
may not read (root's override capabilities dropped). Each of those asserts the message the fault itself causes,
so a run that did not hit the fault fails instead of passing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

import checkpoints
from clitools import BadInput, check_bad_input, run_bad_input

LONG_NAME = "n" * 300  # longer than any file system's name limit (255 bytes on Linux)


def _metrics(task: str, method: str, seed: int, **values: object) -> str:
    """A metrics.json as ``loralens train`` writes it, with ``values`` replacing its numbers."""
    data = {
        "task": task,
        "method": method,
        "metric": "accuracy",
        "seed": seed,
        "before": 0.5,
        "after": 0.8,
        "examples_per_s": 40.0,
        "trainable_params": 512,
        "settings": {"r": 4, "steps": 10},
        **values,
    }
    return json.dumps(data)  # writes NaN and Infinity as Python's json does (allow_nan)


def _nested(depth: int) -> str:
    return '{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_bert_adapter: Path) -> dict[str, BadInput]:
    """case -> BadInput; files are built once for the module."""
    tmp = tmp_path_factory.mktemp("errors")
    base, adapter = str(tiny_bert), str(tiny_bert_adapter)
    sim = ["similarity", "--base", base, "--adapter", adapter]

    def with_adapter(folder: Path) -> list[str]:
        return ["similarity", "--base", base, "--adapter", str(folder)]

    def adapter_copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_bert_adapter, tmp / name))

    r: dict[str, BadInput] = {}
    # --- names longer than the system allows
    r["--out name too long"] = BadInput(
        ["conversion", "--base", base, "--adapter", adapter, "--out", str(tmp / LONG_NAME)], "file name too long"
    )
    r["--adapter name too long"] = BadInput(with_adapter(tmp / LONG_NAME), "file name too long")
    # --- JSON files: nesting and size
    deep = adapter_copy("deep-config")
    (deep / "adapter_config.json").write_text(_nested(100_000))
    r["adapter_config.json nested 100,000 deep"] = BadInput(with_adapter(deep), "nested more than 64 levels")
    huge = adapter_copy("huge-config")
    with (huge / "adapter_config.json").open("r+b") as f:
        f.truncate(4 * 2**30)  # a sparse 4 GiB file: costs no disk, and reading it whole would cost 4 GiB
    r["adapter_config.json of 4 GiB"] = BadInput(with_adapter(huge), "larger than 16 MiB")
    deep_base = Path(shutil.copytree(tiny_bert, tmp / "deep-base"))
    (deep_base / "config.json").write_text(_nested(100_000))
    r["base config.json nested 100,000 deep"] = BadInput(
        ["similarity", "--base", str(deep_base), "--adapter", adapter], "config.json"
    )
    cond_deep = checkpoints.condlora_adapter(tmp / "cond-deep", hidden=32, base_name=base)
    (cond_deep / "adapter_config.json").write_text(_nested(100_000))
    r["CondLoRA adapter_config.json nested 100,000 deep"] = BadInput(
        ["compare", "--base", base, "--lora", adapter, "--condlora", str(cond_deep)], "nested more than 64 levels"
    )
    # --- rank-0 factors
    rank0 = adapter_copy("rank-0")
    weights = load_file(rank0 / "adapter_model.safetensors")
    weights = {k: v[:0] if "lora_A" in k else v[:, :0] for k, v in weights.items()}
    save_file(weights, str(rank0 / "adapter_model.safetensors"))
    r["rank-0 factors"] = BadInput(with_adapter(rank0), "are empty (rank 0")
    # --- options
    r["--modules query,query"] = BadInput([*sim, "--modules", "query,query"], "'query' more than once")
    r["--modules query,self.query"] = BadInput([*sim, "--modules", "query,self.query"], "names module 'query' again")
    r["--device meta"] = BadInput([*sim, "--device", "meta"], "--device 'meta' is not supported")
    r["--device mps"] = BadInput([*sim, "--device", "mps"], "--device 'mps' is not supported")
    r["--seed 2**64"] = BadInput([*sim, "--seed", str(2**64)], "--seed 18446744073709551616 is out of range")
    r["--seed -1"] = BadInput([*sim, "--seed", "-1"], "use a seed from 0 to 4294967295")
    # --- metrics.json that report / compare read
    for case, value in (("NaN", float("nan")), ("Infinity", float("inf")), ("a string", "fast")):
        cond = checkpoints.condlora_adapter(tmp / f"cond-speed-{case}", hidden=32, base_name=base)
        (cond / "metrics.json").write_text(_metrics("vader", "condlora", 0, examples_per_s=value))
        r[f"report: examples_per_s {case} in metrics.json"] = BadInput(
            ["report", "--base", base, "--lora", adapter, "--condlora", str(cond), "--out", str(tmp / "rep")],
            f"{cond / 'metrics.json'}: 'examples_per_s' is {value!r}, not a finite number",
        )
    loras = [adapter_copy(f"lora-seed{s}") for s in (0, 1)]
    conds = [checkpoints.condlora_adapter(tmp / f"cond-seed{s}", hidden=32, base_name=base) for s in (0, 1)]
    for s in (0, 1):
        (loras[s] / "metrics.json").write_text(_metrics("vader", "lora", s))
        (conds[s] / "metrics.json").write_text(_metrics("vader", "condlora", s, after=float("nan") if s else 0.8))
    pairs = [x for s in (0, 1) for x in ("--lora", str(loras[s]), "--condlora", str(conds[s]))]
    r["compare: after NaN in metrics.json"] = BadInput(
        ["compare", "--base", base, *pairs], f"{conds[1] / 'metrics.json'}: 'after' is nan, not a finite number"
    )
    deep_metrics = adapter_copy("deep-metrics")
    (deep_metrics / "metrics.json").write_text(_nested(100_000))
    r["report: metrics.json nested 100,000 deep"] = BadInput(
        ["report", "--base", base, "--lora", str(deep_metrics), "--condlora", str(conds[0]), "--out", str(tmp / "r")],
        f"{deep_metrics / 'metrics.json'}: invalid JSON (nested more than 64 levels",
    )
    return r


CASES = [
    "--out name too long",
    "--adapter name too long",
    "adapter_config.json nested 100,000 deep",
    "adapter_config.json of 4 GiB",
    "base config.json nested 100,000 deep",
    "CondLoRA adapter_config.json nested 100,000 deep",
    "rank-0 factors",
    "--modules query,query",
    "--modules query,self.query",
    "--device meta",
    "--device mps",
    "--seed 2**64",
    "--seed -1",
    "report: examples_per_s NaN in metrics.json",
    "report: examples_per_s Infinity in metrics.json",
    "report: examples_per_s a string in metrics.json",
    "compare: after NaN in metrics.json",
    "report: metrics.json nested 100,000 deep",
]


def test_the_table_is_complete(rows: dict[str, BadInput]) -> None:
    assert list(rows) == CASES


@pytest.mark.parametrize("case", CASES)
def test_error(case: str, rows: dict[str, BadInput], tmp_path: Path) -> None:
    run_bad_input(rows[case], tmp_path)


def assert_one_error(proc: subprocess.CompletedProcess[str], words: str) -> None:
    stdout = "" if proc.stdout is None else proc.stdout  # None: stdout went to a device or pipe of the test's own
    check_bad_input(BadInput([], words), subprocess.CompletedProcess(proc.args, proc.returncode, stdout, proc.stderr))


# ----------------------------------------------------------------------------------------------- subprocesses


def loralens(*args: str | Path, stdout: Any = subprocess.PIPE, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m loralens ARGS``; no .pyc writes (a file-size limit must hit loralens's own files)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [*kwargs.pop("prefix", []), sys.executable, "-m", "loralens", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
        check=False,
        **kwargs,
    )


@pytest.mark.slow
def test_a_file_size_limit_while_writing(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """RLIMIT_FSIZE below the size of conversion.safetensors: safetensors' write fails with EFBIG (CPython ignores
    SIGXFSZ, so the process is not killed), and the partial folder is removed."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "out"
    proc = loralens("conversion", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr  # -25 would be SIGXFSZ killing it
    assert_one_error(proc, f"{out}: cannot write the results")
    assert "(File too large)" in proc.stderr and "ulimit -f" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


@pytest.mark.slow
def test_a_full_disk_while_writing(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """The output goes to a 16 KiB tmpfs (about 40 KB are written): ENOSPC inside safetensors' writer."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        out = small / "out"
        proc = loralens("conversion", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--out", out)
        assert_one_error(proc, f"{out}: cannot write the results")
        assert "(No space left on device)" in proc.stderr and "free space" in proc.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.slow
def test_stdout_on_a_full_device(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    with Path("/dev/full").open("w") as full:
        proc = loralens("similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--json", stdout=full)
    assert_one_error(proc, "standard output: cannot print to it")
    assert "no space left on device" in proc.stderr


@pytest.mark.slow
def test_stdout_on_a_closed_pipe(tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        proc = loralens("similarity", "--base", tiny_bert, "--adapter", tiny_bert_adapter, "--json", stdout=write)
    finally:
        os.close(write)
    assert_one_error(proc, "standard output: cannot print to it (broken pipe")


@pytest.mark.slow
def test_a_base_folder_without_read_permission(tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path) -> None:
    """The base folder is mode 000. Root reads it anyway through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so as root
    the run drops both (setpriv), as an ordinary user would be."""
    base = Path(shutil.copytree(tiny_bert, tmp_path / "base"))
    base.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root's override capabilities"
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    try:
        proc = loralens("similarity", "--base", base, "--adapter", tiny_bert_adapter, prefix=prefix, cwd=tmp_path)
    finally:
        base.chmod(0o755)
    assert_one_error(proc, str(base))
    assert "permission denied" in proc.stderr.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.slow
def test_sigxfsz_is_ignored_in_the_cli() -> None:
    """What the file-size-limit test relies on: the interpreter running the CLI ignores SIGXFSZ, so a write past
    the limit raises EFBIG instead of killing the process (subprocess restores SIG_DFL before exec)."""
    code = "import signal, loralens.cli; print(signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "True"


def test_read_json_refuses_large_and_deep_files(tmp_path: Path) -> None:
    from loralens.errors import CheckpointError
    from loralens.io.files import MAX_JSON_BYTES, MAX_JSON_DEPTH, read_json

    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"x": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}))
    assert "x" in read_json(ok)  # exactly the deepest accepted
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({"x": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)}))
    with pytest.raises(CheckpointError, match="nested more than 64 levels"):
        read_json(deep)
    big = tmp_path / "big.json"
    big.write_text('{"x": "' + "a" * MAX_JSON_BYTES + '"}')
    with pytest.raises(CheckpointError, match=f"{big}: larger than 16 MiB"):
        read_json(big)

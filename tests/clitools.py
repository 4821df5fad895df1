"""The one way tests run the ``loralens`` command line.

:func:`run_cli` runs the real console entry point (:func:`loralens.cli.main`: argument parsing, error
handling, exit codes) inside the test process, so a CLI test costs what the command costs, not an interpreter
start and a torch import. :func:`run_cli_subprocess` runs ``python -m loralens`` in a child process, for the
few tests whose point is the process itself (the installed entry point, signals, file descriptors).
Both return a :class:`subprocess.CompletedProcess` with the exit code and the text of stdout and stderr.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from loralens.cli import main

__all__ = ["ProgressRecord", "record_progress", "run_cli", "run_cli_subprocess"]


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``loralens *args`` in this process; ``cwd``: the working folder for the run (restored after)."""
    argv = ["loralens", *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, Path.cwd()
    code: int | str | None = 0
    try:
        sys.argv = argv
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def run_cli_subprocess(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m loralens *args`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "loralens", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


@dataclass
class ProgressRecord:
    """What a command passed to its progress bar: ``calls`` ``(stage, done, total)`` and the ``quiet`` flag of each
    ``progress_bar(quiet)`` it opened."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)
    quiet_flags: list[bool] = field(default_factory=list)


def record_progress(monkeypatch: Any, command_module: ModuleType) -> ProgressRecord:
    """Replace ``command_module.progress_bar`` (the CLI's delayed rich bar) by one that records, for tests that
    check a command reports progress and honours ``--quiet``."""
    record = ProgressRecord()

    @contextlib.contextmanager
    def recording(quiet: bool, **_: object) -> Iterator[object]:
        record.quiet_flags.append(quiet)
        yield lambda stage, done, total: record.calls.append((stage, done, total))

    monkeypatch.setattr(command_module, "progress_bar", recording)
    return record

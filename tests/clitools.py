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

__all__ = [
    "BadInput",
    "ProgressRecord",
    "check_bad_input",
    "record_progress",
    "run_bad_input",
    "run_cli",
    "run_cli_subprocess",
]


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``loralens *args`` in this process; ``cwd``: the working folder for the run (restored after).

    Fails the test if the command leaves ``sys.stdout`` replaced (the CLI guards it while a command runs)."""
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
            handed_back = sys.stdout is stdout  # the redirect's exit would hide a guard left in place
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    assert handed_back, f"loralens {' '.join(argv[1:])} left sys.stdout replaced"
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


@dataclass(frozen=True)
class BadInput:
    """A row of a bad-input table: the command's arguments, words its one stderr line must hold, the exit code
    (0: an input answered with a caveat, one ``warning:`` line)."""

    argv: list[str]
    words: str
    code: int = 2


def check_bad_input(row: BadInput, result: subprocess.CompletedProcess[str]) -> None:
    """What every row of a bad-input table must give: the exit code; exactly one ``error:`` line (``warning:`` for
    exit 0) holding the row's words; no traceback; stdout empty on error, the result on a warning."""
    err = result.stderr
    lines = err.strip().splitlines()
    assert result.returncode == row.code, err
    assert len(lines) == 1 and lines[0].startswith("error: " if row.code else "warning: "), err
    assert row.words in lines[0], lines[0]
    assert "Traceback" not in err
    assert result.stdout == "" if row.code else result.stdout.strip()


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


def run_bad_input(row: BadInput, cwd: Path) -> None:
    """Run a bad-input row from the empty folder ``cwd`` and check it (:func:`check_bad_input`); nothing may be
    written there (an output written by mistake into the working folder would show up)."""
    check_bad_input(row, run_cli(*row.argv, cwd=cwd))
    assert list(cwd.iterdir()) == []

"""The core imports none of the I/O, plotting, CLI, training or SciPy stacks (dependency direction errors <- core).

A fresh interpreter imports the core modules and prints which forbidden top-level modules ended up in
``sys.modules``; the assertions run here, in the parent. Meta-tests run the same checker where the answer is
known to be a violation, so a checker that can never fail would be caught.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["loralens.core.conversion", "loralens.core.similarity"]
FORBIDDEN = ["matplotlib", "seaborn", "safetensors", "typer", "rich", "transformers", "peft", "scipy"]

# Run as `python -c CHECKER '<json imports>' '<json forbidden>'`; prints a JSON list of the forbidden modules present.
CHECKER = """
import importlib, json, sys
imports, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in imports:
    importlib.import_module(name)
print(json.dumps(sorted(name for name in forbidden if name in sys.modules)))
"""


def imported_forbidden(imports: list[str], forbidden: list[str], cwd: Path) -> list[str]:
    """Which of ``forbidden`` a fresh interpreter has in sys.modules after importing ``imports``."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECKER, json.dumps(imports), json.dumps(forbidden)],
        capture_output=True,
        text=True,
        cwd=cwd,  # keep the repository root off sys.path[0]
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def core_imports(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One subprocess for all parametrised checks below."""
    return imported_forbidden(CORE, FORBIDDEN, tmp_path_factory.mktemp("isolation"))


@pytest.mark.parametrize("module", FORBIDDEN)
def test_core_does_not_import(core_imports: list[str], module: str) -> None:
    assert module not in core_imports


def test_checker_reports_a_forbidden_stdlib_module(tmp_path: Path) -> None:
    # control: colorsys is not loaded at start-up (nor by the checker), so a report of it comes from the import alone
    assert imported_forbidden([], ["colorsys_does_not_exist", "colorsys"], tmp_path) == []
    assert imported_forbidden(["colorsys"], ["colorsys_does_not_exist", "colorsys"], tmp_path) == ["colorsys"]


@pytest.mark.slow
def test_checker_reports_the_cli_stack(tmp_path: Path) -> None:
    # loralens.cli is the one module allowed to import typer and rich: the checker must see them.
    found = imported_forbidden(["loralens.cli"], FORBIDDEN, tmp_path)
    assert "typer" in found and "rich" in found


@pytest.mark.slow
def test_cli_start_up_does_not_import_matplotlib(tmp_path: Path) -> None:
    # the commands that draw import loralens.render.report (and matplotlib) inside themselves: `loralens` starts faster
    found = imported_forbidden(
        ["loralens.cli"], ["matplotlib", "loralens.render.report", "loralens.render.lowrank"], tmp_path
    )
    assert found == []

"""The library speaks Python, the CLI speaks flags (#12).

No string outside ``loralens/cli/`` names a command-line flag: library errors say what is wrong and the fix in
Python API words, and name the parameter concerned in ``option``; the CLI's one table
(:data:`loralens.cli._app.OPTION_ADVICE`) turns each ``option`` into its flag advice.
"""

from __future__ import annotations

import ast
import pickle
import re
import warnings
from pathlib import Path

import pytest

import loralens
from loralens.analyses.engine import parse_memory_size, resolve_device
from loralens.cli._app import OPTION_ADVICE, with_flag_advice
from loralens.core.spectral import SpectralConvergenceError
from loralens.errors import LoralensError, NearSingularWarning, OutputExistsError, RankError
from loralens.training.search import parse_lr_range

SRC = Path(loralens.__file__).parent
#: ``--word`` not preceded by a letter, digit or dash (so ``-------`` underlines and ``a--b`` are not flags).
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: Shell commands of other programs: ``pip install --no-deps ...`` names pip's flags, not ours.
PIP = re.compile(r"pip install(?: --[a-z][a-z-]*)+")


def _library_files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts)


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant (docstrings, messages, the literal parts of f-strings) with its line."""
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _option_values(tree: ast.AST) -> list[tuple[int, str]]:
    """The string constants given as ``option=`` or assigned to a variable ``option`` (``"dtype" if ... else
    None``, ``("i", "j")``); names and attributes (``option=e.option``, passing one on) are not values."""
    found = []
    for node in ast.walk(tree):
        values: list[ast.AST] = []
        if isinstance(node, ast.Call):
            values = [k.value for k in node.keywords if k.arg == "option"]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "option" for t in node.targets):
            values = [node.value]
        for value in values:
            found += _strings(value)
    return found


def _parameter_names(tree: ast.AST) -> set[str]:
    """Parameter names of every function and field names of every class (``TrainConfig.lr``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            names |= {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
        elif isinstance(node, ast.ClassDef):
            names |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return names


def _trees() -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in _library_files()}


def test_no_library_string_names_a_command_line_flag() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{line}: {flag}"
        for path, tree in _trees().items()
        for line, text in _strings(tree)
        for flag in FLAG.findall(PIP.sub("", text))
    ]
    assert not offenders, "library strings name CLI flags (say it in library words, set option=):\n" + "\n".join(
        offenders
    )


def test_the_flag_check_sees_messages_docstrings_and_f_strings() -> None:
    tree = ast.parse('"""Doc naming ``--force``."""\nraise E(f"{x}: pass --base <dir>")\n')
    texts = [text for _, text in _strings(tree)]
    assert [FLAG.findall(t) for t in texts] == [["--force"], ["--base"]]
    assert FLAG.findall(PIP.sub("", "`pip install --no-deps --force-reinstall pkg`")) == []
    assert FLAG.findall("Returns\n-------\nx") == []


def test_every_option_the_library_raises_has_flag_advice() -> None:
    trees = _trees()
    raised = {
        value: f"{path.relative_to(SRC)}:{line}" for path, tree in trees.items() for line, value in _option_values(tree)
    }
    assert {"base", "modules", "max_memory", "replace", "dtype"} <= set(raised)  # the collector finds them
    missing = {value: where for value, where in raised.items() if value not in OPTION_ADVICE}
    assert not missing, f"options without an entry in loralens.cli._app.OPTION_ADVICE: {missing}"
    unused = set(OPTION_ADVICE) - set(raised)
    assert not unused, f"OPTION_ADVICE entries no library error raises: {sorted(unused)}"
    parameters = set().union(*(_parameter_names(tree) for tree in trees.values()))
    assert set(raised) <= parameters, f"options that are no parameter of the library: {set(raised) - parameters}"


def test_every_flag_advice_names_a_flag() -> None:
    for option, advice in OPTION_ADVICE.items():
        assert option.isidentifier() and FLAG.search(advice), (option, advice)


def test_option_survives_pickling_and_leaves_the_message_alone() -> None:
    e = OutputExistsError("out: the output folder exists; replace it or choose a new one", option="replace")
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is OutputExistsError and str(again) == str(e) and again.option == "replace"
    assert again.options == ("replace",)
    batch = pickle.loads(pickle.dumps(RankError("phi", (1, 2), option=("i", "j"))))
    assert (str(batch), batch.indices, batch.option, batch.options) == ("phi", (1, 2), ("i", "j"), ("i", "j"))
    spectral = pickle.loads(pickle.dumps(SpectralConvergenceError("slow", (0,), option="dtype")))
    assert (str(spectral), spectral.indices, spectral.option, spectral.result) == ("slow", (0,), "dtype", None)
    plain = LoralensError("bad")
    assert plain.option is None and plain.options == () and str(plain) == "bad"
    assert isinstance(plain, ValueError)


def test_the_cli_adds_the_flag_advice() -> None:
    e = OutputExistsError("out: the output folder exists; replace it or choose a new one", option="replace")
    assert with_flag_advice(e) == f"{e} (pass --force to replace it)"
    two = RankError("i = 9, j = 9 would use arbitrary vectors; choose i and j <= 4", option=("i", "j"))
    assert with_flag_advice(two).endswith("<= 4 (set i with --i; set j with --j)")
    assert with_flag_advice(LoralensError("bad")) == "bad"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(NearSingularWarning("W is near-singular; compute in float64", option="dtype"), stacklevel=1)
    assert with_flag_advice(caught[0].message) == "W is near-singular; compute in float64 (use --dtype float64)"


@pytest.mark.parametrize(
    ("call", "option", "words"),
    [
        (lambda: parse_memory_size("lots"), "max_memory", "max_memory 'lots' is not"),
        (lambda: resolve_device("tpu"), "device", "unknown device 'tpu'"),
        (lambda: parse_lr_range("1e-3"), "lr_range", "lr_range takes LO,HI"),
    ],
)
def test_library_errors_name_the_parameter(call, option: str, words: str) -> None:
    with pytest.raises(LoralensError) as info:
        call()
    assert words in str(info.value) and info.value.option == option and not FLAG.search(str(info.value))

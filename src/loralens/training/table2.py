"""The paper's Table 2, reproduced: per task and method a learning-rate search on dev, then one run per seed at the
chosen rate, then mean +- std on test and the paired t-test (:func:`loralens.analyses.seeds.compare_seeds`).

Layout of the output folder (every run folder is written whole, so an interrupted reproduction resumes: a run whose
``metrics.json`` records the expected config is kept and skipped)::

    OUT/runs/<task>/<method>-seed<k>/   adapter, metrics.json (the first seed's run also lr_search.json)
    OUT/table/                          table2.md, table2.json (the summary, the chosen rates, the base)

The search of each (task, method) runs with the first seed; its best trial is that seed's run (same seed and rate:
the same run), and the other seeds train at the rate it chose.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.errors import LoralensError
from loralens.training.config import LR_RANGE, METHODS, TrainConfig
from loralens.training.search import check_lr_range
from loralens.training.trainer import LR_SEARCH_FILE, StepCallback, train

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_STEPS",
    "TABLE2_TASKS",
    "parse_int_list",
    "parse_per_task",
    "reproduce_table2",
    "table2_status",
]

logger = logging.getLogger(__name__)

TABLE2_TASKS = ("rt-polarity", "vader-rating")
#: Per-task defaults sized for a CPU (the MiniLM run of README.md); the paper trains 50-100 epochs.
DEFAULT_STEPS = {"rt-polarity": 200, "vader-rating": 300}
DEFAULT_MAX_LENGTH = {"rt-polarity": 64, "vader-rating": 16}


def parse_per_task(text: str | None, default: Mapping[str, int], option: str) -> dict[str, int]:
    """``"rt-polarity=1000,vader-rating=500"`` over ``default``; LoralensError naming ``option`` otherwise."""
    out = dict(default)
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        task, _, value = item.partition("=")
        if task.strip() not in default or not value.strip().isdigit() or int(value) < 1:
            raise LoralensError(f"{option} takes TASK=N,... with TASK in {', '.join(default)}; got {item!r}")
        out[task.strip()] = int(value)
    return out


def parse_int_list(text: str, option: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; LoralensError naming ``option`` otherwise."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise LoralensError(f"{option} takes comma-separated integers (e.g. 0,1,2), got {text!r}") from e


def reproduce_table2(
    base_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str] = TABLE2_TASKS,
    seeds: Sequence[int] = (0, 1, 2),
    lr_search: int = 5,
    lr_range: tuple[float, float] = LR_RANGE,
    config: TrainConfig | None = None,
    steps: Mapping[str, int] | None = None,
    max_length: Mapping[str, int] | None = None,
    base_name: str | None = None,
    on_run: Callable[[str, bool], None] | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train (or reuse) every run of Table 2 under ``out_dir`` and write the table; return its summary.

    ``config`` holds the shared settings (method, seed, steps, max_length and lr are set per run); ``steps`` and
    ``max_length`` per task default to :data:`DEFAULT_STEPS` and :data:`DEFAULT_MAX_LENGTH`. ``lr_search=0``
    trains every run at ``config.lr``. ``on_run(folder, reused)`` is called before each run, and ``on_step(step,
    steps, loss)`` after every optimizer step of every training (each trial of a search is one).

    Returns ``compare_seeds(...)`` plus ``rates`` (``{task: {method: {"lr", "dev", "searched"}}}``), ``base``,
    ``lr_search`` and ``lr_range``. Paired runs differ in their rate when it was searched per method, so the rate is
    left out of the settings the pairing checks and reported per method instead.
    """
    from loralens.analyses.seeds import compare_seeds
    from loralens.io.outputs import json_writer, write_outputs
    from loralens.render.tables import table2, to_markdown

    plan = _plan(out_dir, tasks, seeds, lr_search, lr_range, config, steps, max_length)
    base_name = base_name if base_name is not None else str(base_path)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {m: [] for m in METHODS} for t in plan.tasks}
    rates: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in plan.tasks}
    for run in plan.runs():
        lr = run.shared.lr if run.first else rates[run.task][run.method]["lr"]
        expected = run.at(lr)
        metrics = _finished(run.folder, expected, base_name, run.search, plan.lr_range)
        if on_run is not None:
            on_run(str(run.folder), metrics is not None)
        if metrics is None:
            logger.info("training %s", run.folder)
            metrics = train(
                base_path, run.task, expected, out_dir=run.folder, base_name=base_name, lr_search=run.search,
                lr_range=plan.lr_range, on_step=on_step,
                replace=True,  # a run folder of this command, made with other settings
            )  # fmt: skip
        if run.first:
            rate = {"lr": metrics["settings"]["lr"], "dev": metrics["dev_best"], "searched": bool(lr_search)}
            rates[run.task][run.method] = rate
        runs[run.task][run.method].append(metrics)

    comparable = {t: {m: [_without_lr(r) for r in rs] for m, rs in by.items()} for t, by in runs.items()}
    summary = compare_seeds(comparable)
    summary.update(rates=rates, base=base_name, lr_search=lr_search, lr_range=list(plan.lr_range))
    text = to_markdown(table2(summary), digits=4) + "\n" + _rates_markdown(rates) + f"\nBase `{base_name}`.\n"
    write_outputs(
        plan.out_dir / "table",
        {"table2.json": json_writer(summary), "table2.md": lambda p: p.write_text(text, encoding="utf-8")},
        replace=True,
    )
    summary["markdown"] = text
    return summary


@dataclass(frozen=True)
class _Run:
    """One run of the table: ``shared`` holds its settings but the seed and the rate; ``first``: the first seed's
    run, which searches the rate (``search`` trials) that the other seeds then train at."""

    task: str
    method: str
    seed: int
    first: bool
    search: int
    folder: Path
    shared: TrainConfig

    def at(self, lr: float) -> TrainConfig:
        """The run's whole config at rate ``lr`` (what ``train`` is given, and what a finished run must record)."""
        return self.shared.replace(seed=self.seed, lr=lr)


@dataclass(frozen=True)
class _Plan:
    """The checked settings of a reproduction, and its runs in the order they train."""

    out_dir: Path
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    lr_search: int
    lr_range: tuple[float, float]
    config: TrainConfig
    steps: dict[str, int]
    max_length: dict[str, int]

    def runs(self) -> Iterator[_Run]:
        for task in self.tasks:
            for method in METHODS:
                steps, max_length = self.steps[task], self.max_length[task]
                shared = self.config.replace(method=method, steps=steps, epochs=None, max_length=max_length)
                for k, seed in enumerate(self.seeds):
                    folder = self.out_dir / "runs" / task / f"{method}-seed{seed}"
                    yield _Run(task, method, seed, k == 0, self.lr_search if k == 0 else 0, folder, shared)


def _plan(
    out_dir: str | os.PathLike[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    lr_search: int,
    lr_range: tuple[float, float],
    config: TrainConfig | None,
    steps: Mapping[str, int] | None,
    max_length: Mapping[str, int] | None,
) -> _Plan:
    unknown = [t for t in tasks if t not in TABLE2_TASKS]
    if unknown or not tasks:
        raise LoralensError(f"Table 2 tasks are {', '.join(TABLE2_TASKS)}; got {', '.join(unknown) or 'none'}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise LoralensError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if lr_search < 0:
        raise LoralensError(f"lr_search must be >= 0 trials, got {lr_search}")
    return _Plan(
        Path(out_dir), tuple(tasks), tuple(seeds), lr_search, check_lr_range(lr_range),
        config if config is not None else TrainConfig(),
        {**DEFAULT_STEPS, **(steps or {})}, {**DEFAULT_MAX_LENGTH, **(max_length or {})},
    )  # fmt: skip


def table2_status(
    out_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[str] = TABLE2_TASKS,
    seeds: Sequence[int] = (0, 1, 2),
    lr_search: int = 5,
    lr_range: tuple[float, float] = LR_RANGE,
    config: TrainConfig | None = None,
    steps: Mapping[str, int] | None = None,
    max_length: Mapping[str, int] | None = None,
    base_name: str,
) -> list[dict[str, Any]]:
    """Where :func:`reproduce_table2` with these settings stands in ``out_dir``, run by run; trains nothing.

    One dict per run, in training order: ``task``, ``method``, ``seed``, ``folder`` and ``state``:

    - ``"done"``: finished with these settings; ``lr``, ``dev`` (best dev score), ``test`` (``after``);
    - ``"searching"`` (the first seed, when the rate is searched and a trial has begun): ``trials`` finished of
      ``n_trials``, and the best so far as ``lr`` and ``dev`` (None before any trial finished);
    - ``"to do"`` (a search not begun has ``trials`` 0 too), and ``"waiting"`` (a later seed whose rate the
      first seed's search has not chosen yet).

    A run or trial cut short adds ``step`` (its last saved step), ``steps`` and ``step_lr`` (its rate), from the
    state it saved (:mod:`loralens.training.resume`); a run or trial not started has ``step`` None.
    """
    from loralens.training.resume import fit_state_files, read_fit_progress
    from loralens.training.search import best_trial, journal_path, journal_trials

    plan = _plan(out_dir, tasks, seeds, lr_search, lr_range, config, steps, max_length)
    chosen: dict[tuple[str, str], float] = {}
    rows = []
    for run in plan.runs():
        row: dict[str, Any] = {"task": run.task, "method": run.method, "seed": run.seed, "folder": str(run.folder)}
        row |= {"step": None, "steps": run.shared.steps, "step_lr": None}
        rows.append(row)
        lr = run.shared.lr if run.first else chosen.get((run.task, run.method))
        if lr is None:
            row["state"] = "waiting"
            continue
        expected = run.at(lr)
        metrics = _finished(run.folder, expected, base_name, run.search, plan.lr_range)
        if metrics is not None:
            chosen[(run.task, run.method)] = metrics["settings"]["lr"]
            row |= {"state": "done", "lr": metrics["settings"]["lr"], "dev": metrics["dev_best"]}
            row["test"] = metrics["after"]
            continue
        any_rate = {"lr": None} if run.search else {}  # a search's trials differ in the rate
        for path in fit_state_files(run.folder):
            progress = read_fit_progress(path)
            if progress is None or progress.step >= (run.shared.steps or 0):
                continue  # unreadable, or a finished trial's state (the journal has it)
            if progress.config | any_rate == expected.to_dict() | any_rate:
                row |= {"step": progress.step, "step_lr": progress.config["lr"]}
        if not run.search:
            row["state"] = "to do"
            continue
        trials = journal_trials(journal_path(run.folder), expected, run.search, plan.lr_range)
        best = best_trial(trials.values()) or {"lr": None, "dev": None}
        started = bool(trials) or row["step"] is not None
        row |= {"state": "searching" if started else "to do", "trials": len(trials), "n_trials": run.search}
        row |= {"lr": best["lr"], "dev": best["dev"]}
    return rows


def _finished(
    folder: Path, expected: TrainConfig, base_name: str, lr_search: int, lr_range: tuple[float, float]
) -> dict[str, Any] | None:
    """The metrics of a finished run in ``folder`` made with ``expected`` (its rate searched when ``lr_search``)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        recorded = metrics["config"]
        if lr_search:
            record = json.loads((folder / LR_SEARCH_FILE).read_text(encoding="utf-8"))
            if (record["n_trials"], record["range"]) != (lr_search, list(lr_range)):
                return None
            recorded = recorded | {"lr": expected.lr}  # the searched rate; every other setting must match
        same = recorded == expected.to_dict() and metrics["base"] == base_name
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an earlier version's or a damaged run: train it again
    if same:
        logger.info("reusing %s", folder)
        return metrics
    return None


def _without_lr(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {**metrics, "settings": {k: v for k, v in metrics["settings"].items() if k != "lr"}}


def _rates_markdown(rates: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    from loralens.render.tables import Table, to_markdown

    rows = tuple(
        (task, *(f"{by[m]['lr']:.3g}" for m in METHODS), *(by[m]["dev"] for m in METHODS)) for task, by in rates.items()
    )
    searched = any(r["searched"] for by in rates.values() for r in by.values())
    title = "Learning rates chosen on dev" if searched else "Learning rates (given, not searched)"
    return to_markdown(Table(("task", "LoRA lr", "CondLoRA lr", "LoRA dev", "CondLoRA dev"), rows, title), digits=4)

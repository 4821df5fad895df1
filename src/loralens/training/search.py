"""Learning-rate search as the paper did it: an Optuna study, TPE, log-uniform rate, each trial scored on dev.

``optuna`` (in the ``train`` extra) is imported only when a search runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from loralens.errors import LoralensError
from loralens.training.config import LR_RANGE, TrainConfig, TrainingDivergedError

__all__ = ["best_trial", "check_lr_range", "journal_path", "journal_trials", "parse_lr_range", "search_lr"]

logger = logging.getLogger(__name__)


class _Trained(Protocol):
    """What a trial returns: its config and the dev score of its selected checkpoint (:class:`FitResult`)."""

    config: TrainConfig

    @property
    def dev_score(self) -> float: ...


R = TypeVar("R", bound=_Trained)


def check_lr_range(lr_range: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or a LoralensError unless ``0 < lo < hi`` and both are finite."""
    try:
        lo, hi = (float(x) for x in lr_range)
    except (TypeError, ValueError) as e:
        raise LoralensError(
            f"learning-rate range must be two numbers LO,HI, got {lr_range!r}", option="lr_range"
        ) from e
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise LoralensError(
            f"learning-rate range must have 0 < LO < HI, both finite; got {lo:g},{hi:g}", option="lr_range"
        )
    return lo, hi


def parse_lr_range(text: str | None) -> tuple[float, float]:
    """``"5e-5,5e-3"`` -> ``(5e-5, 5e-3)``; ``None`` gives the paper's :data:`LR_RANGE`."""
    if text is None:
        return LR_RANGE
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise LoralensError(f"lr_range takes LO,HI (e.g. 5e-5,5e-3), got {text!r}", option="lr_range")
    try:
        return check_lr_range((float(parts[0]), float(parts[1])))
    except ValueError as e:
        if isinstance(e, LoralensError):
            raise
        raise LoralensError(
            f"lr_range takes two numbers LO,HI (e.g. 5e-5,5e-3), got {text!r}", option="lr_range"
        ) from e


def search_lr(
    run: Callable[[TrainConfig], R],
    config: TrainConfig,
    n_trials: int,
    lr_range: tuple[float, float] = LR_RANGE,
    journal: Path | None = None,
) -> tuple[dict[str, Any], R]:
    """Search the learning rate: ``n_trials`` runs ``run(config.replace(lr=...))``, maximising their dev score.

    Optuna study, ``TPESampler(seed=config.seed)``, ``lr`` drawn with ``suggest_float(lo, hi, log=True)``.
    A trial that diverges (:class:`TrainingDivergedError`) is recorded as such and the search goes on.

    Returns ``(record, best)``: ``record`` (what ``lr_search.json`` holds) has ``method``, ``seed``, ``range``,
    ``n_trials``, ``sampler``, ``trials`` (``number``, ``lr``, ``dev``, ``state``, ``selected_step``) and
    ``best`` (``number``, ``lr``, ``dev``); ``best`` is the best trial's own result (only that one is kept).
    Raises LoralensError for a bad ``n_trials`` or range, or when every trial diverged.

    ``journal``: a JSON file that records each finished trial as it ends, so that a search cut short (a stopped
    session, Ctrl-C) resumes: TPE seeded alike proposes the same rates given the same earlier scores, so a trial
    the journal holds at the same rate is taken from it instead of trained again. Only the best trial's model is
    needed at the end; if that trial was taken from the journal, ``run`` is called for it once more (same seed,
    same rate): :func:`~loralens.training.trainer.train` restores it from the trial's saved state without
    training, or trains it again if that state is gone. The caller deletes the journal once the search's result is
    written.
    """
    if not (isinstance(n_trials, int) and n_trials >= 1):
        raise LoralensError(f"the learning-rate search needs at least 1 trial, got {n_trials!r}")
    lo, hi = check_lr_range(lr_range)
    try:
        import optuna
    except ImportError as e:
        raise LoralensError(
            f"the learning-rate search needs optuna ({e}); install it with `pip install loralens[train]`"
        ) from e

    trials: list[dict[str, Any]] = []
    best: dict[int, R] = {}  # trial number -> its model: only the best trained one is kept in memory
    done = journal_trials(journal, config, n_trials, (lo, hi))

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        record: dict[str, Any] = {"number": trial.number, "lr": lr, "dev": None, "state": "diverged"}
        trials.append(record)
        earlier = done.get(trial.number)
        if earlier is not None and earlier["lr"] == lr:
            record.update(earlier)
            logger.info("trial %d: lr %.3g %s (from %s)", trial.number, lr, record["state"], journal)
            if record["state"] != "complete":
                raise optuna.TrialPruned(record.get("error", "diverged"))
            return float(record["dev"])
        try:
            result = run(config.replace(lr=lr))
        except TrainingDivergedError as e:
            record["error"] = str(e)
            logger.info("trial %d: lr %.3g diverged", trial.number, lr)
            _write_journal(journal, config, n_trials, (lo, hi), trials)
            raise optuna.TrialPruned(str(e)) from e
        record.update(dev=result.dev_score, state="complete", selected_step=getattr(result, "selected_step", None))
        logger.info("trial %d: lr %.3g dev %.4f", trial.number, lr, result.dev_score)
        if not best or result.dev_score > next(iter(best.values())).dev_score:
            best.clear()
            best[trial.number] = result
        _write_journal(journal, config, n_trials, (lo, hi), trials)
        return result.dev_score

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial goes through our logger instead
    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
        study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    winner = best_trial(trials)
    if winner is None:
        raise TrainingDivergedError(
            f"{config.method}: all {n_trials} learning-rate trials in [{lo:g}, {hi:g}] diverged; "
            "try a lower lr_range; nothing was written",
            option="lr_range",
        )
    if winner["number"] not in best:  # the winner came from the journal: train it again
        best = {winner["number"]: run(config.replace(lr=winner["lr"]))}
    record = {
        "method": config.method,
        "seed": config.seed,
        "range": [lo, hi],
        "n_trials": n_trials,
        "sampler": f"optuna.samplers.TPESampler(seed={config.seed}), lr log-uniform (optuna {optuna.__version__})",
        "objective": "dev score of the selected checkpoint (maximised)",
        "trials": trials,
        "best": {"number": winner["number"], "lr": winner["lr"], "dev": winner["dev"]},
        "config": config.to_dict() | {"lr": None},  # every other setting of the trials
    }
    return record, best[winner["number"]]


def _journal_key(config: TrainConfig, n_trials: int, lr_range: tuple[float, float]) -> dict[str, Any]:
    """What a journal must have been written for to be replayed: the same search of the same run."""
    return {"config": config.to_dict() | {"lr": None}, "n_trials": n_trials, "range": list(lr_range)}


def best_trial(trials: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the best dev score (the first of equal scores, as the search keeps it in memory);
    None if none finished."""
    return max((t for t in trials if t["state"] == "complete"), key=lambda t: t["dev"], default=None)


def journal_path(out_dir: str | os.PathLike[str]) -> Path:
    """Where the search of a run into ``out_dir`` journals its finished trials: a hidden file beside ``out_dir``."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.lr-search-trials.json"


def journal_trials(
    journal: Path | None, config: TrainConfig, n_trials: int, lr_range: tuple[float, float]
) -> dict[int, dict[str, Any]]:
    """The finished trials (``number``, ``lr``, ``dev``, ``state``, ...) of an earlier, interrupted run of this
    search, by number; {} if none, or the journal is another search's or damaged."""
    if journal is None or not journal.is_file():
        return {}
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
        if data["search"] != _journal_key(config, n_trials, lr_range):
            return {}
        return {int(t["number"]): t for t in data["trials"] if t["state"] in ("complete", "diverged")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # damaged or an earlier version's: search again


def _write_journal(
    journal: Path | None,
    config: TrainConfig,
    n_trials: int,
    lr_range: tuple[float, float],
    trials: list[dict[str, Any]],
) -> None:
    """Record the finished trials (atomically: a journal is whole or absent)."""
    if journal is None:
        return
    data = {"search": _journal_key(config, n_trials, lr_range), "trials": trials}
    journal.parent.mkdir(parents=True, exist_ok=True)
    partial = journal.with_name(journal.name + ".partial")
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    partial.replace(journal)

"""Learning-rate search as the paper did it: an Optuna study, TPE, log-uniform rate, each trial scored on dev.

``optuna`` (in the ``train`` extra) is imported only when a search runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from loralens.errors import LoralensError
from loralens.training.config import LR_RANGE, TrainConfig, TrainingDivergedError

__all__ = ["check_lr_range", "parse_lr_range", "search_lr"]

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
        raise LoralensError(f"learning-rate range must be two numbers LO,HI, got {lr_range!r}") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise LoralensError(f"learning-rate range must have 0 < LO < HI, both finite; got {lo:g},{hi:g}")
    return lo, hi


def parse_lr_range(text: str | None) -> tuple[float, float]:
    """``"5e-5,5e-3"`` -> ``(5e-5, 5e-3)``; ``None`` gives the paper's :data:`LR_RANGE`."""
    if text is None:
        return LR_RANGE
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise LoralensError(f"--lr-range takes LO,HI (e.g. 5e-5,5e-3), got {text!r}")
    try:
        return check_lr_range((float(parts[0]), float(parts[1])))
    except ValueError as e:
        if isinstance(e, LoralensError):
            raise
        raise LoralensError(f"--lr-range takes two numbers LO,HI (e.g. 5e-5,5e-3), got {text!r}") from e


def search_lr(
    run: Callable[[TrainConfig], R],
    config: TrainConfig,
    n_trials: int,
    lr_range: tuple[float, float] = LR_RANGE,
) -> tuple[dict[str, Any], R]:
    """Search the learning rate: ``n_trials`` runs ``run(config.replace(lr=...))``, maximising their dev score.

    Optuna study, ``TPESampler(seed=config.seed)``, ``lr`` drawn with ``suggest_float(lo, hi, log=True)``.
    A trial that diverges (:class:`TrainingDivergedError`) is recorded as such and the search goes on.

    Returns ``(record, best)``: ``record`` (what ``lr_search.json`` holds) has ``method``, ``seed``, ``range``,
    ``n_trials``, ``sampler``, ``trials`` (``number``, ``lr``, ``dev``, ``state``, ``selected_step``) and
    ``best`` (``number``, ``lr``, ``dev``); ``best`` is the best trial's own result (only that one is kept).
    Raises LoralensError for a bad ``n_trials`` or range, or when every trial diverged.
    """
    if not (isinstance(n_trials, int) and n_trials >= 1):
        raise LoralensError(f"the learning-rate search needs at least 1 trial, got {n_trials!r}")
    lo, hi = check_lr_range(lr_range)
    try:
        import optuna
    except ImportError as e:
        raise LoralensError(f"--lr-search needs optuna ({e}); install it with `pip install loralens[train]`") from e

    trials: list[dict[str, Any]] = []
    best: list[R] = []

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        record: dict[str, Any] = {"number": trial.number, "lr": lr, "dev": None, "state": "diverged"}
        trials.append(record)
        try:
            result = run(config.replace(lr=lr))
        except TrainingDivergedError as e:
            record["error"] = str(e)
            logger.info("trial %d: lr %.3g diverged", trial.number, lr)
            raise optuna.TrialPruned(str(e)) from e
        record.update(dev=result.dev_score, state="complete", selected_step=getattr(result, "selected_step", None))
        logger.info("trial %d: lr %.3g dev %.4f", trial.number, lr, result.dev_score)
        if not best or result.dev_score > best[0].dev_score:
            best[:] = [result]  # keep only the best trial's model in memory
        return result.dev_score

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial goes through our logger instead
    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
        study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not best:
        raise TrainingDivergedError(
            f"{config.method}: all {n_trials} learning-rate trials in [{lo:g}, {hi:g}] diverged; "
            "try a lower --lr-range; nothing was written"
        )
    winner = next(t for t in trials if t["state"] == "complete" and t["dev"] == best[0].dev_score)
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
    return record, best[0]

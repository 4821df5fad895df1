"""LoRA against CondLoRA over training seeds: the paper's Table 2 protocol, from the runs' ``metrics.json``.

``loralens train`` (and :func:`loralens.training.train_adapter`) writes, beside every adapter, a ``metrics.json``
with the held-out score before and after training, the seed, the settings and the training speed.
:func:`compare_seeds` pairs the LoRA and CondLoRA runs of each task by seed and gives per method the mean and
sample standard deviation of the held-out score, and the paired t-test of CondLoRA against LoRA over seeds
(``scipy.stats.ttest_rel``, two-sided), as the paper reports it.

    >>> from loralens import examples
    >>> pairs = examples.default_adapters()  # (seed, LoRA folder, CondLoRA folder) for seeds 0, 1, 2
    >>> runs = runs_from_folders([lo for _, lo, _ in pairs], [c for _, _, c in pairs])
    >>> compare_seeds(runs)["tasks"]["rt-polarity"]["paired_t"]["p_value"]

Neither prints nor writes files; :func:`loralens.render.tables.table2` renders the result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loralens.errors import CheckpointError, InputPathError, LoralensError
from loralens.io.files import read_json

__all__ = [
    "METHODS",
    "PAIRED_TEST",
    "DamagedMetricsError",
    "compare_seeds",
    "metric_value",
    "read_metrics",
    "runs_from_folders",
    "table2_from_folders",
    "training_speeds",
]

#: The two methods compared, in table order.
METHODS = ("lora", "condlora")

#: How the paired test is computed (recorded with its result).
PAIRED_TEST = "scipy.stats.ttest_rel(condlora, lora), two-sided, pairs = seeds"

# Scores are accuracies or correlations in [-1, 1]: paired differences whose spread is below this are equal.
_CONSTANT_DIFFERENCE = 1e-9

# settings that must agree between the paired runs of one task (everything but the method's own type and seed)
_SHARED_SETTINGS = ("r", "lora_alpha", "target_modules", "steps", "lr", "batch_size", "max_length", "split_seed")


_RESTORE = "retrain the adapter or restore the file"


class DamagedMetricsError(CheckpointError):
    """A ``metrics.json`` that is there but cannot be used: unreadable, or a score, speed or seed that is not a
    finite number. Unlike a missing file or runs that do not pair, this is an error, not a note under Table 3."""


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of a trained adapter folder, checked for the fields :func:`compare_seeds` uses."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise InputPathError(f"{path}: not found; compare_seeds needs the metrics.json that 'loralens train' writes")
    metrics = _read_metrics_json(path)
    fields = ("task", "method", "metric", "seed", "after", "settings")
    missing = [k for k in fields if k not in metrics]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; it is not a loralens metrics.json")
    seed = metrics["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DamagedMetricsError(f"{path}: 'seed' is {seed!r}, not an integer; {_RESTORE}")
    metric_value(metrics, "after", path, optional=False)
    for key in ("before", "examples_per_s", "trainable_params"):
        metric_value(metrics, key, path)
    return metrics


def _read_metrics_json(path: Path) -> dict[str, Any]:
    """``path`` parsed; a file that is there but not readable JSON is a :class:`DamagedMetricsError`."""
    try:
        return read_json(path)
    except CheckpointError as e:
        # the reader's own advice ("fix or re-save the file") gives way to the one that fits a run's metrics
        detail = str(e).removeprefix(f"{path}: ").removesuffix("; fix or re-save the file")
        raise DamagedMetricsError(f"{path}: {detail}; {_RESTORE}") from e


def metric_value(metrics: Mapping[str, Any], key: str, path: Path, *, optional: bool = True) -> float | None:
    """``metrics[key]`` of the ``metrics.json`` at ``path`` as a finite number; None when it is absent or null and
    ``optional``. Raises :class:`DamagedMetricsError` naming the file and key for NaN, Infinity, text and the like."""
    value = metrics.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DamagedMetricsError(f"{path}: {key!r} is {value!r}, not a finite number; {_RESTORE}")
    return float(value)


def runs_from_folders(
    lora: Sequence[str | Path], condlora: Sequence[str | Path]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{task: {"lora": [metrics], "condlora": [metrics]}}`` from trained adapter folders, for :func:`compare_seeds`.

    Every folder needs its ``metrics.json`` (``loralens train`` writes it); runs are grouped by their task.
    """
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for method, folders in (("lora", lora), ("condlora", condlora)):
        for folder in folders:
            m = read_metrics(folder)
            if m["method"] != method:
                raise LoralensError(
                    f"{Path(folder) / 'metrics.json'}: a {m['method']} run given as {method}; swap the folders"
                )
            runs.setdefault(m["task"], {k: [] for k in METHODS})[method].append(m)
    return runs


def table2_from_folders(lora: Sequence[str | Path], condlora: Sequence[str | Path]) -> dict[str, Any]:
    """``{"table2": compare_seeds(...)}`` from the adapter folders' ``metrics.json``, or ``{"table2": None,
    "table2_note": why}`` when the folders do not make one (no metrics.json, runs that do not pair): Table 3
    stands without it. A ``metrics.json`` that is there but damaged (NaN, text, invalid JSON) raises
    :class:`DamagedMetricsError`."""
    try:
        return {"table2": compare_seeds(runs_from_folders(lora, condlora))}
    except DamagedMetricsError:
        raise
    except LoralensError as e:
        return {"table2": None, "table2_note": f"no Table 2: {e}"}


def training_speeds(lora: Sequence[str | Path], condlora: Sequence[str | Path]) -> dict[str, float]:
    """Training examples/s recorded in the adapter folders' ``metrics.json`` (``loralens train`` writes it): the
    mean per method (``"lora"``, ``"condlora"``) over the folders that have one; a method without any is left out.

    Any ``metrics.json`` with an ``examples_per_s`` counts (not only loralens's own). Only a missing file is
    skipped: one that cannot be read, or whose speed is not a finite number (NaN, Infinity, text), raises
    :class:`DamagedMetricsError` naming it.
    """
    speeds = {}
    for method, folders in (("lora", lora), ("condlora", condlora)):
        values = []
        for folder in folders:
            path = Path(folder) / "metrics.json"
            if not path.exists():
                continue
            value = metric_value(_read_metrics_json(path), "examples_per_s", path)
            if value is not None:
                values.append(value)
        if values:
            speeds[method] = sum(values) / len(values)
    return speeds


def compare_seeds(runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> dict[str, Any]:
    """Mean, sample standard deviation and the paired t-test of CondLoRA against LoRA, per task.

    Parameters
    ----------
    runs : mapping
        ``{task: {"lora": [metrics, ...], "condlora": [metrics, ...]}}``, one ``metrics.json`` dict per seed
        (:func:`read_metrics`); runs are paired by their ``seed``, which must be the same set for both methods.

    Returns
    -------
    dict
        ``{"tasks": {task: {"metric", "seeds", "scores": {method: [per seed]}, "before", "mean", "std",
        "paired_t": {"statistic", "p_value", "test"}, "trainable_params", "examples_per_s", "settings"}},
        "average": {method: mean over tasks}}``. ``std`` and the test are ``None`` with fewer than two seeds,
        and the test is ``None`` where it is undefined (the same difference on every seed).

    Raises
    ------
    LoralensError
        A method missing, seeds that do not pair, runs of another task, or settings that differ between the
        paired runs (other than the method).
    """
    from scipy import stats  # only here: scipy.stats costs a second at import

    tasks: dict[str, Any] = {}
    for task, by_method in runs.items():
        paired = _paired(task, by_method)
        seeds = sorted(paired["lora"])
        scores = {m: [float(paired[m][s]["after"]) for s in seeds] for m in METHODS}
        diffs = [c - lo for c, lo in zip(scores["condlora"], scores["lora"], strict=True)]
        # equal differences on every seed (to rounding): t is infinite or 0/0, not a finding
        if len(seeds) > 1 and (_sample_std(diffs) or 0.0) > _CONSTANT_DIFFERENCE:
            test = stats.ttest_rel(scores["condlora"], scores["lora"])
            statistic, p_value = _finite(test.statistic), _finite(test.pvalue)
        else:
            statistic = p_value = None
        first = paired["lora"][seeds[0]]
        tasks[task] = {
            "metric": first["metric"],
            "seeds": seeds,
            "scores": scores,
            "before": {m: [_finite(paired[m][s].get("before")) for s in seeds] for m in METHODS},
            "mean": {m: statistics.fmean(scores[m]) for m in METHODS},
            "std": {m: _sample_std(scores[m]) for m in METHODS},
            "paired_t": {"statistic": statistic, "p_value": p_value, "test": PAIRED_TEST},
            "trainable_params": {m: paired[m][seeds[0]].get("trainable_params") for m in METHODS},
            "examples_per_s": {m: _mean([paired[m][s].get("examples_per_s") for s in seeds]) for m in METHODS},
            "settings": {k: first["settings"].get(k) for k in _SHARED_SETTINGS if k in first["settings"]},
        }
    if not tasks:
        raise LoralensError("compare_seeds got no runs; pass {task: {'lora': [...], 'condlora': [...]}}")
    average = {m: statistics.fmean(t["mean"][m] for t in tasks.values()) for m in METHODS}
    return {"tasks": tasks, "average": average}


def _paired(task: str, by_method: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[int, Mapping]]:
    """``{method: {seed: metrics}}`` after checking that the runs pair up."""
    out: dict[str, dict[int, Mapping]] = {}
    for method in METHODS:
        runs = by_method.get(method) or []
        if not runs:
            raise LoralensError(f"task {task!r}: no {method} runs; Table 2 pairs LoRA and CondLoRA runs by seed")
        out[method] = {}
        for m in runs:
            if m.get("task") != task or m.get("method") != method:
                raise LoralensError(
                    f"task {task!r}, {method}: got a run of task {m.get('task')!r}, method {m.get('method')!r}"
                )
            if m["seed"] in out[method]:
                raise LoralensError(f"task {task!r}, {method}: seed {m['seed']} appears twice")
            out[method][m["seed"]] = m
    if set(out["lora"]) != set(out["condlora"]):
        raise LoralensError(
            f"task {task!r}: LoRA seeds {sorted(out['lora'])} and CondLoRA seeds {sorted(out['condlora'])} "
            "do not pair; train both methods with the same seeds"
        )
    for seed, lora in out["lora"].items():
        cond = out["condlora"][seed]
        differ = [k for k in _SHARED_SETTINGS if lora["settings"].get(k) != cond["settings"].get(k)]
        if differ:
            raise LoralensError(
                f"task {task!r}, seed {seed}: LoRA and CondLoRA were trained with different {', '.join(differ)}; "
                "Table 2 compares runs of one loop and one set of hyperparameters"
            )
    return out


def _sample_std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    return statistics.stdev(values)


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def _finite(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)

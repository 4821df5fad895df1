"""Table 2 over seeds: mean, sample std and the paired t-test, on the shipped runs and on edge cases."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from loralens import examples
from loralens.analyses.seeds import (
    DamagedMetricsError,
    compare_seeds,
    read_metrics,
    runs_from_folders,
    table2_from_folders,
    training_speeds,
)
from loralens.errors import CheckpointError, InputPathError, LoralensError


def _run(method: str, seed: int, after: float, task: str = "rt-polarity", **settings: Any) -> dict[str, Any]:
    base = {"r": 8, "lora_alpha": 8, "target_modules": ["query", "value"], "steps": 200, "lr": 2e-3}
    return {
        "task": task,
        "method": method,
        "metric": "accuracy",
        "seed": seed,
        "before": 0.5,
        "after": after,
        "examples_per_s": 40.0 + seed,
        "trainable_params": 73728 if method == "lora" else 12288,
        "settings": {**base, **settings},
    }


def test_shipped_seeds_against_a_hand_computed_paired_t_test() -> None:
    """The three shipped seeds of each method: numbers against numpy and the t distribution, by hand."""
    runs = {
        "rt-polarity": {
            "lora": [read_metrics(lora) for _, lora, _ in examples.default_adapters()],
            "condlora": [read_metrics(cond) for _, _, cond in examples.default_adapters()],
        }
    }
    t = compare_seeds(runs)["tasks"]["rt-polarity"]
    assert t["seeds"] == list(examples.SEEDS)
    lora = np.array([m["after"] for m in runs["rt-polarity"]["lora"]], dtype=np.float64)
    cond = np.array([m["after"] for m in runs["rt-polarity"]["condlora"]], dtype=np.float64)
    assert t["mean"]["lora"] == pytest.approx(lora.mean(), abs=1e-15)
    assert t["std"]["condlora"] == pytest.approx(cond.std(ddof=1), rel=1e-12)
    diff = cond - lora
    t_hand = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    p_hand = 2 * stats.t.sf(abs(t_hand), df=len(diff) - 1)
    assert t["paired_t"]["statistic"] == pytest.approx(t_hand, rel=1e-10)
    assert t["paired_t"]["p_value"] == pytest.approx(p_hand, rel=1e-8)
    assert t["trainable_params"] == {"lora": 73728, "condlora": 12288}
    # every shipped pair was trained by one loop with one set of hyperparameters and really learned
    for m in (*runs["rt-polarity"]["lora"], *runs["rt-polarity"]["condlora"]):
        assert m["after"] > m["majority_baseline"] > m["before"] - 0.2


def test_runs_pair_by_seed_not_by_order() -> None:
    lora = [_run("lora", s, a) for s, a in ((0, 0.80), (1, 0.78), (2, 0.76))]
    cond = [_run("condlora", s, a) for s, a in ((2, 0.70), (0, 0.75), (1, 0.74))]
    t = compare_seeds({"rt-polarity": {"lora": lora, "condlora": cond}})["tasks"]["rt-polarity"]
    assert t["scores"] == {"lora": [0.80, 0.78, 0.76], "condlora": [0.75, 0.74, 0.70]}
    ref = stats.ttest_rel([0.75, 0.74, 0.70], [0.80, 0.78, 0.76])
    assert t["paired_t"]["statistic"] == pytest.approx(float(ref.statistic), rel=1e-12)


def test_one_seed_has_no_spread_and_no_test() -> None:
    s = compare_seeds({"rt-polarity": {"lora": [_run("lora", 0, 0.8)], "condlora": [_run("condlora", 0, 0.7)]}})
    t = s["tasks"]["rt-polarity"]
    assert t["std"] == {"lora": None, "condlora": None}
    assert t["paired_t"]["statistic"] is None and t["paired_t"]["p_value"] is None
    assert s["average"] == {"lora": 0.8, "condlora": 0.7}


def test_identical_differences_give_no_test_rather_than_nan() -> None:
    lora = [_run("lora", s, 0.8 - s / 100) for s in range(3)]
    cond = [_run("condlora", s, 0.7 - s / 100) for s in range(3)]
    t = compare_seeds({"rt-polarity": {"lora": lora, "condlora": cond}})["tasks"]["rt-polarity"]
    assert t["paired_t"]["statistic"] is None and t["paired_t"]["p_value"] is None
    json.dumps(t, allow_nan=False)  # JSON-ready: no NaN anywhere


@pytest.mark.parametrize(
    ("lora", "cond", "message"),
    [
        ([_run("lora", 0, 0.8)], [], "no condlora runs"),
        ([_run("lora", 0, 0.8)], [_run("condlora", 1, 0.7)], "do not pair"),
        ([_run("lora", 0, 0.8)], [_run("condlora", 0, 0.7, lr=1e-3)], "different lr"),
        ([_run("lora", 0, 0.8)], [_run("lora", 0, 0.7)], "method 'lora'"),
        ([_run("lora", 0, 0.8), _run("lora", 0, 0.8)], [_run("condlora", 0, 0.7)], "seed 0 appears twice"),
        ([_run("lora", 0, 0.8, task="vader-rating")], [_run("condlora", 0, 0.7)], "task 'vader-rating'"),
    ],
)
def test_runs_that_do_not_pair_are_refused(lora: list, cond: list, message: str) -> None:
    with pytest.raises(LoralensError, match=message):
        compare_seeds({"rt-polarity": {"lora": lora, "condlora": cond}})


def test_read_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputPathError, match=r"metrics\.json: not found"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"metrics\.json: invalid JSON \(.*\); retrain the adapter or restore"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text('{"task": "rt-polarity"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="lacks method"):
        read_metrics(tmp_path)


def test_runs_from_the_shipped_folders() -> None:
    pairs = examples.default_adapters()
    runs = runs_from_folders([lo for _, lo, _ in pairs], [c for _, _, c in pairs])
    assert list(runs) == ["rt-polarity"]
    assert [m["seed"] for m in runs["rt-polarity"]["condlora"]] == list(examples.SEEDS)
    with pytest.raises(LoralensError, match="a lora run given as condlora; swap the folders"):
        runs_from_folders([pairs[0][1]], [pairs[0][1]])


def test_table2_from_folders_is_a_note_when_the_folders_make_none(tmp_path: Path) -> None:
    pairs = examples.default_adapters()
    lora, cond = [lo for _, lo, _ in pairs], [c for _, _, c in pairs]
    table = table2_from_folders(lora, cond)
    assert table == {"table2": compare_seeds(runs_from_folders(lora, cond))}
    note = table2_from_folders([tmp_path], [tmp_path])  # no metrics.json: Table 3 stands without Table 2
    assert (
        note["table2"] is None and note["table2_note"].startswith("no Table 2: ") and "not found" in note["table2_note"]
    )
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DamagedMetricsError, match="invalid JSON"):
        table2_from_folders([tmp_path], [tmp_path])


def test_training_speeds_skip_only_a_missing_file(tmp_path: Path) -> None:
    fast, slow, none, damaged = (tmp_path / name for name in ("fast", "slow", "none", "damaged"))
    for folder in (fast, slow, none, damaged):
        folder.mkdir()
    (fast / "metrics.json").write_text(json.dumps({"examples_per_s": 30.0}), encoding="utf-8")
    (slow / "metrics.json").write_text(json.dumps({"examples_per_s": 10, "other": "any metrics.json counts"}))
    assert training_speeds([fast, slow, none], [none]) == {"lora": 20.0}  # no file: left out; no speeds: no key
    (damaged / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DamagedMetricsError, match=r"damaged[/\\]metrics\.json: invalid JSON"):
        training_speeds([fast], [damaged])
    (damaged / "metrics.json").write_text('{"examples_per_s": NaN}', encoding="utf-8")
    with pytest.raises(DamagedMetricsError, match="'examples_per_s' is nan, not a finite number"):
        training_speeds([damaged], [])

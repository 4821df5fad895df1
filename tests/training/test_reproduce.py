"""``loralens reproduce table2``: search on the first seed, the other seeds at the chosen rate, resume, the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clitools import record_progress, run_cli
from loralens.cli import reproduce as cli_reproduce
from loralens.errors import LoralensError
from loralens.io.outputs import json_writer, write_outputs
from loralens.training import TrainConfig
from loralens.training import table2 as t2

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stand-in for the trainer (the loop is tested on its own): writes a run folder as ``train`` does."""
    calls: list[dict[str, Any]] = []

    def train(base_path, task, config: TrainConfig, *, out_dir, base_name, lr_search, lr_range, on_step, replace):
        for step in (1, 2):
            if on_step is not None:
                on_step(step, 2, 0.5)
        lr = 1e-4 if config.method == "condlora" else 1e-3  # what the "search" picks
        lr = lr if lr_search else config.lr
        calls.append({"task": task, "method": config.method, "seed": config.seed, "lr_search": lr_search, "lr": lr})
        config = config.replace(lr=lr)
        after = 0.6 + 0.1 * (config.method == "lora") + 0.01 * config.seed**2
        settings = {"r": 8, "lora_alpha": 8, "target_modules": list(config.targets), "steps": config.steps}
        settings |= {"lr": lr, "batch_size": 16, "max_length": config.max_length, "split_seed": 0}
        metrics = {
            "task": task, "method": config.method, "metric": "pearson", "seed": config.seed, "after": after,
            "before": 0.1, "settings": settings, "config": config.to_dict(), "base": base_name, "dev_best": after,
            "trainable_params": 1, "examples_per_s": 1.0,
        }  # fmt: skip
        files = {"metrics.json": json_writer(metrics)}
        if lr_search:
            files["lr_search.json"] = json_writer({"n_trials": lr_search, "range": list(lr_range)})
        write_outputs(Path(out_dir), files, replace=replace)
        return metrics

    monkeypatch.setattr(t2, "train", train)
    return calls


def test_search_on_the_first_seed_then_the_chosen_rate_and_resume(tmp_path: Path, fake_train) -> None:
    kwargs: dict[str, Any] = dict(tasks=["vader-rating"], seeds=[0, 1, 2], lr_search=3, base_name="test/minilm")
    summary = t2.reproduce_table2("base", tmp_path, **kwargs)
    assert [(c["method"], c["seed"], c["lr_search"], c["lr"]) for c in fake_train] == [
        ("lora", 0, 3, 1e-3), ("lora", 1, 0, 1e-3), ("lora", 2, 0, 1e-3),
        ("condlora", 0, 3, 1e-4), ("condlora", 1, 0, 1e-4), ("condlora", 2, 0, 1e-4),
    ]  # fmt: skip
    assert summary["rates"]["vader-rating"]["condlora"]["lr"] == 1e-4
    task = summary["tasks"]["vader-rating"]
    assert task["scores"]["lora"] == pytest.approx([0.7, 0.71, 0.74])
    assert task["paired_t"]["p_value"] is None  # the same difference on every seed: no test
    written = json.loads((tmp_path / "table" / "table2.json").read_text())
    assert written["rates"] == summary["rates"] and written["base"] == "test/minilm"
    text = (tmp_path / "table" / "table2.md").read_text()
    assert "Table 2" in text and "Learning rates chosen on dev" in text and "0.0001" in text
    assert (tmp_path / "runs" / "vader-rating" / "condlora-seed0" / "lr_search.json").is_file()

    fake_train.clear()
    again = t2.reproduce_table2("base", tmp_path, **kwargs)  # everything finished: nothing trains
    assert fake_train == [] and again["tasks"] == summary["tasks"]

    (tmp_path / "runs" / "vader-rating" / "lora-seed2" / "metrics.json").unlink()  # an interrupted run
    t2.reproduce_table2("base", tmp_path, **kwargs)
    assert [(c["method"], c["seed"]) for c in fake_train] == [("lora", 2)]

    fake_train.clear()
    t2.reproduce_table2("base", tmp_path, **(kwargs | {"lr_search": 4}))  # another search: the searches rerun
    assert [(c["method"], c["seed"]) for c in fake_train] == [("lora", 0), ("condlora", 0)]  # same rates: kept


def test_without_search_every_run_uses_the_given_rate(tmp_path: Path, fake_train) -> None:
    config = TrainConfig(lr=7e-4)
    summary = t2.reproduce_table2("base", tmp_path, tasks=["vader-rating"], seeds=[0, 1], lr_search=0, config=config)
    assert {c["lr"] for c in fake_train} == {7e-4} and {c["lr_search"] for c in fake_train} == {0}
    assert "Learning rates (given, not searched)" in summary["markdown"]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(LoralensError, match="Table 2 tasks are"):
        t2.reproduce_table2("base", tmp_path, tasks=["mnli"])
    with pytest.raises(LoralensError, match="seeds must be distinct"):
        t2.reproduce_table2("base", tmp_path, seeds=[0, 0])
    assert t2.parse_per_task("rt-polarity=1000", t2.DEFAULT_STEPS, "--steps") == {
        "rt-polarity": 1000, "vader-rating": 300,
    }  # fmt: skip
    with pytest.raises(LoralensError, match="--steps takes TASK=N"):
        t2.parse_per_task("mnli=3", t2.DEFAULT_STEPS, "--steps")
    with pytest.raises(LoralensError, match="--seeds takes comma-separated integers"):
        t2.parse_int_list("0,a", "--seeds")
    assert not list(tmp_path.iterdir())


def test_the_command_shows_runs_and_steps(
    minilm_path: Path, tmp_path: Path, fake_train, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command reports how many runs have started and the running one's steps; every run is named."""
    record = record_progress(monkeypatch, cli_reproduce)
    args = ["reproduce", "table2", "--base", minilm_path, "--tasks", "vader-rating", "--seeds", "0,1"]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("training") == 4
    runs = [(done, total) for stage, done, total in record.calls if stage == "Table 2 runs"]
    assert sorted(set(runs)) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    steps = [call for call in record.calls if call[0].startswith("run: ")]
    first = "run: vader-rating lora-seed0, loss 0.5000"
    assert steps[:2] == [(first, 1, 2), (first, 2, 2)]
    assert steps[-1] == ("run: vader-rating condlora-seed1, loss 0.5000", 2, 2)

    assert run_cli(*args, "--out", tmp_path / "quiet", "--quiet").returncode == 0
    assert record.quiet_flags == [False, True]


@pytest.mark.slow
def test_reproduce_command_end_to_end(minilm_path: Path, tmp_path: Path) -> None:
    """The real command on MiniLM: one task, two seeds, a two-trial search, two steps per run."""
    args = ["reproduce", "table2", "--base", str(minilm_path), "--tasks", "vader-rating", "--seeds", "0,1"]
    args += ["--lr-search", "2", "--steps", "vader-rating=2", "--max-length", "vader-rating=8", "--out", str(tmp_path)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Table 2" in result.stdout and "Learning rates chosen on dev" in result.stdout
    summary = json.loads((tmp_path / "table" / "table2.json").read_text())
    rates = summary["rates"]["vader-rating"]
    for method in ("lora", "condlora"):
        search = json.loads((tmp_path / "runs" / "vader-rating" / f"{method}-seed0" / "lr_search.json").read_text())
        assert rates[method]["lr"] == search["best"]["lr"]
        seed1 = json.loads((tmp_path / "runs" / "vader-rating" / f"{method}-seed1" / "metrics.json").read_text())
        assert seed1["settings"]["lr"] == rates[method]["lr"]
    rerun = run_cli(*args)
    assert rerun.returncode == 0 and rerun.stderr.count("reusing") == 4 and "training" not in rerun.stderr

"""``loralens reproduce table2``: search on the first seed, the other seeds at the chosen rate, resume, the table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from clitools import record_progress, run_cli
from loralens.cli import reproduce as cli_reproduce
from loralens.errors import LoralensError
from loralens.io.outputs import json_writer, write_outputs
from loralens.training import TrainConfig
from loralens.training import table2 as t2
from loralens.training.resume import FitState, fit_state_path, write_fit_state
from loralens.training.search import journal_path, search_lr

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

    quiet = run_cli(*args, "--out", tmp_path / "quiet", "--quiet", "--json")  # --json: what table2.json holds
    assert quiet.returncode == 0 and record.quiet_flags == [False, True]
    assert json.loads(quiet.stdout) == json.loads((tmp_path / "quiet" / "table" / "table2.json").read_text())


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


def test_status_says_where_each_run_stands(minilm_path: Path, tmp_path: Path, fake_train) -> None:
    """Finished runs, a search cut after two trials with a third in flight, a later seed cut short, from the files
    the real writers leave (the search's journal, the runs' saved states); trains nothing."""
    kwargs: dict[str, Any] = dict(tasks=["vader-rating"], seeds=[0, 1], lr_search=3, base_name="test/minilm")
    assert [(r["method"], r["seed"], r["state"]) for r in t2.table2_status(tmp_path, **kwargs)] == [
        ("lora", 0, "to do"), ("lora", 1, "waiting"), ("condlora", 0, "to do"), ("condlora", 1, "waiting"),
    ]  # fmt: skip

    first = TrainConfig(method="lora", steps=t2.DEFAULT_STEPS["vader-rating"], max_length=16, seed=0)
    folder = tmp_path / "runs" / "vader-rating" / "lora-seed0"
    scores = iter([0.5, 0.7])

    def run(config: TrainConfig) -> Any:
        score = next(scores, None)
        if score is None:
            raise KeyboardInterrupt  # the session ends during the third trial
        return SimpleNamespace(config=config, dev_score=score, selected_step=100)

    with pytest.raises(KeyboardInterrupt):
        search_lr(run, first, 3, journal=journal_path(folder))
    trials = json.loads(journal_path(folder).read_text())["trials"]
    for config, step in [(first.replace(lr=3e-4), 120), (first.replace(lr=1e-4), 300), (first.replace(seed=5), 80)]:
        state = FitState(config, step, params={}, optimizer={}, scheduler={}, rng=torch.get_rng_state())
        write_fit_state(fit_state_path(folder, config), state)  # in flight; a finished trial's; another run's
    (folder.parent / f".{folder.name}.fit-000000000000.pt").write_bytes(b"cut sho")  # a damaged one: passed over
    row = t2.table2_status(tmp_path, **kwargs)[0]
    assert row["state"] == "searching" and (row["trials"], row["n_trials"]) == (2, 3)
    assert (row["lr"], row["dev"]) == (trials[1]["lr"], 0.7)
    assert (row["step"], row["steps"], row["step_lr"]) == (120, first.steps, 3e-4)

    t2.reproduce_table2("base", tmp_path, **kwargs)
    (tmp_path / "runs" / "vader-rating" / "condlora-seed1" / "metrics.json").unlink()  # cut short after step 60
    cut = first.replace(method="condlora", seed=1, lr=1e-4)  # at the rate condlora-seed0's search chose
    state = FitState(cut, 60, params={}, optimizer={}, scheduler={}, rng=torch.get_rng_state())
    write_fit_state(fit_state_path(tmp_path / "runs" / "vader-rating" / "condlora-seed1", cut), state)
    rows = t2.table2_status(tmp_path, **kwargs)
    metrics = json.loads((tmp_path / "runs" / "vader-rating" / "lora-seed1" / "metrics.json").read_text())
    assert (rows[1]["state"], rows[1]["lr"], rows[1]["dev"], rows[1]["test"]) == ("done", 1e-3, 0.71, 0.71)
    assert metrics["after"] == rows[1]["test"]
    assert (rows[3]["state"], rows[3]["step"]) == ("to do", 60)

    fake_train.clear()
    args = ["reproduce", "table2", "--base", minilm_path, "--tasks", "vader-rating", "--seeds", "0,1"]
    shown = run_cli(*args, "--lr-search", "3", "--base-name", "test/minilm", "--out", tmp_path, "--status")
    assert shown.returncode == 0 and fake_train == [], shown.stderr
    assert "Table 2 reproduction: where it stands" in shown.stdout and "last saved at step 60 of 300" in shown.stdout

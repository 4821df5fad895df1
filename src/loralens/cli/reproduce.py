"""``loralens reproduce table2``: the paper's Table 2 end to end (learning-rate search, seeds, paired t-test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from loralens.analyses.engine import ProgressCallback
from loralens.cli._app import JsonOpt, QuietOpt, app, print_table, progress_bar, user_errors

reproduce_app = typer.Typer(help="Reproduce a table of the paper from scratch (resumable).", no_args_is_help=True)
app.add_typer(
    reproduce_app,
    name="reproduce",
    rich_help_panel="Training",
    short_help="Reproduce the paper's Table 2 from scratch (resumable).",
)


@reproduce_app.command("table2")
def table2_command(
    base: Annotated[str, typer.Option("--base", help="Model folder, installed model package or cached hub name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for runs/ and table/; rerun it to resume.")],
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated tasks.")] = "rt-polarity,vader-rating",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated training seeds.")] = "0,1,2",
    lr_search: Annotated[int, typer.Option("--lr-search", min=0, help="Optuna trials per method and task.")] = 5,
    lr_range: Annotated[str | None, typer.Option("--lr-range", help="LO,HI (default 5e-5,5e-3).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Rate of every run when --lr-search is 0.")] = 2e-3,
    steps: Annotated[
        str | None, typer.Option("--steps", help="TASK=N,... (default rt-polarity=200,vader-rating=300).")
    ] = None,
    max_length: Annotated[
        str | None, typer.Option("--max-length", help="TASK=N,... (default rt-polarity=64,vader-rating=16).")
    ] = None,
    targets: Annotated[str, typer.Option("--targets", help="Comma-separated target modules.")] = "query,value",
    base_name: Annotated[str | None, typer.Option("--base-name", help="Name recorded in the adapters.")] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Show where the runs stand and exit; trains nothing.")
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """LoRA and CondLoRA per task and seed with the paper's protocol; Table 2 (mean ± std on test, paired t-test)."""
    from loralens.io.base_weights import resolve_base
    from loralens.io.outputs import json_text
    from loralens.render.tables import table2_status_table
    from loralens.training import TrainConfig
    from loralens.training import table2 as t2
    from loralens.training.config import METHODS
    from loralens.training.search import parse_lr_range

    with user_errors():
        config = TrainConfig(lr=lr, targets=tuple(t.strip() for t in targets.split(",") if t.strip()))
        task_list, seed_list = [t.strip() for t in tasks.split(",") if t.strip()], t2.parse_int_list(seeds, "--seeds")
        settings: dict[str, Any] = dict(
            tasks=task_list, seeds=seed_list, lr_search=lr_search, lr_range=parse_lr_range(lr_range), config=config,
            steps=t2.parse_per_task(steps, t2.DEFAULT_STEPS, "--steps"), base_name=base_name or base,
            max_length=t2.parse_per_task(max_length, t2.DEFAULT_MAX_LENGTH, "--max-length"),
        )  # fmt: skip
        if status:
            runs = t2.table2_status(out, **settings)
            if json_output:
                typer.echo(json_text({"runs": runs}), nl=False)
            else:
                print_table(table2_status_table(runs))
            return
        with progress_bar(quiet) as progress:  # closed before the table is printed
            on_run, on_step = _run_progress(progress, len(task_list) * len(METHODS) * len(seed_list))
            summary = t2.reproduce_table2(resolve_base(base), out, on_run=on_run, on_step=on_step, **settings)
        if json_output:  # what table/table2.json holds
            typer.echo(json_text({k: v for k, v in summary.items() if k != "markdown"}), nl=False)
            return
        typer.echo(summary["markdown"], nl=False)
        typer.echo(f"written: {out / 'table' / 'table2.md'}, {out / 'table' / 'table2.json'}")


def _run_progress(
    progress: ProgressCallback | None, runs: int
) -> tuple[Callable[[str, bool], None], Callable[[int, int, float], None]]:
    """``on_run`` naming each run on stderr as it starts, and ``on_step`` drawing the runs started of ``runs`` and
    the running one's steps (a search's trials each run from step 1)."""
    started: list[str] = []

    def on_run(folder: str, reused: bool) -> None:
        typer.echo(f"{'reusing' if reused else 'training'} {folder}", err=True)
        started.append(f"{Path(folder).parent.name} {Path(folder).name}")

    def on_step(step: int, total: int, loss: float) -> None:
        if progress is not None:
            progress("Table 2 runs", len(started) - 1, runs)
            progress(f"run: {started[-1]}, loss {loss:.4f}", step, total)

    return on_run, on_step

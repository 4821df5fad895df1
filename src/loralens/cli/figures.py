"""``loralens figure`` and ``loralens report``: Figure-1 pictures and a self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from loralens.analyses.similarity import adapter_similarity
from loralens.cli._app import (
    DPI,
    AdapterOpt,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    FinetunedOpt,
    FinetunedRankOpt,
    ForceOpt,
    LayerBatchOpt,
    ModulesOpt,
    QuietOpt,
    SideChoice,
    app,
    load_inputs,
    parse_modules,
    progress_bar,
    torch_dtype,
    user_errors,
)
from loralens.core.similarity import Side
from loralens.io.adapters import load_lora_adapter
from loralens.io.condlora import load_condlora_adapter
from loralens.io.outputs import check_output_folder, write_outputs

OutOpt = Annotated[
    Path,
    typer.Option(
        "--out", help="Output folder, written whole or not at all; an existing one is refused unless --force."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random Gaussian baseline.")]
DpiOpt = Annotated[int, typer.Option("--dpi", min=72, max=600, help="Resolution of the PNG files.")]


@app.command(rich_help_panel="Report", short_help="Figure 1 heatmaps as PNG/SVG, with every phi value as CSV.")
def figure(
    out: OutOpt,
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    i: Annotated[
        int | None, typer.Option("--i", min=1, help="Subspace dimension. Default: r.", show_default=False)
    ] = None,
    j: Annotated[
        int | None, typer.Option("--j", min=1, help="Second subspace dimension. Default: i.", show_default=False)
    ] = None,
    side: Annotated[SideChoice, typer.Option("--side", help="Left or right singular vectors.")] = SideChoice.left,
    seed: SeedOpt = 0,
    null_draws: Annotated[
        int,
        typer.Option(
            "--null-draws",
            help="Draws of Figure 1's W-conditioned null W^-1 R (R Gaussian, solved with the same LU as the "
            "adapter's factors); 0 leaves it out.",
        ),
    ] = 20,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Figure 1 of the paper: per module and factor (A, B, BA), the layer x layer phi heatmap of the conversion
    matrices beside the same for random Gaussian matrices, on one 0..1 colour scale (--null-draws: the
    W-conditioned null's draws, 0 leaves it out).

    Writes figure1_<module>_<factor>.png and .svg, and every phi value in phi_matrices.csv.
    """
    from loralens.render.report import figure_files

    with user_errors():
        check_output_folder(out, replace=force, inputs=[adapter, finetuned, base])
        names = parse_modules(modules)
        base_ckpt, lora = load_inputs(base, adapter, finetuned, finetuned_rank, device, names)
        with progress_bar(quiet) as progress:
            (sim,) = adapter_similarity(
                base_ckpt, [lora], modules=names, i=i, j=j, side=cast(Side, side.value), seed=seed, device=device,
                dtype=torch_dtype(dtype), layer_batch=layer_batch, null_draws=null_draws, progress=progress,
            )  # fmt: skip
        paths = write_outputs(out, figure_files(sim.to_dict(), dpi), replace=force, inputs=[adapter, base])
        _print_written(paths)


@app.command(rich_help_panel="Report", short_help="One self-contained report.html with everything.")
def report(
    lora: Annotated[
        list[Path],
        typer.Option(
            "--lora",
            "--adapter",
            help="PEFT LoRA adapter folder (Figure 1 and the low-rank analyses use the first); repeat it, with as "
            "many --condlora, for several pairs (e.g. training seeds).",
        ),
    ],
    out: OutOpt,
    base: BaseOpt = None,
    condlora: Annotated[
        list[Path] | None,
        typer.Option(
            "--condlora",
            help="CondLoRA adapter folder of the same base, one per --lora (paired in order): adds Tables 3 and 4, "
            "and with several pairs Table 3 over the pairs and Table 2 (held-out scores from each folder's "
            "metrics.json, paired t-test).",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        Path | None,
        typer.Option(
            "--overlap",
            help="A second PEFT LoRA adapter of the same base (e.g. another rank or seed): adds the rank-subspace "
            "overlap grids phi(i, j) of --lora against it (LoRA paper, Figures 3 and 4).",
            show_default=False,
        ),
    ] = None,
    lowrank: Annotated[
        bool,
        typer.Option(
            "--lowrank/--no-lowrank",
            help="Include the LoRA paper's amplification (Table 7) and dW spectra analyses; --no-lowrank leaves "
            "them out (--overlap is still drawn when given).",
        ),
    ] = True,
    modules: ModulesOpt = None,
    seed: SeedOpt = 0,
    null_draws: Annotated[
        int,
        typer.Option(
            "--null-draws",
            help="Draws of Figure 1's W-conditioned null W^-1 R (R Gaussian, solved with the same LU as the "
            "adapter's factors); 0 leaves it out.",
        ),
    ] = 20,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One self-contained report.html (pictures embedded, opens offline) with inputs, hashes, settings and the
    numbers as tables, plus the pictures (PNG, SVG) and tables (CSV, Markdown, LaTeX) beside it, and every number
    in report.json. With --condlora it adds Table 3 (per-layer phi of LoRA vs CondLoRA A, B, BA with a random
    baseline, also as a line plot) and Table 4 (trainable parameters; training speed from each adapter's
    metrics.json when present).

    Figure 1 uses the paper's settings: left singular vectors, i = j = r.

    A section "Low-rank updates" adds the LoRA paper's own analyses of each layer's dW = s B A (Hu et al. 2022,
    Section 7), computed through the factors: amplification (how dW relates to W, Table 7; random subspaces
    seeded by --seed) and dW's spectra (unless --no-lowrank), and with --overlap the subspace overlap of two
    adapters. Each comes as a picture, a table and amplification/spectra/overlap .png/.svg/.csv/.md/.tex files;
    its numbers are under "lowrank" in report.json.
    """
    from loralens.render.build import build_report, check_pairs

    with user_errors():
        inputs = [*lora, *(condlora or []), overlap, base]
        check_output_folder(out, replace=force, inputs=inputs)
        check_pairs(len(lora), len(condlora or []))
        names = parse_modules(modules)
        base_ckpt, first = load_inputs(base, lora[0])
        loras = [first, *(load_lora_adapter(p) for p in lora[1:])]
        conds = [load_condlora_adapter(c) for c in condlora or []]
        with progress_bar(quiet) as progress:
            built = build_report(
                base_ckpt, loras, conds, overlap=load_lora_adapter(overlap) if overlap is not None else None,
                lowrank=lowrank, modules=names, seed=seed, dpi=dpi, device=device, dtype=torch_dtype(dtype),
                layer_batch=layer_batch, null_draws=null_draws, progress=progress,
            )  # fmt: skip
        paths = write_outputs(out, built.files, replace=force, inputs=inputs)
        _print_written(paths)
        typer.echo(f"report: {out / 'report.html'}")


def _print_written(paths: list[Path]) -> None:
    typer.echo(f"wrote {len(paths)} files to {paths[0].parent}:" if paths else "wrote no files")
    for p in paths:
        typer.echo(f"  {p}")

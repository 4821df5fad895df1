"""``loralens conversion``, ``similarity`` and ``demo``: conversion matrices and their layer x layer phi."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import torch
import typer
from rich.console import Console
from rich.table import Table

import loralens
from loralens.analyses.conversion import (
    FACTORS,
    ModuleConversion,
    compute_conversions,
    conversion_summary,
    conversion_tensors,
    least_squares_layers,
)
from loralens.analyses.engine import format_memory_size, parse_memory_size, select_modules
from loralens.analyses.similarity import (
    FactorSimilarity,
    SimilarityReport,
    adapter_similarity,
    similarity_reports_to_dict,
)
from loralens.cli._app import (
    LAYERS_FROM_ONE,
    AdapterOpt,
    AdaptersOpt,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    FinetunedManyOpt,
    FinetunedOpt,
    FinetunedRankOpt,
    ForceOpt,
    JsonOpt,
    LayerBatchOpt,
    MaxMemoryOpt,
    ModulesOpt,
    QuietOpt,
    SideChoice,
    app,
    format_number,
    load_inputs,
    load_many,
    make_console,
    numbered_layers,
    parse_modules,
    print_pairs,
    progress_bar,
    run_settings,
    torch_dtype,
    user_errors,
)
from loralens.core.similarity import Side
from loralens.errors import LoralensError
from loralens.examples import default_adapter, default_adapters, default_base
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.condlora import load_condlora_adapter
from loralens.io.outputs import check_output_folder, json_text, json_writer, safetensors_writer, write_outputs

CONVERSION_FILES = ("conversion.safetensors", "conversion.json")


@app.command(rich_help_panel="Analysis", short_help="Conversion matrices W^-1 A^T, W^-1 B, W^-1 B A per layer.")
def conversion(
    out: Annotated[Path, typer.Option("--out", help="Output folder for conversion.safetensors and conversion.json.")],
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    product: Annotated[
        bool,
        typer.Option(
            "--product/--no-product",
            help="Also write W^-1 B A (L x d x d per module, held in memory and counted against --max-memory). "
            "--no-product writes W^-1 A^T and W^-1 B only (L x d x r): the choice for large models.",
        ),
    ] = True,
) -> None:
    """Compute conversion matrices W^-1 A^T, W^-1 B and W^-1 B A for every layer and write them.

    conversion.safetensors holds '<module>.<A|B|BA>' stacked over layers; conversion.json holds shapes,
    layers, the convention (solve for square W, least squares otherwise), residuals, condition estimates
    and the LoRA scaling. Files are written atomically. W^-1 B A is L x d x d per module: large for big models,
    so it counts against --max-memory, and --no-product leaves it out.
    Near-singular base weights are solved by least squares in those layers only, with a warning; conversion.json
    lists them per module (least_squares_layers).
    """
    with user_errors():
        check_output_folder(out, replace=force, names=CONVERSION_FILES, inputs=[adapter, finetuned, base])
        budget, names = parse_memory_size(max_memory), parse_modules(modules)
        base_ckpt, lora = load_inputs(base, adapter, finetuned, finetuned_rank, device, names)
        if product:
            _check_product_size(lora, names, torch_dtype(dtype), budget, max_memory)
        with progress_bar(quiet) as progress:
            convs = compute_conversions(
                base_ckpt,
                lora,
                modules=names,
                device=device,
                dtype=torch_dtype(dtype),
                layer_batch=layer_batch,
                max_memory=budget,
                with_product=product,
                progress=progress,
            )
        factors = FACTORS if product else ("A", "B")
        settings = run_settings(device, dtype, max_memory=budget)
        summary = conversion_summary(convs, base_ckpt, lora, {**settings, "product": product}, factors)
        paths = write_outputs(
            out,
            {
                "conversion.safetensors": safetensors_writer(
                    conversion_tensors(convs, factors), {"loralens": loralens.__version__}
                ),
                "conversion.json": json_writer(summary),
            },
            replace=force,
            inputs=[adapter, base_ckpt.root],
        )
        if json_output:
            typer.echo(json_text({"outputs": [str(p) for p in paths], **summary}), nl=False)
        else:
            _print_conversion(convs, paths)


def _check_product_size(
    lora: LoraAdapter, modules: list[str] | None, dtype: torch.dtype, budget: int, max_memory: str
) -> None:
    """Refuse before any work when W^-1 B A (L x d x d per module) would not fit the memory budget; say its size up
    front when it is large (an 11.8 MB adapter can make an 829 MB file)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = sum(len(lora.modules[n].layers) * lora.modules[n].shape[1] ** 2 for n in select_modules(lora, modules))
    size *= itemsize
    if size > budget:
        raise LoralensError(
            f"W^-1 B A of {lora.path} would take {format_memory_size(size)} (layers x d x d per module, "
            f"{str(dtype).removeprefix('torch.')}), over --max-memory {max_memory}; pass --no-product to write "
            "W^-1 A^T and W^-1 B only ('loralens similarity' gets phi of B A from the factors), or raise --max-memory"
        )
    if size > _LARGE_OUTPUT:
        typer.echo(
            f"note: W^-1 B A makes conversion.safetensors about {format_memory_size(size)} (layers x d x d per "
            "module); --no-product writes W^-1 A^T and W^-1 B only",
            err=True,
        )


#: Output size from which ``conversion`` says how large its file will be before writing it.
_LARGE_OUTPUT = 300_000_000


@app.command(rich_help_panel="Analysis", short_help="Layer x layer phi of conversion matrices (Figure 1).")
def similarity(
    adapter: AdaptersOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedManyOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    i: Annotated[
        int | None,
        typer.Option("--i", min=1, help="Subspace dimension of the first matrix. Default: r.", show_default=False),
    ] = None,
    j: Annotated[
        int | None, typer.Option("--j", min=1, help="Subspace dimension of the second. Default: i.", show_default=False)
    ] = None,
    side: Annotated[
        SideChoice, typer.Option("--side", help="Compare left or right singular vectors.")
    ] = SideChoice.left,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random Gaussian baseline and the W-null.")] = 0,
    null_draws: Annotated[
        int,
        typer.Option(
            "--null-draws",
            help="Draws of the W-conditioned null W^-1 R (R Gaussian, solved with the same LU as the adapter's "
            "factors); 0 leaves it out.",
        ),
    ] = 20,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Layer x layer normalized subspace similarity phi of the conversion matrices (the paper's Figure 1).

    For each module and each of A, B, BA: the L x L matrix phi(conv^l, conv^k), its mean off-diagonal value
    ("average similarity"), and the same for random Gaussian matrices of the same shape beside the exact
    expectation max(i, j) / d. Defaults are the paper's: left singular vectors, i = j = r.

    Beyond the paper, the W-conditioned null (--null-draws draws, 0: off): phi of W^-1 R for Gaussian R of the
    factor's shape, solved like the adapter's factors. W^-1 pulls any input toward W's smallest singular
    directions, so only what exceeds this null is evidence of learning: per cell its mean, std, the z-score and
    empirical p-value of the observed phi; per module and factor its mean off-diagonal and the share of the
    observed excess over the Gaussian baseline that it already reaches.

    Several --adapter of one base share each base weight's factorisation (one LU per layer for all of them).
    With --json, one adapter gives {"modules": ..., "settings": ...}; several give
    {"adapters": [{"adapter": <path>, "modules": ..., "layers": ..., "conventions": ..., "inputs": ...}, ...],
    "settings": ...}, each "modules" as for one adapter.
    """
    with user_errors():
        budget = parse_memory_size(max_memory)
        names = parse_modules(modules)
        # one report per --adapter (then per --finetuned), labelled by its path
        base_ckpt, loras = load_many(base, adapter, finetuned, finetuned_rank, device, names)
        with progress_bar(quiet) as progress:
            reports = adapter_similarity(
                base_ckpt,
                loras,
                modules=names,
                layer_batch=layer_batch,
                max_memory=budget,
                progress=progress,
                i=i,
                j=j,
                side=cast(Side, side.value),  # "left" or "right": the --side choices
                seed=seed,
                device=device,
                dtype=torch_dtype(dtype),
                null_draws=null_draws,
            )
        labels = [str(a) for a in (*(adapter or ()), *(finetuned or ()))]
        if len(reports) == 1:
            if json_output:
                typer.echo(json_text(reports[0].to_dict()), nl=False)
            else:
                _print_similarity(reports[0])
        elif json_output:
            typer.echo(json_text(similarity_reports_to_dict(reports, labels)), nl=False)
        else:
            _print_many(reports, labels)


@app.command(rich_help_panel="Report", short_help="Every analysis on the embedded MiniLM and adapters.")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("results/demo"),
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Run the main analyses on the embedded defaults: the real MiniLM base, a real PEFT LoRA adapter (r = 8,
    query + value, trained on Rotten Tomatoes review polarity) and LoRA / CondLoRA adapters of three training
    seeds each. Writes the conversion matrices, the phi matrices and report.html, which embeds everything and
    opens offline: Figure 1; the LoRA paper's analyses (amplification, spectra, and the subspace overlap of the
    seed-0 and seed-1 LoRA adapters); CondLoRA vs LoRA: Table 2 over the three seeds with the paired t-test,
    Table 3 per pair and over pairs, Table 4."""
    from loralens.render.build import build_report

    with user_errors():
        adapter = default_adapter()
        base_ckpt, lora = load_inputs(default_base(), adapter)
        convs = compute_conversions(base_ckpt, lora, device=device)
        seeds = default_adapters()
        with progress_bar(quiet) as progress:
            built = build_report(
                base_ckpt,
                [lora, *(load_lora_adapter(lo) for _, lo, _ in seeds[1:])],
                [load_condlora_adapter(c) for _, _, c in seeds],
                overlap=load_lora_adapter(default_adapter(1)),
                device=device,
                progress=progress,
            )
        report = built.similarity
        paths = write_outputs(
            out,
            {
                "conversion.safetensors": safetensors_writer(
                    conversion_tensors(convs), {"loralens": loralens.__version__}
                ),
                "conversion.json": json_writer(
                    conversion_summary(convs, base_ckpt, lora, run_settings(device, DType.float64))
                ),
                "similarity.json": json_writer(report.to_dict()),
                **built.files,
            },
            replace=True,  # the demo's own folder: a rerun replaces it
        )
        console = make_console()
        console.print(f"Base: {base_ckpt.root}\nAdapter: {adapter}\n", soft_wrap=True)  # paths never broken
        _print_similarity(report, console)
        console.print("\nCondLoRA vs LoRA, the shipped adapters of seeds " + ", ".join(str(s) for s, _, _ in seeds))
        print_pairs(built.data["pairs"])
        console.print(
            f"\nWrote {len(paths)} files to {out}; everything is in the report (opens offline in a browser):",
            soft_wrap=True,
        )
        console.print(f"  {out / 'report.html'}", soft_wrap=True)


def _print_many(reports: list[SimilarityReport], labels: list[str]) -> None:
    table = Table(
        title=f"Layer x layer subspace similarity phi of {len(reports)} adapters (mean off-diagonal)",
        caption=LAYERS_FROM_ONE,
    )
    columns = ("adapter", "module", "factor", "layers", "i, j", "mean phi", "random (one draw)", "E=max(i,j)/d")
    for col in (*columns, "W-null", "share of excess"):
        table.add_column(col, justify="left" if col in _TEXT_COLUMNS else "right")
    for label, report in zip(labels, reports, strict=True):
        for name, factors in report.modules.items():
            for f, s in factors.items():
                table.add_row(
                    label,
                    name,
                    f,
                    numbered_layers(report.layers[name]),
                    f"{s.i}, {s.j}",
                    format_number(s.mean_offdiag),
                    format_number(s.random_mean_offdiag),
                    f"{s.random_expected:.4f}",
                    *_w_null_cells(s),
                )
    make_console().print(table)


#: Columns of the similarity tables that hold words (left-aligned); the others hold numbers.
_TEXT_COLUMNS = ("adapter", "module", "factor", "layers", "i, j")


def _w_null_cells(s: FactorSimilarity) -> tuple[str, str]:
    """The "W-null" (mean off-diagonal +- std over draws) and "share of excess" cells; n/a without a W-null."""
    w = s.w_null
    if w is None:
        return "n/a", "n/a"
    return f"{format_number(w.mean_offdiag)} +- {format_number(w.mean_offdiag_std)}", format_number(w.share_of_excess)


def _print_conversion(convs: dict[str, ModuleConversion], paths: list[Path]) -> None:
    table = Table(title="Conversion matrices", caption=LAYERS_FROM_ONE)
    for col in ("module", "layers", "convention", "conv_A", "conv_B", "max residual", "max cond (1-norm)"):
        table.add_column(col)
    for name, mc in convs.items():
        c = mc.conversion
        res = max(float(c.residual_A.max()), float(c.residual_B.max()))
        fallback = tuple(least_squares_layers(mc))
        table.add_row(
            name,
            numbered_layers(mc.layers),
            c.convention + (f" (least squares at {numbered_layers(fallback)})" if fallback else ""),
            "x".join(map(str, c.A.shape)),
            "x".join(map(str, c.B.shape)),
            f"{res:.1e}",
            f"{float(c.condition.max()):.3g}",
        )
    console = make_console()
    console.print(table)
    for name, mc in convs.items():
        if mc.conversion.convention == "lstsq":
            d_out, d_in = mc.conversion.A.shape[1], mc.conversion.B.shape[1]  # conv_A (d_out, r), conv_B (d_in, r)
            expected = (1 - min(d_out, d_in) / max(d_out, d_in)) ** 0.5
            console.print(
                f"{name} is {d_out} x {d_in}, not square: no inverse exists, so its conversion matrices are least-"
                f"squares solutions (W^+); the over-determined side's residual ||W X - RHS|| / ||RHS|| is the share "
                f"of the factor outside W's range, not a failure (a random factor gives about {expected:.2f})",
                highlight=False,
            )
    for p in paths:
        console.print(f"wrote {p}", soft_wrap=True)


#: Layers up to which ``similarity`` prints each L x L phi matrix on the terminal.
_MAX_PRINTED_LAYERS = 16


def _print_similarity(report: SimilarityReport, out: Console | None = None) -> None:
    console = out or make_console()
    table = Table(
        title=f"Layer x layer subspace similarity phi ({report.settings['side']} singular vectors)",
        caption=LAYERS_FROM_ONE,
    )
    for col in (
        "module",
        "factor",
        "layers",
        "i, j",
        "mean phi (off-diag)",
        "random (one draw)",
        "random E=max(i,j)/d",
        "W-null",
        "share of excess",
    ):
        table.add_column(col, justify="left" if col in _TEXT_COLUMNS else "right")
    for name, factors in report.modules.items():
        for f, s in factors.items():
            table.add_row(
                name,
                f,
                numbered_layers(report.layers[name]),
                f"{s.i}, {s.j}",
                format_number(s.mean_offdiag),
                format_number(s.random_mean_offdiag),
                f"{s.random_expected:.4f}",
                *_w_null_cells(s),
            )
    console.print(table)
    draws = report.settings.get("null_draws")
    if draws:
        console.print(
            f"W-null: mean off-diagonal phi of W^-1 R (R Gaussian, {draws} draws) +- its std over draws; share of "
            "excess: (W-null - random) / (observed - random)",
            highlight=False,
        )
    hidden = [name for name in report.modules if len(report.layers[name]) > _MAX_PRINTED_LAYERS]
    if hidden:
        console.print(
            f"phi matrices of {', '.join(hidden)} not printed (over {_MAX_PRINTED_LAYERS} layers): --json has them, "
            "and 'loralens figure --out DIR' draws them with every value in phi_matrices.csv",
            highlight=False,
        )
    for name, factors in report.modules.items():
        for f, s in factors.items():
            if name in hidden:
                continue
            header = "       " + " ".join(f"L{k + 1:<4d}" for k in report.layers[name])
            rows = [
                f"  L{k + 1:<3d} " + " ".join(f"{v:.3f}" for v in row)
                for k, row in zip(report.layers[name], s.phi.tolist(), strict=True)
            ]
            console.print(f"\n{name} / {f}: phi (average similarity {format_number(s.mean_offdiag)})", highlight=False)
            console.print("\n".join([header, *rows]), highlight=False)

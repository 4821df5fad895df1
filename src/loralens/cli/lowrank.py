"""``loralens overlap``, ``amplification`` and ``spectra``: the LoRA paper's own analyses (Hu et al. 2022, Sec. 7).

Each command loads, calls :mod:`loralens.analyses.lowrank`, and renders: a table, one JSON object (``--json``),
and with ``--out`` a folder holding ``<command>.json`` with a PNG and an SVG figure, written atomically. Tables
and pictures are built from the ``to_dict()`` data by :mod:`loralens.render.tables` and :mod:`loralens.render.report`
(the same ones ``loralens report`` embeds), imported only when drawn: matplotlib stays out of start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loralens.analyses.engine import base_for
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.cli._app import (
    DPI,
    AdapterOpt,
    BaseOpt,
    CacheDirOpt,
    CacheOpt,
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
    app,
    emit_result,
    load_inputs,
    load_many,
    parse_modules,
    progress_bar,
    torch_dtype,
    user_errors,
)
from loralens.errors import LoralensError
from loralens.io.adapters import load_lora_adapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.outputs import bytes_writer, check_output_folder, json_writer

if TYPE_CHECKING:
    from loralens.render.tables import Table

OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Also write <command>.json, <command>.png and <command>.svg into this folder (atomically).",
        show_default=False,
    ),
]
DpiOpt = Annotated[int, typer.Option("--dpi", min=72, max=600, help="Resolution of the PNG file.")]
ExactOpt = Annotated[
    bool,
    typer.Option(
        "--exact", help="Dense SVD of every base weight instead of the top-r spectral engine (slower; for checking)."
    ),
]


@app.command(
    rich_help_panel="Analysis",
    short_help="Subspace overlap of two adapters (LoRA paper, Figs. 3-4).",
)
def overlap(
    adapter: Annotated[
        list[Path] | None,
        typer.Option(
            "--adapter",
            help="Two PEFT LoRA adapters of one base: --adapter X --adapter Y (i indexes X); or one and a "
            "--finetuned model (which comes second).",
            show_default=False,
        ),
    ] = None,
    finetuned: FinetunedManyOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Check both adapters against this base model (folder, package or cached hub name). Default: no "
            "base is read, and adapters whose configs record different bases are refused.",
            show_default=False,
        ),
    ] = None,
    modules: ModulesOpt = None,
    factors: Annotated[str, typer.Option("--factors", help="A (right singular vectors), B (left), or A,B.")] = "A,B",
    i: Annotated[
        int | None,
        typer.Option("--i", min=1, help="Grid extent for the first adapter. Default: its rank.", show_default=False),
    ] = None,
    j: Annotated[
        int | None,
        typer.Option("--j", min=1, help="Grid extent for the second adapter. Default: its rank.", show_default=False),
    ] = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank-subspace overlap of two adapters (LoRA paper, Figures 3 and 4): per module and layer the grid
    phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), i <= r1, j <= r2, on the right singular vectors of A
    and the left singular vectors of B. Random subspaces give max(i, j) / d."""
    from loralens.render.tables import overlap_table

    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force, inputs=[*(adapter or ()), *(finetuned or ()), base])
        given = len(adapter or ()) + len(finetuned or ())
        if given != 2:
            raise LoralensError(
                f"overlap compares exactly two adapters (--adapter X --adapter Y, or --finetuned); got {given}"
            )
        base_ckpt: BaseCheckpoint | None = None
        names = parse_modules(modules)
        if finetuned:  # a full fine-tune needs its base: read it, and check the adapter against it too
            base_ckpt, (first, second) = load_many(base, adapter, finetuned, finetuned_rank, device, names)
        else:
            first, second = (load_lora_adapter(a) for a in adapter or ())
            base_ckpt = base_for(first, base) if base is not None else None
        with progress_bar(quiet) as progress:
            report = rank_overlap(
                first,
                second,
                base=base_ckpt,
                modules=names,
                factors=[f.strip() for f in factors.split(",") if f.strip()],
                i=i,
                j=j,
                device=device,
                dtype=torch_dtype(dtype),
                progress=progress,
            )
        _emit(report.to_dict(), out, "overlap", overlap_table, dpi, json_output, force)


@app.command(rich_help_panel="Analysis", short_help="How dW amplifies W's directions (LoRA paper, Table 7).")
def amplification(
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    n_random: Annotated[
        int, typer.Option("--n-random", min=0, help="Random subspace pairs per layer for the baseline.")
    ] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random subspaces.")] = 0,
    exact: ExactOpt = False,
    cache: CacheOpt = True,
    cache_dir: CacheDirOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """How dW relates to W (LoRA paper, Table 7), per module and layer: ||U^T W V||_F for dW's r-dim singular
    subspaces, for W's own top-r ones and for random ones, and the amplification factor ||dW||_F / ||U^T W V||_F.
    """
    from loralens.render.tables import amplification_table

    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force, inputs=[adapter, finetuned, base])
        names = parse_modules(modules)
        base_ckpt, lora = load_inputs(base, adapter, finetuned, finetuned_rank, device, names)
        with progress_bar(quiet) as progress:
            report = amplification_report(
                base_ckpt,
                lora,
                modules=names,
                n_random=n_random,
                seed=seed,
                exact=exact,
                cache=cache,
                cache_dir=cache_dir,
                device=device,
                dtype=torch_dtype(dtype),
                layer_batch=layer_batch,
                max_memory=max_memory,
                progress=progress,
            )
        _emit(report.to_dict(), out, "amplification", amplification_table, dpi, json_output, force)


@app.command(rich_help_panel="Analysis", short_help="Singular values and effective rank of each dW = s B A.")
def spectra(
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    energy_threshold: Annotated[
        float,
        typer.Option("--energy-threshold", min=0.0, max=1.0, help="Energy effective rank: share of sum sigma^2."),
    ] = 0.9,
    exact: ExactOpt = False,
    cache: CacheOpt = True,
    cache_dir: CacheDirOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Spectra of dW = s B A per module and layer: singular values, entropy and energy effective ranks, and the
    principal angles between dW's column space and W's top-r left singular subspace."""
    from loralens.render.tables import spectra_table

    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force, inputs=[adapter, finetuned, base])
        names = parse_modules(modules)
        base_ckpt, lora = load_inputs(base, adapter, finetuned, finetuned_rank, device, names)
        with progress_bar(quiet) as progress:
            report = spectra_report(
                base_ckpt,
                lora,
                modules=names,
                energy_threshold=energy_threshold,
                exact=exact,
                cache=cache,
                cache_dir=cache_dir,
                device=device,
                dtype=torch_dtype(dtype),
                layer_batch=layer_batch,
                max_memory=max_memory,
                progress=progress,
            )
        _emit(report.to_dict(), out, "spectra", spectra_table, dpi, json_output, force)


# ---------------------------------------------------------------------------------------------- rendering


def _emit(
    data: dict[str, Any],
    out: Path | None,
    stem: str,
    table: Callable[[dict[str, Any]], Table],
    dpi: int,
    json_output: bool,
    force: bool = False,
) -> None:
    """Write the folder (if asked: ``<stem>.json`` and the picture of :data:`loralens.render.report.LOWRANK_ANALYSES`),
    then print JSON or the table (and the written paths)."""
    files = None
    if out is not None:
        from loralens.render.report import LOWRANK_ANALYSES

        picture = LOWRANK_ANALYSES[stem][0](data, dpi)
        files = {
            f"{stem}.json": json_writer(data),
            f"{stem}.png": bytes_writer(picture.png),
            f"{stem}.svg": bytes_writer(picture.svg),
        }
    emit_result(data, table, json_output=json_output, out=out, files=files, force=force)

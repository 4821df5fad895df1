"""``loralens figure`` and ``loralens report``: Figure-1 pictures and a self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from loralens.analyses.condlora_vs_lora import compare_adapters_many, comparisons_to_dict, parameter_counts
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.analyses.provenance import provenance
from loralens.analyses.seeds import metric_value
from loralens.analyses.similarity import SimilarityReport
from loralens.cli._app import (
    AdapterOpt,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    ForceOpt,
    LayerBatchOpt,
    ModulesOpt,
    SideChoice,
    app,
    load_inputs,
    parse_modules,
    run_settings,
    torch_dtype,
    user_errors,
)
from loralens.cli.condlora import seed_table
from loralens.cli.core import analyse_similarity
from loralens.errors import LoralensError, RankError
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.condlora import load_condlora_adapter
from loralens.io.files import read_json
from loralens.io.outputs import check_output_folder, json_writer, write_outputs

OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder (created atomically; files in an existing one are replaced).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random Gaussian baseline.")]
DpiOpt = Annotated[int, typer.Option("--dpi", min=72, max=600, help="Resolution of the PNG files.")]
DPI = 150  # loralens.render.report.DPI; the report (and matplotlib) is imported only by the commands that draw


@app.command(rich_help_panel="Report", short_help="Figure 1 heatmaps as PNG/SVG, with every phi value as CSV.")
def figure(
    adapter: AdapterOpt,
    out: OutOpt,
    base: BaseOpt = None,
    modules: ModulesOpt = None,
    i: Annotated[
        int | None, typer.Option("--i", min=1, help="Subspace dimension. Default: r.", show_default=False)
    ] = None,
    j: Annotated[
        int | None, typer.Option("--j", min=1, help="Second subspace dimension. Default: i.", show_default=False)
    ] = None,
    side: Annotated[SideChoice, typer.Option("--side", help="Left or right singular vectors.")] = SideChoice.left,
    seed: SeedOpt = 0,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    force: ForceOpt = False,
) -> None:
    """Figure 1 of the paper: per module and factor (A, B, BA), the layer x layer phi heatmap of the conversion
    matrices beside the same for random Gaussian matrices, on one 0..1 colour scale.

    Writes figure1_<module>_<factor>.png and .svg, and every phi value in phi_matrices.csv.
    """
    from loralens.render.report import figure_files

    with user_errors():
        check_output_folder(out, replace=force, inputs=[adapter, base])
        _, _, (sim,) = analyse_similarity(
            base, [adapter], parse_modules(modules), i=i, j=j, side=side.value, seed=seed, device=device,
            dtype=dtype, layer_batch=layer_batch,
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
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    force: ForceOpt = False,
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
    with user_errors():
        inputs = [*lora, *(condlora or []), overlap, base]
        check_output_folder(out, replace=force, inputs=inputs)
        files, _ = report_outputs(
            base,
            lora,
            condlora or [],
            overlap=overlap,
            lowrank=lowrank,
            modules=modules,
            seed=seed,
            dpi=dpi,
            device=device,
            dtype=dtype,
            layer_batch=layer_batch,
        )
        paths = write_outputs(out, files, replace=force, inputs=inputs)
        _print_written(paths)
        typer.echo(f"report: {out / 'report.html'}")


def report_outputs(
    base: str | None,
    lora: list[Path],
    condlora: list[Path],
    *,
    overlap: Path | None = None,
    lowrank: bool = True,
    modules: str | None = None,
    seed: int = 0,
    dpi: int = DPI,
    device: str = "auto",
    dtype: DType = DType.float64,
    layer_batch: int | None = None,
    similarity: SimilarityReport | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything ``loralens report`` (and ``demo``) writes, as ``({file name: writer}, report.json data)``:
    all analyses run before anything is written. ``similarity``: Figure 1's report of ``lora[0]`` when the
    caller has it already (the demo), else computed here."""
    from loralens.render.report import input_identities, report_files

    if not lora:
        raise LoralensError("give a LoRA adapter (--lora)")
    if condlora and len(condlora) != len(lora):
        raise LoralensError(
            f"--lora is given {len(lora)} times and --condlora {len(condlora)} times; pass one CondLoRA adapter "
            "per LoRA adapter (they are paired in order)"
        )
    if not condlora and len(lora) > 1:
        raise LoralensError(
            f"--lora is given {len(lora)} times without --condlora; several LoRA adapters are compared with their "
            "CondLoRA pairs (--lora X --condlora Y ...), or use 'loralens similarity' for several adapters"
        )
    if similarity is None:
        base_ckpt, (lora_adapter,), (sim,) = analyse_similarity(
            base, [lora[0]], parse_modules(modules), seed=seed, device=device, dtype=dtype, layer_batch=layer_batch
        )
    else:
        (base_ckpt, lora_adapter), sim = load_inputs(base, lora[0]), similarity
    conds = [load_condlora_adapter(c) for c in condlora]
    comparison = params = seeds = pairs = None
    if conds:
        loras = [lora_adapter, *(load_lora_adapter(p) for p in lora[1:])]
        reports = compare_adapters_many(
            base_ckpt,
            list(zip(loras, conds, strict=True)),
            modules=parse_modules(modules),
            seed=seed,
            dtype=torch_dtype(dtype),
            device=device,
        )
        for r in reports:
            r.settings.update(run_settings(device, dtype))
        comparison = reports[0].to_dict()
        params = parameter_counts(base_ckpt, r=conds[0].r, targets=sorted(conds[0].thetas)).to_dict()
        params["speed"] = _training_speeds(lora, condlora)
        params["speed_source"] = "Speed: training examples/s recorded in each adapter's metrics.json" + (
            f" (mean over the {len(lora)} pairs)." if len(lora) > 1 else "."
        )
        if len(reports) > 1:
            pairs = comparisons_to_dict(reports, seed_table(lora, condlora))
            seeds = pairs.get("table2")
    low = _lowrank_analyses(base_ckpt, lora_adapter, overlap, lowrank, modules, seed, device, dtype, layer_batch)
    sim_data, inputs = sim.to_dict(), input_identities(base_ckpt, lora_adapter, conds[0] if conds else None)
    files = report_files(
        sim_data, inputs, comparison=comparison, params=params, lowrank=low, seeds=seeds, pairs=pairs, dpi=dpi
    )
    numbers = {
        **sim_data,
        "inputs": inputs,
        "comparison": comparison,
        "pairs": pairs,
        "parameters": params,
        "lowrank": low,
    }
    return {**files, "report.json": json_writer(numbers)}, numbers


def _lowrank_analyses(
    base: BaseCheckpoint,
    lora: LoraAdapter,
    other: Path | None,
    default: bool,
    modules: str | None,
    seed: int,
    device: str,
    dtype: DType,
    layer_batch: int | None,
) -> dict[str, Any] | None:
    """The LoRA paper's analyses as plain data (``to_dict()``): amplification and spectra when ``default``,
    the overlap of ``lora`` against the adapter in ``other`` when given; None when neither."""
    options: dict[str, Any] = {"modules": parse_modules(modules), "device": device, "dtype": torch_dtype(dtype)}
    reports: dict[str, Any] = {}
    if default:
        try:
            reports["amplification"] = amplification_report(base, lora, seed=seed, layer_batch=layer_batch, **options)
            reports["spectra"] = spectra_report(base, lora, layer_batch=layer_batch, **options)
        except RankError as e:
            raise RankError(f"{e}; pass --no-lowrank to leave the low-rank analyses out", e.indices) from e
    if other is not None:
        second = load_lora_adapter(other)
        reports["overlap"] = rank_overlap(lora, second, base=base, **options)
        reports["overlap"].settings["inputs"] = {"adapters": [provenance(base, a)["adapter"] for a in (lora, second)]}
    for analysis in reports.values():
        analysis.settings.update(run_settings(device, dtype))
    return {name: analysis.to_dict() for name, analysis in reports.items()} or None


def _training_speeds(lora: list[Path], condlora: list[Path]) -> dict[str, float]:
    """Training examples/s recorded in the adapters' metrics.json (``loralens train`` writes it), mean per method
    over the folders that have one. Any metrics.json with an ``examples_per_s`` counts (not only loralens's own);
    one that cannot be read, or whose speed is not a finite number (NaN, Infinity, text), is an error naming it."""
    speeds = {}
    for key, folders in (("lora", lora), ("condlora", condlora)):
        values = []
        for folder in folders:
            path = Path(folder) / "metrics.json"
            if not path.is_file():
                continue
            value = metric_value(read_json(path), "examples_per_s", path)
            if value is not None:
                values.append(value)
        if values:
            speeds[key] = sum(values) / len(values)
    return speeds


def _print_written(paths: list[Path]) -> None:
    typer.echo(f"wrote {len(paths)} files to {paths[0].parent}:" if paths else "wrote no files")
    for p in paths:
        typer.echo(f"  {p}")

"""``loralens figure`` and ``loralens report``: Figure-1 pictures and a self-contained HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from loralens.analysis import SimilarityReport, compute_conversions, layer_similarity
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
from loralens.compare import compare_adapters, parameter_counts
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.condlora import CondLoraAdapter, load_condlora_adapter
from loralens.io.outputs import check_output_folder, json_writer, write_outputs

OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder (created atomically; files in an existing one are replaced).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random Gaussian baseline.")]
DpiOpt = Annotated[int, typer.Option("--dpi", min=72, max=600, help="Resolution of the PNG files.")]
DPI = 150  # loralens.report.DPI; the report (and matplotlib) is imported only by the commands that draw


@app.command()
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
    from loralens.report import figure_files

    with user_errors():
        check_output_folder(out, replace=force)
        _, _, sim = _analyse(base, adapter, modules, device, dtype, layer_batch, i=i, j=j, side=side.value, seed=seed)
        paths = write_outputs(out, figure_files(sim.to_dict(), dpi), replace=force)
        _print_written(paths)


@app.command()
def report(
    lora: Annotated[Path, typer.Option("--lora", "--adapter", help="PEFT LoRA adapter folder.")],
    out: OutOpt,
    base: BaseOpt = None,
    condlora: Annotated[
        Path | None,
        typer.Option(
            "--condlora", help="CondLoRA adapter folder of the same base: adds Tables 3 and 4.", show_default=False
        ),
    ] = None,
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
    """
    from loralens.report import input_identities, report_files

    with user_errors():
        check_output_folder(out, replace=force)
        base_ckpt, lora_adapter, sim = _analyse(base, lora, modules, device, dtype, layer_batch, seed=seed)
        cond = load_condlora_adapter(condlora) if condlora is not None else None
        comparison = params = None
        if cond is not None:
            comparison, params = _condlora_tables(base_ckpt, lora_adapter, cond, modules, seed, device, dtype)
        similarity, inputs = sim.to_dict(), input_identities(base_ckpt, lora_adapter, cond)
        files = report_files(similarity, inputs, comparison=comparison, params=params, dpi=dpi)
        numbers = {**similarity, "inputs": inputs, "comparison": comparison, "parameters": params}
        paths = write_outputs(out, {**files, "report.json": json_writer(numbers)}, replace=force)
        _print_written(paths)
        typer.echo(f"report: {out / 'report.html'}")


def _analyse(
    base: str | None,
    adapter: Path,
    modules: str | None,
    device: str,
    dtype: DType,
    layer_batch: int | None,
    **similarity: Any,
) -> tuple[BaseCheckpoint, LoraAdapter, SimilarityReport]:
    base_ckpt, lora = load_inputs(base, adapter)
    convs = compute_conversions(
        base_ckpt,
        lora,
        modules=parse_modules(modules),
        device=device,
        dtype=torch_dtype(dtype),
        layer_batch=layer_batch,
        with_product=False,
    )
    sim = layer_similarity(convs, device=device, **similarity)
    sim.settings.update(run_settings(device, dtype))
    return base_ckpt, lora, sim


def _condlora_tables(
    base: BaseCheckpoint,
    lora: LoraAdapter,
    cond: CondLoraAdapter,
    modules: str | None,
    seed: int,
    device: str,
    dtype: DType,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Table 3 (``compare_adapters``) and Table 4 (``parameter_counts`` + recorded training speeds) as plain data."""
    comparison = compare_adapters(
        base, lora, cond, modules=parse_modules(modules), seed=seed, dtype=torch_dtype(dtype), device=device
    ).to_dict()
    comparison["settings"].update(run_settings(device, dtype))
    params = parameter_counts(base, r=cond.r, targets=sorted(cond.thetas)).to_dict()
    params["speed"] = _training_speeds(lora.path, cond.path)
    params["speed_source"] = "Speed: training examples/s recorded in each adapter's metrics.json."
    return comparison, params


def _training_speeds(lora: Path, condlora: Path) -> dict[str, float]:
    """Training examples/s recorded in each adapter's metrics.json (``loralens train`` writes it), where present."""
    speeds = {}
    for key, folder in (("lora", lora), ("condlora", condlora)):
        try:
            value = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["examples_per_s"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, (int, float)):
            speeds[key] = float(value)
    return speeds


def _print_written(paths: list[Path]) -> None:
    typer.echo(f"wrote {len(paths)} files to {paths[0].parent}:" if paths else "wrote no files")
    for p in paths:
        typer.echo(f"  {p}")

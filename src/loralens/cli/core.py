"""``loralens conversion``, ``similarity`` and ``demo``: conversion matrices and their layer x layer phi."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import loralens
from loralens.analysis import ModuleConversion, SimilarityReport, compute_conversions, layer_similarity
from loralens.cli._app import (
    AdapterOpt,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    JsonOpt,
    LayerBatchOpt,
    ModulesOpt,
    SideChoice,
    app,
    format_layers,
    format_number,
    load_inputs,
    parse_modules,
    run_settings,
    torch_dtype,
    user_errors,
)
from loralens.examples import default_adapter, default_base
from loralens.io.outputs import json_text, json_writer, safetensors_writer, write_outputs
from loralens.results import conversion_summary, conversion_tensors, provenance


@app.command()
def conversion(
    adapter: AdapterOpt,
    out: Annotated[Path, typer.Option("--out", help="Output folder for conversion.safetensors and conversion.json.")],
    base: BaseOpt = None,
    modules: ModulesOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Compute conversion matrices W^-1 A^T, W^-1 B and W^-1 B A for every layer and write them.

    conversion.safetensors holds '<module>.<A|B|BA>' stacked over layers; conversion.json holds shapes,
    layers, the convention (solve for square W, least squares otherwise), residuals, condition estimates
    and the LoRA scaling. Files are written atomically.
    """
    with user_errors():
        base_ckpt, lora = load_inputs(base, adapter)
        convs = compute_conversions(
            base_ckpt,
            lora,
            modules=parse_modules(modules),
            device=device,
            dtype=torch_dtype(dtype),
            layer_batch=layer_batch,
        )
        summary = conversion_summary(convs, base_ckpt, lora, run_settings(device, dtype))
        paths = write_outputs(
            out,
            {
                "conversion.safetensors": safetensors_writer(
                    conversion_tensors(convs), {"loralens": loralens.__version__}
                ),
                "conversion.json": json_writer(summary),
            },
        )
        if json_output:
            typer.echo(json_text({"outputs": [str(p) for p in paths], **summary}), nl=False)
        else:
            _print_conversion(convs, paths)


@app.command()
def similarity(
    adapter: AdapterOpt,
    base: BaseOpt = None,
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
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random Gaussian baseline.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Layer x layer normalized subspace similarity phi of the conversion matrices (the paper's Figure 1).

    For each module and each of A, B, BA: the L x L matrix phi(conv^l, conv^k), its mean off-diagonal value
    ("average similarity"), and the same for random Gaussian matrices of the same shape beside the exact
    expectation max(i, j) / d. Defaults are the paper's: left singular vectors, i = j = r.
    """
    with user_errors():
        report = _similarity(base, adapter, parse_modules(modules), i, j, side.value, seed, device, dtype, layer_batch)
        if json_output:
            typer.echo(json_text(report.to_dict()), nl=False)
        else:
            _print_similarity(report)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("results/demo"),
    device: DeviceOpt = "auto",
) -> None:
    """Run the main analysis on the embedded default: the real MiniLM base and a real PEFT LoRA adapter
    (r = 8, query + value, trained on Rotten Tomatoes review polarity)."""
    with user_errors():
        adapter = default_adapter()
        base_ckpt, lora = load_inputs(default_base(), adapter)
        convs = compute_conversions(base_ckpt, lora, device=device)
        report = layer_similarity(convs, device=device)
        report.settings.update(run_settings(device, DType.float64), inputs=provenance(base_ckpt, lora))
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
            },
        )
        console = Console()
        console.print(f"Base: {base_ckpt.root}\nAdapter: {adapter}\n")
        _print_similarity(report, console)
        console.print("\nResults written:")
        for p in paths:
            console.print(f"  {p}")


def _similarity(
    base: str | None,
    adapter: Path,
    modules: list[str] | None,
    i: int | None,
    j: int | None,
    side: str,
    seed: int,
    device: str,
    dtype: DType,
    layer_batch: int | None,
) -> SimilarityReport:
    base_ckpt, lora = load_inputs(base, adapter)
    convs = compute_conversions(
        base_ckpt,
        lora,
        modules=modules,
        device=device,
        dtype=torch_dtype(dtype),
        layer_batch=layer_batch,
        with_product=False,
    )
    report = layer_similarity(convs, i=i, j=j, side=side, seed=seed, device=device)  # type: ignore[arg-type]
    report.settings.update(run_settings(device, dtype), inputs=provenance(base_ckpt, lora))
    return report


def _print_conversion(convs: dict[str, ModuleConversion], paths: list[Path]) -> None:
    table = Table(title="Conversion matrices")
    for col in ("module", "layers", "convention", "conv_A", "conv_B", "max residual", "max cond (1-norm)"):
        table.add_column(col)
    for name, mc in convs.items():
        c = mc.conversion
        res = max(float(c.residual_A.max()), float(c.residual_B.max()))
        table.add_row(
            name,
            format_layers(mc.layers),
            c.convention,
            "x".join(map(str, c.A.shape)),
            "x".join(map(str, c.B.shape)),
            f"{res:.1e}",
            f"{float(c.condition.max()):.3g}",
        )
    console = Console()
    console.print(table)
    for p in paths:
        console.print(f"wrote {p}")


def _print_similarity(report: SimilarityReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"Layer x layer subspace similarity phi ({report.settings['side']} singular vectors)")
    for col in (
        "module",
        "factor",
        "layers",
        "i, j",
        "mean phi (off-diag)",
        "random (one draw)",
        "random E=max(i,j)/d",
    ):
        table.add_column(col, justify="right" if col[0] in "mr" else "left")
    for name, factors in report.modules.items():
        for f, s in factors.items():
            table.add_row(
                name,
                f,
                format_layers(report.layers[name]),
                f"{s.i}, {s.j}",
                format_number(s.mean_offdiag),
                format_number(s.random_mean_offdiag),
                f"{s.random_expected:.4f}",
            )
    console.print(table)
    for name, factors in report.modules.items():
        for f, s in factors.items():
            if len(report.layers[name]) > 16:
                continue
            header = "       " + " ".join(f"L{k:<4d}" for k in report.layers[name])
            rows = [
                f"  L{k:<3d} " + " ".join(f"{v:.3f}" for v in row)
                for k, row in zip(report.layers[name], s.phi.tolist(), strict=True)
            ]
            console.print(f"\n{name} / {f}: phi (average similarity {format_number(s.mean_offdiag)})", highlight=False)
            console.print("\n".join([header, *rows]), highlight=False)

"""``loralens overlap``, ``amplification`` and ``spectra``: the LoRA paper's own analyses (Hu et al. 2022, Sec. 7).

Each command loads, calls :mod:`loralens.lowrank_analysis`, and renders: a table, one JSON object (``--json``),
and with ``--out`` a folder holding ``<command>.json`` with a PNG and an SVG figure, written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from loralens.analysis import base_for
from loralens.cli._app import (
    AdapterOpt,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    ForceOpt,
    JsonOpt,
    LayerBatchOpt,
    ModulesOpt,
    app,
    format_number,
    load_inputs,
    parse_modules,
    run_settings,
    torch_dtype,
    user_errors,
)
from loralens.errors import LoralensError
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.outputs import bytes_writer, check_output_folder, json_text, json_writer, sha256_file, write_outputs
from loralens.lowrank_analysis import (
    AmplificationReport,
    OverlapReport,
    SpectraReport,
    amplification_report,
    rank_overlap,
    spectra_report,
)
from loralens.plots.lowrank import amplification_figure, overlap_figure, spectra_figure
from loralens.report import DPI, render_figure
from loralens.results import provenance

OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Also write <command>.json, <command>.png and <command>.svg into this folder (atomically).",
        show_default=False,
    ),
]
DpiOpt = Annotated[int, typer.Option("--dpi", min=72, max=600, help="Resolution of the PNG file.")]


@app.command()
def overlap(
    adapter: Annotated[
        list[Path],
        typer.Option("--adapter", help="Two PEFT LoRA adapters of one base: --adapter X --adapter Y (i indexes X)."),
    ],
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
) -> None:
    """Rank-subspace overlap of two adapters (LoRA paper, Figures 3 and 4): per module and layer the grid
    phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), i <= r1, j <= r2, on the right singular vectors of A
    and the left singular vectors of B. Random subspaces give max(i, j) / d."""
    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force)
        if len(adapter) != 2:
            raise LoralensError(f"overlap compares exactly two adapters (--adapter X --adapter Y); got {len(adapter)}")
        first, second = load_lora_adapter(adapter[0]), load_lora_adapter(adapter[1])
        base_ckpt = base_for(first, base) if base is not None else None
        report = rank_overlap(
            first,
            second,
            base=base_ckpt,
            modules=parse_modules(modules),
            factors=[f.strip() for f in factors.split(",") if f.strip()],
            i=i,
            j=j,
            device=device,
            dtype=torch_dtype(dtype),
        )
        report.settings.update(run_settings(device, dtype), inputs=_identities(first, second, base_ckpt))
        data = report.to_dict()
        _emit(
            data,
            out,
            "overlap",
            lambda: _overlap_figure(report),
            dpi,
            json_output,
            lambda: _print_overlap(report),
            force,
        )


@app.command()
def amplification(
    adapter: AdapterOpt,
    base: BaseOpt = None,
    modules: ModulesOpt = None,
    n_random: Annotated[
        int, typer.Option("--n-random", min=0, help="Random subspace pairs per layer for the baseline.")
    ] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random subspaces.")] = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """How dW relates to W (LoRA paper, Table 7), per module and layer: ||U^T W V||_F for dW's r-dim singular
    subspaces, for W's own top-r ones and for random ones, and the amplification factor ||dW||_F / ||U^T W V||_F.
    """
    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force)
        base_ckpt, lora = load_inputs(base, adapter)
        report = amplification_report(
            base_ckpt,
            lora,
            modules=parse_modules(modules),
            n_random=n_random,
            seed=seed,
            device=device,
            dtype=torch_dtype(dtype),
            layer_batch=layer_batch,
        )
        report.settings.update(run_settings(device, dtype), inputs=provenance(base_ckpt, lora))
        data = report.to_dict()
        _emit(
            data,
            out,
            "amplification",
            lambda: _amplification_figure(report),
            dpi,
            json_output,
            lambda: _print_amplification(report),
            force,
        )


@app.command()
def spectra(
    adapter: AdapterOpt,
    base: BaseOpt = None,
    modules: ModulesOpt = None,
    energy_threshold: Annotated[
        float,
        typer.Option("--energy-threshold", min=0.0, max=1.0, help="Energy effective rank: share of sum sigma^2."),
    ] = 0.9,
    out: OutOpt = None,
    force: ForceOpt = False,
    dpi: DpiOpt = DPI,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Spectra of dW = s B A per module and layer: singular values, entropy and energy effective ranks, and the
    principal angles between dW's column space and W's top-r left singular subspace."""
    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force)
        base_ckpt, lora = load_inputs(base, adapter)
        report = spectra_report(
            base_ckpt,
            lora,
            modules=parse_modules(modules),
            energy_threshold=energy_threshold,
            device=device,
            dtype=torch_dtype(dtype),
            layer_batch=layer_batch,
        )
        report.settings.update(run_settings(device, dtype), inputs=provenance(base_ckpt, lora))
        data = report.to_dict()
        _emit(
            data,
            out,
            "spectra",
            lambda: _spectra_figure(report),
            dpi,
            json_output,
            lambda: _print_spectra(report),
            force,
        )


# ---------------------------------------------------------------------------------------------- rendering


def _emit(
    data: dict[str, Any],
    out: Path | None,
    stem: str,
    figure: Callable[[], Figure],
    dpi: int,
    json_output: bool,
    table: Callable[[], None],
    force: bool = False,
) -> None:
    """Write the folder (if asked), then print JSON or the table (and the written paths)."""
    paths: list[Path] = []
    if out is not None:
        png, svg = render_figure(figure(), dpi)
        paths = write_outputs(
            out,
            {f"{stem}.json": json_writer(data), f"{stem}.png": bytes_writer(png), f"{stem}.svg": bytes_writer(svg)},
            replace=force,
        )
    if json_output:
        typer.echo(json_text({**data, "outputs": [str(p) for p in paths]} if paths else data), nl=False)
        return
    table()
    for p in paths:
        typer.echo(f"wrote {p}")


def _identities(first: LoraAdapter, second: LoraAdapter, base: Any) -> dict[str, Any]:
    if base is not None:
        return {"adapters": [provenance(base, a)["adapter"] for a in (first, second)], **provenance(base, first)}
    return {
        "adapters": [
            {"path": str(a.path), "sha256": sha256_file(a.weights_file), "r": a.config.get("r")}
            for a in (first, second)
        ]
    }


def _overlap_figure(report: OverlapReport) -> Figure:
    grids = {
        f"{name}, {f} ({fo.side})": fo.grid.numpy()
        for name, mo in report.modules.items()
        for f, fo in mo.factors.items()
    }
    layers = next(iter(report.modules.values())).layers
    r1 = sorted({r for mo in report.modules.values() for r in mo.ranks[0]})
    r2 = sorted({r for mo in report.modules.values() for r in mo.ranks[1]})
    return overlap_figure(
        grids,
        labels=layers,
        i_label=f"i (first, r={','.join(map(str, r1))})",
        j_label=f"j (second, r={','.join(map(str, r2))})",
        title=r"Subspace overlap $\varphi(i, j)$ of two adapters (Hu et al. 2022, Fig. 3)",
    )


def _amplification_figure(report: AmplificationReport) -> Figure:
    projections = {
        name: {
            r"$\Delta W$ subspaces": ma.dW_projection.numpy(),
            "W top-r": ma.W_top_projection.numpy(),
            f"random (mean of {ma.random_projection.shape[1]})": ma.random_mean.numpy(),
        }
        for name, ma in report.modules.items()
    }
    if not report.settings.get("n_random"):
        projections = {n: {k: v for k, v in s.items() if not k.startswith("random")} for n, s in projections.items()}
    return amplification_figure(
        projections,
        {name: ma.amplification.numpy() for name, ma in report.modules.items()},
        labels={name: ma.layers for name, ma in report.modules.items()},
        title=r"$\|U^\top W V\|_F$ and amplification $\|\Delta W\|_F / \|U^\top W V\|_F$ (Hu et al. 2022, Table 7)",
    )


def _spectra_figure(report: SpectraReport) -> Figure:
    threshold = report.settings["energy_threshold"]
    return spectra_figure(
        {name: ms.singular_values.numpy() for name, ms in report.modules.items()},
        {name: torch.rad2deg(ms.principal_angles).numpy() for name, ms in report.modules.items()},
        {
            name: {
                "entropy": ms.effective_rank_entropy.numpy(),
                f"energy {threshold:.0%}": ms.effective_rank_energy.numpy(),
            }
            for name, ms in report.modules.items()
        },
        ranks={name: list(ms.ranks) for name, ms in report.modules.items()},
        labels={name: ms.layers for name, ms in report.modules.items()},
        title="Spectra of dW and its column space against W's top-r left singular subspace",
    )


def _print_overlap(report: OverlapReport) -> None:
    table = Table(
        title="Subspace overlap phi(i, j) of two adapters (A: right, B: left singular vectors; k = min(r1, r2); "
        "random: E[phi(k, k)] = k / d)"
    )
    for col in ("module", "factor", "layer", "r1,r2", "phi(1,1)", "phi(k,k)", "phi(r1,r2)", "random(k,k)"):
        table.add_column(col, justify="left" if col in ("module", "factor") else "right")
    for name, mo in report.modules.items():
        for f, fo in mo.factors.items():
            for n, layer in enumerate(mo.layers):
                r1, r2 = (int((~fo.grid[n].isnan()).any(dim=ax).sum()) for ax in (1, 0))
                k = min(r1, r2)
                table.add_row(
                    name,
                    f,
                    str(layer),
                    f"{r1},{r2}",
                    format_number(float(fo.grid[n, 0, 0])),
                    format_number(float(fo.grid[n, k - 1, k - 1])),
                    format_number(float(fo.grid[n, r1 - 1, r2 - 1])),
                    f"{k / fo.dim:.4f}",
                )
    Console().print(table)


def _print_amplification(report: AmplificationReport) -> None:
    table = Table(
        title="||U^T W V||_F for dW's, W's top-r and random r-dim subspaces (mean of the draws; E: r |W| / sqrt(d_out "
        "d_in)); amplification = |dW| / dW (Hu et al. 2022, Table 7; |.| = Frobenius norm)"
    )
    cols = ("module", "layer", "r", "|W|", "|dW|", "dW", "W top-r", "random", "rand. E", "ampl.")
    for col in cols:
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, ma in report.modules.items():
        for n, layer in enumerate(ma.layers):
            table.add_row(
                name,
                str(layer),
                str(ma.ranks[n]),
                *(
                    _g(float(t[n]))
                    for t in (
                        ma.W_norm,
                        ma.dW_norm,
                        ma.dW_projection,
                        ma.W_top_projection,
                        ma.random_mean,
                        ma.random_expected,
                        ma.amplification,
                    )
                ),
            )
    Console().print(table)


def _print_spectra(report: SpectraReport) -> None:
    threshold = report.settings["energy_threshold"]
    table = Table(
        title="Spectra of dW: effective ranks (entropy H, energy share); principal angles (degrees, min-max) and phi "
        "between col(dW) and W's top-r left singular subspace (random: E[phi] = r / d_out)"
    )
    cols = ("module", "layer", "r", "sigma_1", "sigma_r", "erank H", f"erank {threshold:.0%}")
    for col in (*cols, "angles", "phi", "random"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, ms in report.modules.items():
        for n, layer in enumerate(ms.layers):
            r = ms.ranks[n]
            angles = torch.rad2deg(ms.principal_angles[n, :r])
            table.add_row(
                name,
                str(layer),
                str(r),
                _g(float(ms.singular_values[n, 0])),
                _g(float(ms.singular_values[n, r - 1])),
                f"{float(ms.effective_rank_entropy[n]):.2f}",
                str(int(ms.effective_rank_energy[n])),
                f"{float(angles.min()):.0f}-{float(angles.max()):.0f}",
                f"{float(ms.phi_W_top[n]):.3f}",
                f"{r / ms.shape[0]:.3f}",
            )
    Console().print(table)


def _g(x: float) -> str:
    """Three significant digits; ``n/a`` for NaN."""
    return "n/a" if math.isnan(x) else f"{x:.3g}"

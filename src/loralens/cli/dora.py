"""``loralens dora``: DoRA's magnitude and direction changes of an adapter against its base (Liu et al. 2024).

Loads, calls :func:`loralens.analyses.dora.magnitude_direction` (one ``--adapter``) or
:func:`~loralens.analyses.dora.magnitude_direction_series` (several checkpoints of one run), renders: a table, one
JSON object (``--json``), and with ``--out`` a folder holding ``dora.json``, ``dora.png`` and ``dora.svg``, written
atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loralens.analyses.dora import magnitude_direction, magnitude_direction_series
from loralens.cli._app import (
    DPI,
    BaseOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    FinetunedManyOpt,
    FinetunedRankOpt,
    ForceOpt,
    JsonOpt,
    LayerBatchOpt,
    MaxMemoryOpt,
    ModulesOpt,
    QuietOpt,
    app,
    emit_result,
    load_many,
    parse_modules,
    progress_bar,
    torch_dtype,
    user_errors,
)
from loralens.io.outputs import bytes_writer, check_output_folder, json_writer


@app.command(rich_help_panel="Analysis", short_help="DoRA's magnitude and direction changes, dM against dD.")
def dora(
    adapter: Annotated[
        list[Path] | None,
        typer.Option(
            "--adapter",
            help="PEFT LoRA or DoRA adapter folder; repeat for several checkpoints of one run (one series each).",
            show_default=False,
        ),
    ] = None,
    base: BaseOpt = None,
    finetuned: FinetunedManyOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write dora.json, .png and .svg into this folder.", show_default=False),
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    max_memory: MaxMemoryOpt = "2GB",
    layer_batch: LayerBatchOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per module and layer, over the output units n (rows of the weight): dM = mean |m'_n - m0_n| and
    dD = mean (1 - cos(W'_n, W0_n)), m' the DoRA magnitudes (or the row norms of W0 + s B A for LoRA), and the
    least-squares line of dM on dD with its Pearson r (the paper's scatter)."""
    from loralens.render.dora import dora_figure, dora_table
    from loralens.render.report import render_figure

    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force, inputs=[*(adapter or ()), *(finetuned or ()), base])
        mods, dt = parse_modules(modules), torch_dtype(dtype)
        base_ckpt, loras = load_many(base, adapter, finetuned, finetuned_rank, device, mods)
        with progress_bar(quiet) as progress:
            if len(loras) == 1:
                data = magnitude_direction(base_ckpt, loras[0], modules=mods, device=device, dtype=dt,
                                           layer_batch=layer_batch, max_memory=max_memory,
                                           progress=progress).to_dict()  # fmt: skip
            else:
                data = magnitude_direction_series(base_ckpt, loras, modules=mods, device=device, dtype=dt,
                                                  layer_batch=layer_batch, max_memory=max_memory,
                                                  progress=progress).to_dict()  # fmt: skip
        files = None
        if out is not None:
            what = loras[0].path.name if len(loras) == 1 else f"{len(loras)} checkpoints"
            png, svg = render_figure(dora_figure(data, title=f"DoRA magnitude and direction: {what}"), DPI)
            files = {"dora.json": json_writer(data), "dora.png": bytes_writer(png), "dora.svg": bytes_writer(svg)}
        emit_result(
            data,
            dora_table,
            json_output=json_output,
            out=out,
            files=files,
            force=force,
            inputs=[*(adapter or ()), *(finetuned or ()), base],
        )

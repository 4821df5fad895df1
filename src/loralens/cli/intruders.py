"""``loralens intruders``: intruder dimensions of an adapter against its base (Shuttleworth et al. 2024).

Loads, calls :func:`loralens.analyses.intruders.intruder_dimensions`, renders: a table, one JSON object (``--json``),
and with ``--out`` a folder holding ``intruders.json``, ``intruders.png`` and ``intruders.svg``, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loralens.analyses.intruders import DEFAULT_EPSILON, DEFAULT_K, intruder_dimensions
from loralens.cli._app import (
    DPI,
    AdapterOpt,
    BaseOpt,
    CacheDirOpt,
    CacheOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
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
    parse_modules,
    progress_bar,
    torch_dtype,
    user_errors,
)
from loralens.io.outputs import bytes_writer, check_output_folder, json_writer


@app.command(rich_help_panel="Analysis", short_help="Intruder dimensions of W0 + s B A (Shuttleworth et al. 2024).")
def intruders(
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    finetuned: FinetunedOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    modules: ModulesOpt = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Top directions of W0 + s B A examined per layer.")] = DEFAULT_K,
    epsilon: Annotated[
        float,
        typer.Option(
            "--epsilon", min=0.0, max=1.0, help="Intruder: its best |cos| with W0's directions is below this."
        ),
    ] = DEFAULT_EPSILON,
    exact: Annotated[
        bool, typer.Option("--exact", help="Dense SVD of W0 + s B A instead of the top-k engine.")
    ] = False,
    cache: CacheOpt = True,
    cache_dir: CacheDirOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write intruders.json, .png and .svg into this folder.", show_default=False),
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    layer_batch: LayerBatchOpt = None,
    max_memory: MaxMemoryOpt = "2GB",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per module and layer: how many of the top-k left singular vectors of the fine-tuned weight W0 + s B A have
    no counterpart among W0's singular vectors (max |cos| < epsilon), their cosines and singular values, the
    share of the update along them, and the count for every epsilon (a sweep)."""
    from loralens.render.intruders import intruders_figure, intruders_table
    from loralens.render.report import render_figure

    with user_errors():
        if out is not None:
            check_output_folder(out, replace=force, inputs=[adapter, finetuned, base])
        names = parse_modules(modules)
        base_ckpt, lora = load_inputs(base, adapter, finetuned, finetuned_rank, device, names)
        with progress_bar(quiet) as progress:
            data = intruder_dimensions(
                base_ckpt, lora, modules=names, k=k, epsilon=epsilon, exact=exact, cache=cache,
                cache_dir=cache_dir, device=device, dtype=torch_dtype(dtype), layer_batch=layer_batch,
                max_memory=max_memory, progress=progress,
            ).to_dict()  # fmt: skip
        files = None
        if out is not None:
            png, svg = render_figure(intruders_figure(data, title=f"Intruder dimensions: {lora.path.name}"), DPI)
            files = {
                "intruders.json": json_writer(data),
                "intruders.png": bytes_writer(png),
                "intruders.svg": bytes_writer(svg),
            }
        emit_result(
            data, intruders_table, json_output=json_output, out=out, files=files, force=force, inputs=[adapter, base]
        )

"""``loralens zoo``: many adapters of one base compared at once, clustered.

Opens the adapters (``--adapter`` repeated, or ``--adapters-from`` a folder or a glob) without reading their
factors (:func:`~loralens.io.adapters.index_lora_adapter`), calls :func:`loralens.analyses.zoo.adapter_zoo`, which
reads each module-layer's factors of all adapters as it compares them (memory: one layer's factors of all the
adapters, not all of them), renders: a table, one JSON object (``--json``), and with ``--out`` a
folder holding ``zoo.json`` and per module ``zoo-<module>.png`` / ``.svg``, written atomically. No base is read.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated

import typer

from loralens.analyses.zoo import adapter_zoo
from loralens.cli._app import (
    DPI,
    DeviceOpt,
    DType,
    DTypeOpt,
    FinetunedManyOpt,
    FinetunedRankOpt,
    ForceOpt,
    JsonOpt,
    ModulesOpt,
    QuietOpt,
    app,
    emit_result,
    finetune_base,
    parse_modules,
    progress_bar,
    torch_dtype,
    user_errors,
    virtual_adapter,
)
from loralens.errors import InputPathError
from loralens.io.adapters import LoraAdapter, LoraAdapterIndex, index_lora_adapter
from loralens.io.outputs import bytes_writer, check_output_folder, json_writer


@app.command(rich_help_panel="Analysis", short_help="Many adapters of one base: update cosines, phi, clustering.")
def zoo(
    adapter: Annotated[
        list[Path] | None,
        typer.Option("--adapter", help="A PEFT LoRA adapter folder; repeat for each adapter.", show_default=False),
    ] = None,
    adapters_from: Annotated[
        str | None,
        typer.Option(
            "--adapters-from",
            help="A folder whose subfolders holding adapter_config.json are the adapters, or a glob of such folders.",
            show_default=False,
        ),
    ] = None,
    finetuned: FinetunedManyOpt = None,
    finetuned_rank: FinetunedRankOpt = "energy",
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="The base model of the --finetuned models (folder, package or hub name); not read otherwise.",
            show_default=False,
        ),
    ] = None,
    modules: ModulesOpt = None,
    same_base: Annotated[
        bool, typer.Option("--same-base", help="Compare adapters whose configs name their base differently.")
    ] = False,
    block: Annotated[int, typer.Option("--block", min=1, help="Adapters per tile of the N x N computation.")] = 256,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Also write zoo.json and zoo-<module>.png / .svg into this folder.", show_default=False
        ),
    ] = None,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.float64,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per module, for every pair of adapters: the cosine of their updates dW = s B A (per layer and over all
    layers), phi between B's column spaces and between A's row spaces, and an average-linkage clustering on
    1 - cosine with the adapters in dendrogram order."""
    from loralens.render.report import render_figure
    from loralens.render.zoo import zoo_figure, zoo_table

    with user_errors():
        folders = _adapter_folders(adapter or [], adapters_from, also=len(finetuned or ()))
        if out is not None:
            check_output_folder(out, replace=force, inputs=[*folders, *(finetuned or ())])
        adapters: list[LoraAdapter | LoraAdapterIndex] = [index_lora_adapter(f) for f in folders]  # read per layer
        names = parse_modules(modules)
        if finetuned:  # after the adapters, in the order given
            base_ckpt = finetune_base(base)
            adapters += [virtual_adapter(base_ckpt, f, finetuned_rank, device, names) for f in finetuned]
        with progress_bar(quiet) as progress:
            data = adapter_zoo(
                adapters, modules=names, block=block, assume_same_base=same_base, device=device,
                dtype=torch_dtype(dtype), progress=progress,
            ).to_dict()  # fmt: skip
        files = None
        if out is not None:
            files = {"zoo.json": json_writer(data)}
            for module in data["modules"]:
                png, svg = render_figure(zoo_figure(data, module), DPI)
                files |= {f"zoo-{module}.png": bytes_writer(png), f"zoo-{module}.svg": bytes_writer(svg)}
        inputs = [*folders, *(finetuned or ())]
        emit_result(data, zoo_table, json_output=json_output, out=out, files=files, force=force, inputs=inputs)


def _adapter_folders(given: list[Path], pattern: str | None, *, also: int = 0) -> list[Path]:
    """``--adapter`` folders, then those ``--adapters-from`` names (sorted), each once; with ``also`` other inputs
    (``--finetuned``), at least two in all."""
    found: list[Path] = list(given)
    if pattern is not None:
        root = Path(pattern)
        if root.is_dir():
            candidates = sorted(p.parent for p in root.glob("*/adapter_config.json"))
        else:
            # glob.glob, not Path.glob: the pattern may be absolute
            matches = glob.glob(pattern)  # noqa: PTH207
            candidates = sorted(Path(p) for p in matches if (Path(p) / "adapter_config.json").is_file())
        if not candidates:
            raise InputPathError(f"{pattern}: no adapter folders (holding adapter_config.json) there")
        found += candidates
    unique: list[Path] = []
    seen: set[Path] = set()
    for folder in found:  # each folder once, in the order given
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            unique.append(folder)
    if len(unique) + also < 2:
        raise InputPathError(
            "a zoo needs at least two adapters: repeat --adapter, give --adapters-from DIR, or add --finetuned models"
        )
    return unique

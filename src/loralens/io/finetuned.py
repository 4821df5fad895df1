"""Full fine-tunes as inputs: pair the weights of a fine-tuned checkpoint with those of its base.

A full fine-tune is a model folder like a base (any layout :func:`~loralens.io.base_weights.open_base` reads:
``model.safetensors``, sharded, ``pytorch_model.bin`` with ``weights_only=True``, a hub repo id); opening it reads
headers only. Its 2-D weights inside numbered layers (``encoder.layer.3.attention.self.query.weight``) are matched
to the base's by layer and inner path, prefixes allowed to differ as for adapters
(:func:`~loralens.io.keys.match_base_weights`: ``bert.encoder...`` of a classifier fine-tune against
``encoder...`` of the bare base), grouped by module type and named as adapter modules are
(:func:`~loralens.io.keys.module_type_names`). Nothing is read here but the tensors asked for, a layer at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from loralens.errors import InputPathError, ModelMismatchError
from loralens.io.adapters import CONFIG_NAME, conv1d_module
from loralens.io.base_weights import BaseCheckpoint, open_checkpoint
from loralens.io.keys import ModulePath, match_base_weights, module_type_names, parse_module_path

__all__ = ["FinetunedModule", "open_finetuned", "finetuned_modules", "read_weight_pair"]


@dataclass(frozen=True)
class FinetunedModule:
    """One module type of a full fine-tune (e.g. every layer's ``query``) and the base weights it replaces.

    Attributes
    ----------
    name : str
        Short unique name, as an adapter's module would have (``query``).
    paths : tuple of ModulePath
        Per layer, in increasing layer order (the fine-tune's paths).
    finetuned_keys, base_keys : tuple of str
        The weight's key per layer in the fine-tune and in the base.
    shape : tuple of int
        ``(d_out, d_in)`` of the weight as the model applies it.
    transposed : bool
        Both checkpoints store it as ``(d_in, d_out)`` (GPT-2's ``Conv1D``); :func:`read_weight_pair` undoes it.
    """

    name: str
    paths: tuple[ModulePath, ...]
    finetuned_keys: tuple[str, ...]
    base_keys: tuple[str, ...]
    shape: tuple[int, int]
    transposed: bool

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(p.layer for p in self.paths)


def open_finetuned(
    path: str | os.PathLike[str], *, offline: bool | None = None, allow_pickle_download: bool | None = None
) -> BaseCheckpoint:
    """Open a full fine-tune's checkpoint (headers only), refusing a LoRA adapter folder with the reason."""
    folder = Path(path)
    if (folder / CONFIG_NAME).is_file():
        raise InputPathError(
            f"{folder}: this is a LoRA adapter folder ({CONFIG_NAME}), not a full fine-tune; pass it as an adapter"
        )
    return open_checkpoint(
        path, what="fine-tune", option="finetuned", offline=offline, allow_pickle_download=allow_pickle_download
    )


def finetuned_modules(
    base: BaseCheckpoint, finetuned: BaseCheckpoint, modules: Sequence[str] | None = None
) -> dict[str, FinetunedModule]:
    """The module types of ``finetuned`` that replace a weight of ``base``, by name, in a stable order.

    ``modules`` selects by name (as :func:`~loralens.analyses.engine.select_modules` does for adapters);
    default: every 2-D weight inside the numbered layers.

    Raises
    ------
    ModelMismatchError
        The fine-tune has no weight inside numbered layers, a weight the base lacks, or one of another shape;
        an unknown module name.
    """
    by_type: dict[tuple[str, str, str], list[tuple[ModulePath, str]]] = {}
    for key, shape in finetuned.shapes.items():
        path = parse_module_path(key[: -len(".weight")]) if key.endswith(".weight") and len(shape) == 2 else None
        if path is not None:
            by_type.setdefault(path.module_type, []).append((path, key))
    where = str(finetuned.root)
    if not by_type:
        raise ModelMismatchError(f"{where}: no 2-D weights inside numbered layers: not a transformer checkpoint?")
    names = module_type_names(by_type)
    if modules is not None:
        unknown = sorted(set(modules) - set(names.values()))
        if unknown:
            raise ModelMismatchError(
                f"{where}: no module {', '.join(map(repr, unknown))}; it has {', '.join(sorted(names.values()))}",
                option="modules",
            )
    model_type = (base.config or {}).get("model_type")
    out = {}
    for t, entries in sorted(by_type.items(), key=lambda item: names[item[0]]):
        name = names[t]
        if modules is not None and name not in modules:
            continue
        entries.sort()
        paths = tuple(p for p, _ in entries)
        try:
            matched = match_base_weights(paths, base.keys)
        except ModelMismatchError as e:
            raise ModelMismatchError(f"{where}: {e} (a fine-tune of another base?)") from e
        ft_keys = tuple(k for _, k in entries)
        base_keys = tuple(matched[p] for p in paths)
        for fk, bk in zip(ft_keys, base_keys, strict=True):
            if tuple(finetuned.shapes[fk]) != tuple(base.shapes[bk]):
                raise ModelMismatchError(
                    f"{where}: weight {fk!r} is {tuple(finetuned.shapes[fk])} but the base's {bk!r} in {base.root} "
                    f"is {tuple(base.shapes[bk])}: a fine-tune of another base"
                )
        transposed = conv1d_module(model_type, paths[0].tail)
        rows, cols = finetuned.shapes[ft_keys[0]]
        out[name] = FinetunedModule(
            name, paths, ft_keys, base_keys, (cols, rows) if transposed else (rows, cols), transposed
        )
    return out


def read_weight_pair(
    base: BaseCheckpoint, finetuned: BaseCheckpoint, module: FinetunedModule, position: int
) -> tuple[Tensor, Tensor]:
    """``(W0, W_ft)`` of one layer (``position`` in ``module.paths``), ``(d_out, d_in)`` each, as stored dtype,
    memory-mapped where the files allow (nothing copied)."""
    (w0,) = base.read([module.base_keys[position]]).values()
    (wft,) = finetuned.read([module.finetuned_keys[position]]).values()
    return (w0.mT, wft.mT) if module.transposed else (w0, wft)

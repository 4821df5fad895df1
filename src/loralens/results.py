"""Results as files: the tensors and JSON summaries that the CLI writes and notebooks can save.

Builds plain data from analysis results; writing goes through :mod:`loralens.io.outputs`.
"""

from __future__ import annotations

import hashlib
import platform
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import loralens
from loralens.analysis import FACTORS, LEAST_SQUARES_FALLBACK, ModuleConversion, least_squares_layers
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.outputs import sha256_file

__all__ = ["CONVENTIONS", "conversion_summary", "conversion_tensors", "file_record", "provenance"]

#: What each convention means, written into every output that carries conversion matrices.
CONVENTIONS = {
    "solve": "square W (d_out = d_in): conv_A = W^-1 A^T (d_in x r), conv_B = W^-1 B (d_out x r), "
    "conv_BA = conv_B A; W as stored (out, in); one LU per W",
    "lstsq": "non-square W: conv_A solves W^T X = A^T (d_out x r), conv_B solves W X = B (d_in x r), "
    "least squares when over-determined, minimum norm when under-determined; conv_BA = conv_B A",
}


def conversion_tensors(
    conversions: dict[str, ModuleConversion], factors: tuple[str, ...] = FACTORS
) -> dict[str, Tensor]:
    """``{"<module>.<A|B|BA>": (L, rows, cols)}`` stacked over layers, as in ``conversion.safetensors``."""
    return {f"{name}.{f}": mc.matrix(f) for name, mc in conversions.items() for f in factors}


def conversion_summary(
    conversions: dict[str, ModuleConversion],
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    settings: dict[str, Any],
    factors: tuple[str, ...] = FACTORS,
) -> dict[str, Any]:
    """JSON summary: per module shapes (of ``factors``, as written), layers, convention, residuals, condition
    estimates, scaling, and the layers solved by the least-squares fallback (near-singular base weights)."""
    modules = {}
    for name, mc in conversions.items():
        c = mc.conversion
        shapes = {"A": list(c.A.shape), "B": list(c.B.shape), "BA": [*c.B.shape[:-1], mc.A.shape[-1]]}
        modules[name] = {
            "layers": list(mc.layers),
            "base_keys": list(mc.base_keys),
            "convention": c.convention,
            "shapes": {f: shapes[f] for f in factors},  # BA's without forming it
            "ranks": list(mc.ranks),
            "scaling": list(mc.scaling),
            "residual_A": _list(c.residual_A),
            "residual_B": _list(c.residual_B),
            "condition_1norm_estimate": _list(c.condition),
            "least_squares_layers": least_squares_layers(mc),
        }
        dora = adapter.modules[name].magnitude
        if dora is not None:
            modules[name]["dora_magnitude_norm"] = _list(torch.linalg.vector_norm(dora.double(), dim=-1))
    conventions: dict[str, str] = {
        c: CONVENTIONS[c] for c in sorted({mc.conversion.convention for mc in conversions.values()})
    }
    if any(entry["least_squares_layers"] for entry in modules.values()):
        conventions["least_squares_layers"] = LEAST_SQUARES_FALLBACK
    return {"modules": modules, "conventions": conventions, "settings": settings, "inputs": provenance(base, adapter)}


#: Input files up to this size are hashed whole. A larger safetensors file (a shard of a big base) is identified
#: by the SHA-256 of its header (every tensor's name, dtype, shape and byte offsets) and its size instead, so
#: recording provenance never reads a 70B checkpoint end to end.
FULL_HASH_LIMIT = 1 << 30


def file_record(path: Path) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of an input file; ``header_sha256`` instead for large safetensors."""
    size = path.stat().st_size
    record: dict[str, Any] = {"name": path.name, "bytes": size}
    if size <= FULL_HASH_LIMIT:
        record["sha256"] = sha256_file(path)
    else:
        record["sha256"] = None
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                record["header_sha256"] = hashlib.sha256(f.read(n)).hexdigest()
    return record


def provenance(base: BaseCheckpoint, adapter: LoraAdapter) -> dict[str, Any]:
    """Where the numbers come from: paths, SHA-256 of every input file, the adapter's config, versions."""
    base_root = base.root if base.root.is_dir() else base.root.parent
    extra = sorted(p for p in (base_root / "config.json", *base_root.glob("*.index.json")) if p.is_file())
    base_files = [*base.weight_files, *extra]
    return {
        "adapter": {
            "path": str(adapter.path),
            "weights_file": adapter.weights_file.name,
            "sha256": sha256_file(adapter.weights_file),
            "files": [file_record(p) for p in (adapter.path / "adapter_config.json", adapter.weights_file)],
            "peft_type": adapter.config.get("peft_type"),
            "r": adapter.config.get("r"),
            "lora_alpha": adapter.config.get("lora_alpha"),
            "use_rslora": bool(adapter.config.get("use_rslora", False)),
            "use_dora": adapter.is_dora,
            "target_modules": adapter.config.get("target_modules"),
            "base_model_name_or_path": adapter.base_model_name_or_path,
            "ignored_keys": len(adapter.ignored_keys),
        },
        "base": {"path": str(base.root), "files": [file_record(p) for p in base_files]},
        "versions": {"loralens": loralens.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def _list(t: Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]

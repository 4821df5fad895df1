"""Where the numbers come from: input files by path, size and SHA-256, the adapter's config, the versions.

An input named by a hub repo id also records ``"hub": {"repo_id", "revision", "commit_hash"}`` (the revision asked
for, ``main`` by default, and the commit it resolved to), beside the SHA-256 of its files.
"""

from __future__ import annotations

import hashlib
import platform
import struct
from pathlib import Path
from typing import Any

import torch

import loralens
from loralens.io.adapters import LoraAdapter
from loralens.io.base_weights import BaseCheckpoint
from loralens.io.hub import hub_ref_of
from loralens.io.outputs import sha256_file

__all__ = [
    "FULL_HASH_LIMIT",
    "adapter_record",
    "file_record",
    "pair_provenance",
    "provenance",
]

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
    # a hub base downloads shards on first read: the files not read (and not cached) are not recorded
    base_files = [p for p in (*base.weight_files, *extra) if p.is_file()]
    base_record: dict[str, Any] = {"path": str(base.root), "files": [file_record(p) for p in base_files]}
    hub = base.hub or hub_ref_of(base.root)
    if hub is not None:
        base_record["hub"] = hub.record()
    return {
        "adapter": adapter_record(adapter),
        "base": base_record,
        "versions": {"loralens": loralens.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def adapter_record(adapter: LoraAdapter) -> dict[str, Any]:
    """The ``"adapter"`` entry of :func:`provenance`: its path, files with their SHA-256, and its config; ``"hub"``
    for an adapter from a hub repo."""
    hub = hub_ref_of(adapter.path)
    full = adapter.config.get("loralens_full_finetune")
    if full is not None:  # a virtual adapter (loralens.analyses.finetuned): the fine-tune's files, not PEFT's
        config_file = adapter.path / "config.json"
        files = [*map(Path, full["weight_files"]), *([config_file] if config_file.is_file() else [])]
        return {
            "path": str(adapter.path),
            "full_finetune": full,
            "files": [file_record(p) for p in files],
            "target_modules": adapter.config.get("target_modules"),
            "base_model_name_or_path": adapter.base_model_name_or_path,
            **({"hub": hub.record()} if hub is not None else {}),
        }
    return {
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
        **({"hub": hub.record()} if hub is not None else {}),
    }


def pair_provenance(first: LoraAdapter, second: LoraAdapter, base: BaseCheckpoint | None = None) -> dict[str, Any]:
    """Inputs of an analysis of two adapters (:func:`loralens.analyses.lowrank.rank_overlap`): ``{"adapters":
    [record, record], **provenance(base, first)}`` with a base, else ``{"adapters": [{"path", "sha256", "r"},
    ...]}``. Each file is hashed once."""
    if base is not None:
        inputs = provenance(base, first)
        return {"adapters": [inputs["adapter"], adapter_record(second)], **inputs}
    adapters = (first, second)
    return {
        "adapters": [
            {"path": str(a.path), "sha256": sha256_file(a.weights_file), "r": a.config.get("r")} for a in adapters
        ]
    }

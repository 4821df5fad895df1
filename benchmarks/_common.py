"""Shared pieces of the scale-and-speed benchmarks: machine facts, GEMM rate, timing, synthetic checkpoints, tables.

Synthetic checkpoints hold only what an analysis reads: the adapted base weights (random Gaussian, scaled
1/sqrt(d), as stored by ``save_pretrained``: half precision, sharded, with ``model.safetensors.index.json``) and a
PEFT-format LoRA adapter of them (``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    config = torch.__config__.show()
    blas = ", ".join(m for m in re.findall(r"(?:BLAS|LAPACK)_INFO=\w+", config))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "torch": torch.__version__,
        "blas": blas,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], repeat: int = 1, device: str | torch.device = "cpu") -> float:
    """Best wall-clock seconds of ``repeat`` calls (the least disturbed by other load)."""
    return best_times(fn, repeat, device)[0]


def best_times(fn: Callable[[], Any], repeat: int = 1, device: str | torch.device = "cpu") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the fastest of ``repeat`` calls."""
    best = (float("inf"), float("inf"))
    for _ in range(max(1, repeat)):
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best


def gemm_gflops(d: int, dtype: torch.dtype, device: str = "cpu", repeat: int = 3) -> float:
    """Achieved GFLOP/s of one d x d x d matrix product: the machine's practical limit for dense linear algebra."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(d, d, dtype=dtype, device=device, generator=gen)
    b = torch.randn(d, d, dtype=dtype, device=device, generator=gen)
    a @ b  # warm-up
    return 2 * d**3 / best_time(lambda: a @ b, repeat, device) / 1e9


def lu_flops(layers: int, d: int) -> float:
    """FLOPs of LU factorisations of ``layers`` d x d matrices: 2/3 d^3 each."""
    return layers * 2 / 3 * d**3


def run_cli(args: Sequence[str | Path], cwd: Path | None = None) -> dict[str, Any]:
    """Run ``python -m loralens ARGS``: wall seconds, CPU seconds, peak resident memory (bytes), stdout.

    The peak is the child's own high-water mark (``VmHWM``), polled while it runs: ``ru_maxrss`` from ``wait4``
    would include this (large) parent's memory, which Linux carries into a child across fork and exec.
    """
    cmd = [sys.executable, "-m", "loralens", *map(str, args)]
    peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, text=True)
        status_file = Path(f"/proc/{proc.pid}/status")
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                hwm = next(ln for ln in status_file.read_text().splitlines() if ln.startswith("VmHWM:"))
                peak = max(peak, int(hwm.split()[1]) * 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": peak,
        "stdout": stdout,
        "command": cmd,
    }


def llama_checkpoint(
    folder: Path,
    *,
    layers: int,
    d: int,
    r: int,
    modules: Sequence[str] = ("q_proj", "v_proj"),
    base_dtype: torch.dtype = torch.float16,
    shard_bytes: int = 2 * 10**9,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a Llama-shaped base (only the adapted ``(d, d)`` weights, sharded, with an index) and a LoRA adapter.

    Returns (base folder, adapter folder). Reuses folders a previous call completed (marked by ``.complete``).
    """
    base, adapter = folder / "base", folder / "adapter"
    if (folder / ".complete").is_file():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    keys = [f"model.layers.{layer}.self_attn.{m}.weight" for layer in range(layers) for m in modules]
    per_tensor = d * d * torch.empty((), dtype=base_dtype).element_size()
    per_shard = max(1, shard_bytes // per_tensor)
    shards = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for n, shard_keys in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        # Gaussian / sqrt(d) + 3 I: singular values in [1, 5], so every layer is well conditioned even for
        # float32 (the values do not change the cost of an LU). A plain Gaussian of this size has cond_1 ~ 1e6
        # and now and then a layer past 1 / eps32, which loralens would solve by least squares in float32.
        tensors = {k: (torch.randn(d, d, generator=gen) / d**0.5 + 3 * torch.eye(d)).to(base_dtype) for k in shard_keys}
        save_file(tensors, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, name))
        del tensors
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": per_tensor * len(keys)}, "weight_map": weight_map}, indent=2)
    )
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d}
    config |= {"num_hidden_layers": layers, "num_attention_heads": max(1, d // 128), "torch_dtype": str(base_dtype)[6:]}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    lora = {}
    for layer in range(layers):
        for m in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=gen) / d**0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(d, r, generator=gen) * 0.01  # random-initialised B
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(lora_config(r, list(modules), str(base)), indent=2))
    (folder / ".complete").write_text("")
    return base, adapter


def lora_config(r: int, targets: list[str], base: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "base_model_name_or_path": base,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def warm_page_cache(folder: Path) -> None:
    """Read every file once so that timings measure memory-speed reads, not the disk (stated in the README)."""
    for p in sorted(folder.rglob("*.safetensors")):
        with p.open("rb") as f:
            while f.read(1 << 24):
                pass


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table: ``columns`` is (key, header); floats are printed with 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (_, h) in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths]), *(line(b) for b in body)])


def write_json(path: Path | None, obj: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=str) + "\n")

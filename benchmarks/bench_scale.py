"""Scale: ``loralens similarity`` at LLM size against the LU limit; the cost curve; peak memory; float32 error.

Parts (any combination; default ``--case --precision``):

``--case``       The Llama-7B-shaped case: 32 layers, q_proj + v_proj 4096 x 4096, r = 16, base written as sharded
                 fp16 safetensors with an index (only those 64 tensors, 2.1 GB) plus a PEFT adapter. Measures, in one
                 run: reading the 64 tensors (safetensors, page cache warm), ``torch.linalg.lu_factor`` on the same
                 stacked weights at the same dtype, and the whole ``loralens similarity ... --json`` command as a
                 subprocess (wall time, peak RSS). The target: command <= 1.3 x (lu_factor + read).
``--grid``       The same measurement over d x L (``--grid-dims``, ``--grid-layers``); points whose estimated cost
                 exceeds ``--point-budget`` seconds are skipped and listed with the reason.
``--precision``  float32 vs float64 on the real MiniLM base and the embedded default adapter: conversion-matrix
                 and phi errors.

    .venv/bin/python benchmarks/bench_scale.py --case --dtype float32 --json results/bench_scale.json
    .venv/bin/python benchmarks/bench_scale.py --grid --grid-dims 768,2048,4096 --grid-layers 12,32,80
    .venv/bin/python benchmarks/bench_scale.py --case --layers 4 --dim 1024     # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812

import loralens  # noqa: E402
from loralens.analyses.conversion import compute_conversions
from loralens.analyses.engine import layers_per_batch, parse_memory_size
from loralens.analyses.similarity import layer_similarity
from loralens.io.base_weights import open_base  # noqa: E402

MODULES = ("q_proj", "v_proj")


def measure_point(
    layers: int,
    d: int,
    *,
    r: int,
    dtype: str,
    base_dtype: str,
    max_memory: str,
    device: str,
    repeat: int,
    workdir: Path,
    keep: bool,
) -> dict[str, Any]:
    """Read, lu_factor and the CLI on one synthetic checkpoint; all in this run, on the same files."""
    folder = workdir / f"llama-L{layers}-d{d}-r{r}-{base_dtype}"
    t_build = C.best_time(
        lambda: C.llama_checkpoint(folder, layers=layers, d=d, r=r, base_dtype=C.DTYPES[base_dtype], modules=MODULES)
    )
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    C.warm_page_cache(base_dir)
    base = open_base(base_dir)
    compute = C.DTYPES[dtype]
    budget = parse_memory_size(max_memory)
    keys = {m: [f"model.layers.{layer}.self_attn.{m}.weight" for layer in range(layers)] for m in MODULES}
    step = layers_per_batch(
        d, d, max_memory=budget, stored_dtype=C.DTYPES[base_dtype], dtype=compute, rhs_columns=2 * r
    )
    batches = [(m, ks[i : i + step]) for m, ks in keys.items() for i in range(0, len(ks), step)]

    def read(ks: list[str]) -> torch.Tensor:  # plain safetensors: memory-mapped tensors stacked into memory
        by_file: dict[Path, list[str]] = {}
        for k in ks:
            by_file.setdefault(base.files[k], []).append(k)
        tensors = {}
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                tensors |= {k: f.get_tensor(k) for k in names}
        return torch.stack([tensors[k] for k in ks])

    def read_all() -> None:
        for _, ks in batches:
            read(ks).to(device)

    def lu_all() -> tuple[float, float]:  # (wall, CPU) seconds inside lu_factor only
        wall = cpu = 0.0
        for _, ks in batches:
            W = read(ks).to(device=device, dtype=compute)
            w, c = C.best_times(lambda W=W: torch.linalg.lu_factor(W), 1, device)
            wall, cpu = wall + w, cpu + c
            del W
        return wall, cpu

    t_read, cpu_read = C.best_times(read_all, repeat, device)
    t_lu, cpu_lu = min(lu_all() for _ in range(max(1, repeat)))
    args = ["similarity", "--base", base_dir, "--adapter", adapter_dir, "--json", "--quiet"]
    args += ["--device", device, "--dtype", dtype, "--max-memory", max_memory]
    runs = [C.run_cli(args) for _ in range(max(1, repeat))]
    best = min(runs, key=lambda x: x["seconds"])
    out = json.loads(best["stdout"])
    phi_mean = out["modules"]["q_proj"]["A"]["mean_offdiag"]
    startup = min(C.run_cli(["--help"])["seconds"] for _ in range(2))
    flops = C.lu_flops(len(MODULES) * layers, d)
    gemm = C.gemm_gflops(min(d, 4096), compute, device)
    point = {
        "layers": layers,
        "d": d,
        "r": r,
        "dtype": dtype,
        "base_dtype": base_dtype,
        "device": device,
        "max_memory": max_memory,
        "layers_per_batch": step,
        "checkpoint_gb": C.folder_bytes(base_dir) / 1e9,
        "build_s": t_build,
        "read_s": t_read,
        "lu_factor_s": t_lu,
        "loralens_s": best["seconds"],
        "startup_s": startup,
        "ratio": best["seconds"] / (t_lu + t_read),
        "ratio_without_startup": (best["seconds"] - startup) / (t_lu + t_read),
        "read_cpu_s": cpu_read,
        "lu_factor_cpu_s": cpu_lu,
        "loralens_cpu_s": best["cpu_seconds"],
        "cpu_ratio": best["cpu_seconds"] / (cpu_lu + cpu_read),
        "peak_rss_gb": max(x["peak_rss_bytes"] for x in runs) / 1e9,
        "gemm_gflops": gemm,
        "lu_gflops": flops / t_lu / 1e9,
        "loralens_gflops": flops / best["seconds"] / 1e9,
        "q_proj_A_mean_phi": phi_mean,
        "command": " ".join(map(str, ["loralens", *args])),
    }
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return point


def estimate_seconds(layers: int, d: int, dtype: str, gemm: dict[str, float]) -> float:
    """Rough cost of one grid point: LU at ~60% of the GEMM rate, times ~3.5 for read + lu_factor + CLI runs."""
    return 3.5 * C.lu_flops(len(MODULES) * layers, d) / (0.6 * gemm[dtype] * 1e9) + 2 * layers * d * d * 2 / 3e8


def precision() -> list[dict[str, Any]]:
    """float32 vs float64 on the real MiniLM base with the embedded default adapter."""
    adapter = loralens.load_lora_adapter(loralens.examples.default_adapter())
    base = loralens.base_for(adapter, loralens.examples.default_base())
    c64 = compute_conversions(base, adapter, device="cpu", dtype=torch.float64)
    c32 = compute_conversions(base, adapter, device="cpu", dtype=torch.float32)
    r64, r32 = layer_similarity(c64), layer_similarity(c32)
    rows = []
    for name in c64:
        row: dict[str, Any] = {"module": name, "max_cond_1norm": float(c64[name].conversion.condition.max())}
        for f in ("A", "B"):
            x64, x32 = c64[name].matrix(f), c32[name].matrix(f).double()
            err = torch.linalg.matrix_norm(x32 - x64) / torch.linalg.matrix_norm(x64)
            row[f"conv_{f}_rel_err"] = float(err.max())
        for f in ("A", "B", "BA"):
            row[f"phi_{f}_max_abs_err"] = float((r32.modules[name][f].phi - r64.modules[name][f].phi).abs().max())
        rows.append(row)
    return rows


POINT_COLUMNS = [
    ("d", "d"),
    ("layers", "L"),
    ("dtype", "dtype"),
    ("layers_per_batch", "batch"),
    ("checkpoint_gb", "ckpt GB"),
    ("read_s", "read s"),
    ("lu_factor_s", "lu_factor s"),
    ("loralens_s", "loralens s"),
    ("ratio", "ratio"),
    ("ratio_without_startup", "ratio-startup"),
    ("cpu_ratio", "CPU ratio"),
    ("peak_rss_gb", "peak RSS GB"),
    ("lu_gflops", "LU GF/s"),
    ("loralens_gflops", "ours GF/s"),
    ("gemm_gflops", "GEMM GF/s"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="store_true", help="the Llama-7B-shaped case (--layers, --dim)")
    p.add_argument("--grid", action="store_true", help="the cost curve over --grid-dims x --grid-layers")
    p.add_argument("--precision", action="store_true", help="float32 vs float64 on real MiniLM")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--base-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--grid-dims", default="768,2048,4096")
    p.add_argument("--grid-layers", default="12,32,80")
    p.add_argument("--grid-dtypes", default="float32")
    p.add_argument("--point-budget", type=float, default=900.0, help="skip grid points estimated above this (s)")
    p.add_argument("--max-memory", default="2GB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loralens-bench"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if not (a.case or a.grid or a.precision):
        a.case = a.precision = True

    result: dict[str, Any] = {"machine": C.machine(), "command": " ".join(sys.argv)}
    print(json.dumps(result["machine"], indent=2))
    common = {
        "r": a.rank,
        "base_dtype": a.base_dtype,
        "max_memory": a.max_memory,
        "device": a.device,
        "repeat": a.repeat,
        "workdir": a.workdir,
        "keep": a.keep,
    }
    if a.case:
        point = measure_point(a.layers, a.dim, dtype=a.dtype, **common)
        result["case"] = point
        print(f"\nLlama-shaped case: {a.layers} layers x {MODULES}, {a.dim} x {a.dim}, r = {a.rank}")
        print(C.table([point], POINT_COLUMNS))
        print(f"command: {point['command']}")
    if a.grid:
        dims = [int(x) for x in a.grid_dims.split(",")]
        layer_counts = [int(x) for x in a.grid_layers.split(",")]
        dtypes = a.grid_dtypes.split(",")
        gemm = {dt: C.gemm_gflops(2048, C.DTYPES[dt], a.device) for dt in dtypes}
        points, skipped = [], []
        for dt in dtypes:
            for d in dims:
                for L in layer_counts:
                    est = estimate_seconds(L, d, dt, gemm)
                    if est > a.point_budget:
                        skipped.append({"d": d, "layers": L, "dtype": dt, "reason": f"estimated {est:.0f} s > budget"})
                        print(f"skip d={d} L={L} {dt}: estimated {est:.0f} s > --point-budget {a.point_budget:.0f}")
                        continue
                    print(f"measuring d={d} L={L} {dt} (estimated {est:.0f} s) ...", flush=True)
                    points.append(measure_point(L, d, dtype=dt, **common))
                    print(C.table(points[-1:], POINT_COLUMNS), flush=True)
        result["grid"] = {"points": points, "skipped": skipped, "gemm_gflops_2048": gemm}
        print("\nCost curve (LU ~ L d^3; phi ~ L^2 r^2 d, negligible):")
        print(C.table(points, POINT_COLUMNS))
        for s in skipped:
            print(f"skipped: d={s['d']} L={s['layers']} {s['dtype']}: {s['reason']}")
    if a.precision:
        rows = precision()
        result["precision"] = rows
        print("\nfloat32 vs float64, real MiniLM base + embedded default adapter (max over layers):")
        cols = [("module", "module"), ("max_cond_1norm", "max cond_1(W)")]
        cols += [(f"conv_{f}_rel_err", f"conv_{f} rel err") for f in ("A", "B")]
        cols += [(f"phi_{f}_max_abs_err", f"phi_{f} |err|") for f in ("A", "B", "BA")]
        print(C.table(rows, cols))
    C.write_json(a.json, result)


if __name__ == "__main__":
    main()

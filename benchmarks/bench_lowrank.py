"""amplification, spectra and intruders against similarity (#15): dense (--exact) vs the top-r engine, cold and warm
spectral cache, on a Llama-shaped synthetic case; plus a cost model for the 7B shape.

    .venv/bin/python benchmarks/bench_lowrank.py --layers 12 --dim 2048 --r 16 --json results/bench_lowrank.json

Every command runs as a subprocess (``python -m loralens <command> ... --json --device cpu``, start-up included),
one after another in one run, so that the ratios to ``similarity`` compare runs under the same load. The base is
synthetic (only the adapted ``q_proj`` / ``v_proj`` weights, fp16, one safetensors file per 2 GB): ``--spectrum
spiked`` (default) is a Gaussian bulk ``G / sqrt(d)`` (singular values in [0, 2]) plus 32 orthogonal outlier
directions with singular values from 24 down to 3, like the outliers of trained attention weights, so W's top-16
are separated by a few per cent; ``--spectrum shifted`` is ``_common.llama_checkpoint``'s ``G / sqrt(d) + 3 I``,
whose top singular values lie within 0.1 % of each other: the engine's worst case (it then needs about half of
``R^d`` as its Krylov basis and is no faster than the dense SVD).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812


def spiked_checkpoint(folder: Path, *, layers: int, d: int, r: int, seed: int = 0) -> tuple[Path, Path]:
    """Base (fp16, ``model.layers.N.self_attn.{q,v}_proj.weight``) with a Gaussian bulk plus 32 outliers, and a
    PEFT-format adapter (random A, small random B)."""
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    spikes = torch.linspace(24.0, 3.0, 32)
    weights, lora = {}, {}
    for layer in range(layers):
        for m in ("q_proj", "v_proj"):
            Us = torch.linalg.qr(torch.randn(d, 32, generator=gen)).Q
            Vs = torch.linalg.qr(torch.randn(d, 32, generator=gen)).Q
            W = torch.randn(d, d, generator=gen) / d**0.5 + (Us * spikes) @ Vs.T
            weights[f"model.layers.{layer}.self_attn.{m}.weight"] = W.half()
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=gen) / d**0.5
            lora[f"{prefix}.lora_B.weight"] = torch.randn(d, r, generator=gen) * 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d}
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(C.lora_config(r, ["q_proj", "v_proj"], str(base))))
    return base, adapter


def engine_products(base: Path, k: int) -> dict[str, Any]:
    """Krylov iterations and products of the engine on the first two weights (in-process, float64)."""
    from loralens.core.spectral import top_singular_triplets, weight_operator
    from loralens.io.base_weights import open_base

    ckpt = open_base(base)
    keys = sorted(ckpt.keys)[:2]
    W = torch.stack([t.double() for t in ckpt.read(keys).values()])
    start = time.perf_counter()
    res = top_singular_triplets(weight_operator(W), k)
    return {"iterations": res.iterations, "products": res.products, "method": res.method,
            "seconds_two_weights": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--spectrum", choices=["spiked", "shifted"], default="spiked")
    p.add_argument("--commands", default="similarity,amplification,spectra,intruders")
    p.add_argument(
        "--ways",
        default="dense,engine,cold,warm",
        help="which of dense (--exact), engine (no cache), cold and warm (spectral cache) to run; at the 7B width "
        "the dense SVDs alone take tens of minutes here",
    )
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loralens-bench-lowrank-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.spectrum == "spiked":
        base, adapter = spiked_checkpoint(work / "case", layers=args.layers, d=args.dim, r=args.r)
    else:
        base, adapter = C.llama_checkpoint(work / "case", layers=args.layers, d=args.dim, r=args.r)
    C.warm_page_cache(base)
    common = ["--base", base, "--adapter", adapter, "--json", "--device", "cpu"]
    commands = args.commands.split(",")
    rows: list[dict[str, Any]] = []

    def run(command: str, way: str, *extra: str | Path) -> None:
        out = C.run_cli([command, *common, *extra])
        row = {"command": command, "way": way, "seconds": out["seconds"], "cpu_seconds": out["cpu_seconds"]}
        row |= {"peak_rss_gb": out["peak_rss_bytes"] / 1e9, "argv": " ".join(map(str, out["command"][1:]))}
        rows.append(row)
        print(f"{command:14s} {way:22s} {out['seconds']:8.2f} s", flush=True)

    startup = min(C.run_cli(["--help"])["seconds"] for _ in range(2))
    print(f"start-up (loralens --help): {startup:.2f} s", flush=True)
    run("similarity", "-", "--quiet", "--max-memory", "2GB")
    for command in [c for c in commands if c != "similarity"]:
        cache = work / f"cache-{command}"
        budget = ("--max-memory", "2GB")
        ways = set(args.ways.split(","))
        if "dense" in ways:
            run(command, "dense (--exact)", "--exact", "--no-cache", *budget)
        if "engine" in ways:
            run(command, "engine, no cache", "--no-cache", *budget)
        if "cold" in ways:
            run(command, "engine, cache cold", "--cache-dir", cache, *budget)
        if "warm" in ways:  # after a cold run (or an earlier one with this --workdir) has filled the cache
            run(command, "engine, cache warm", "--cache-dir", cache, *budget)
    sim = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_similarity"] = row["seconds"] / sim
    probe = engine_products(base, args.r)
    # Cost model for the 7B shape (d = 4096, 32 layers x q, v), from this run: similarity and the dense SVDs grow as
    # L d^3, the engine as L d^2 m (m: its products per matrix, set by the spectrum's gaps, not by d), a warm cache
    # as the reads (L d^2). Start-up (``loralens --help``) is taken off before scaling and added back after.
    n_here, n_7b, d_here = 2 * args.layers, 64, args.dim
    cube, square = n_7b / n_here * (4096 / d_here) ** 3, n_7b / n_here * (4096 / d_here) ** 2
    sim_7b = startup + max(sim - startup, 0.0) * cube
    model = {}
    for row in rows:
        grow = cube  # dense SVDs; intruders' cold W0 SVD
        if "warm" in row["way"] or ("engine" in row["way"] and row["command"] != "intruders"):
            grow = square
        model[f"{row['command']} {row['way']}"] = (startup + max(row["seconds"] - startup, 0.0) * grow) / sim_7b
    report = {"machine": C.machine(), "case": vars(args) | {"workdir": str(work)}, "startup_seconds": startup}
    report |= {"rows": rows, "engine_probe": probe, "model_7b_ratio_to_similarity": model}
    cols = [("command", "command"), ("way", "way"), ("seconds", "s"), ("ratio_to_similarity", "x similarity"),
            ("cpu_seconds", "CPU s"), ("peak_rss_gb", "peak GB")]  # fmt: skip
    print(C.table(rows, cols))
    print("engine probe (2 weights):", probe)
    print("7B cost model, x similarity:", json.dumps(model, indent=1))
    C.write_json(args.json, report)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

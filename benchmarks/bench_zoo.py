"""Many adapters compared at once (``adapter_zoo``): factored against dense, and against the machine's limit.

The adapters: ``--adapters`` perturbations of the embedded default (real PEFT LoRA on MiniLM, r = 8, query + value,
6 layers of 384 x 384), written as PEFT folders (as in ``bench_many_adapters.py``). Measured in one run:

  load         ``load_lora_adapter`` for every folder
  factored     ``adapter_zoo``: cosines from ``tr((B_i^T B_j)(A_j A_i^T))`` and phi of B's / A's bases, in tiles
  dense        the naive way: form every ``dW = s B A`` (d x d), flatten, one Gram matrix per layer and module
               (cosines only); run for ``--dense-max`` adapters and scaled by ``(N / dense_max)^2`` to N
  limit        the cosine part's floating-point work divided by the machine's GEMM rate (``gemm_gflops``)

    .venv/bin/python benchmarks/bench_zoo.py --adapters 1000 --json results/bench_zoo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812
from bench_many_adapters import make_adapters  # noqa: E402

from loralens.analyses.zoo import adapter_zoo  # noqa: E402
from loralens.io.adapters import load_lora_adapter  # noqa: E402


def dense_cosines(adapters: list[Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The naive way: every dW formed and flattened; (L, N, N) cosines per module."""
    out = {}
    for name in adapters[0].modules:
        per_layer = []
        for layer in range(len(adapters[0].modules[name].layers)):
            D = torch.stack(
                [
                    (a.modules[name].B[layer].to(dtype) @ a.modules[name].A[layer].to(dtype)).flatten()
                    * float(a.modules[name].scaling[layer])
                    for a in adapters
                ]
            )
            G = D @ D.T
            n = G.diagonal().sqrt()
            per_layer.append(G / n[:, None] / n[None, :])
        out[name] = torch.stack(per_layer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--dense-max", type=int, default=200, help="adapters for the dense way (scaled to N)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dtype = C.DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp), args.adapters, noise=1.0)
        t0 = time.perf_counter()
        adapters = [load_lora_adapter(f) for f in folders]
        load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    zoo = adapter_zoo(adapters, block=args.block, device="cpu", dtype=dtype)
    factored_s = time.perf_counter() - t0
    m = min(args.dense_max, args.adapters)
    t0 = time.perf_counter()
    dense = dense_cosines(adapters[:m], dtype)
    dense_s = time.perf_counter() - t0
    agree = max(float((dense[name] - zoo.modules[name].cosine[:, :m, :m].to(dtype)).abs().max()) for name in dense)
    # floating-point work of the cosine part: per module and layer 2 Gram products of (d x R)^T (d x R)
    R = sum(int(a.modules[n].ranks[0]) for a in adapters for n in ["value"])
    d_out, d_in = adapters[0].modules["value"].shape
    layers = sum(len(adapters[0].modules[n].layers) for n in adapters[0].modules)
    flop = layers * (d_out + d_in) * R * R  # symmetric tiles: half of 2 (d_out + d_in) R^2
    gflops = C.gemm_gflops(2048, dtype)
    result = {
        "machine": C.machine(),
        "adapters": args.adapters,
        "dtype": args.dtype,
        "block": args.block,
        "load_s": round(load_s, 2),
        "factored_s": round(factored_s, 2),
        "dense_s_measured": round(dense_s, 2),
        "dense_adapters": m,
        "dense_s_scaled_to_n": round(dense_s * (args.adapters / m) ** 2, 1),
        "max_abs_cosine_difference_dense_vs_factored": agree,
        "cosine_gflop": round(flop / 1e9, 1),
        "gemm_gflops": round(gflops, 1),
        "cosine_limit_s": round(flop / 1e9 / gflops, 2),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

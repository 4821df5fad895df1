"""Many adapters compared at once (``adapter_zoo``): factored against dense, and against the machine's limit.

The adapters: ``--adapters`` perturbations of the embedded default (real PEFT LoRA on MiniLM, r = 8, query + value,
6 layers of 384 x 384), written as PEFT folders (as in ``bench_many_adapters.py``). Measured in one run:

  load         ``load_lora_adapter`` for every folder
  factored     ``adapter_zoo`` of the loaded adapters: cosines from ``tr((B_i^T B_j)(A_j A_i^T))`` and phi of B's /
               A's bases, in tiles
  streamed     ``adapter_zoo`` of the folders (what ``loralens zoo`` does): index each, read a layer of all at a time
  dense        the naive way: form every ``dW = s B A`` (d x d), flatten, one Gram matrix per layer and module
               (cosines only); run for ``--dense-max`` adapters and scaled by ``(N / dense_max)^2`` to N
  limit        the cosine part's floating-point work divided by the machine's GEMM rate (``gemm_gflops``)

    .venv/bin/python benchmarks/bench_zoo.py --adapters 1000 --json results/bench_zoo.json

``--memory`` measures instead the peak memory of the zoo (#16), each variant in a fresh process on the same folders
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: tracemalloc does not see torch's tensors):

  loaded       every adapter loaded whole (``load_lora_adapter``), then ``adapter_zoo``
  streamed     the folders given to ``adapter_zoo``, indexed (``index_lora_adapter``): each module-layer's factors
               of all adapters read when that layer is compared, then dropped (what ``loralens zoo`` does)

reported as the peak resident set, that after the imports (interpreter, torch, loralens), and their difference.

    .venv/bin/python benchmarks/bench_zoo.py --memory --adapters 1000 --json results/bench_zoo_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
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
from loralens.io.adapters import index_lora_adapter, load_lora_adapter  # noqa: E402

VARIANTS = ("loaded", "streamed")


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run_variant(variant: str, folders: list[Path], block: int, dtype: torch.dtype) -> dict[str, Any]:
    """One variant of the zoo in this (fresh) process: its time and peak memory."""
    before = peak_rss_mib()
    t0 = time.perf_counter()
    adapters: list[Any] = (
        [load_lora_adapter(f) for f in folders] if variant == "loaded" else [index_lora_adapter(f) for f in folders]
    )
    zoo = adapter_zoo(adapters, block=block, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - t0
    checksum = sum(float(m.cosine_overall.nansum()) for m in zoo.modules.values())
    peak = peak_rss_mib()
    return {
        "variant": variant,
        "seconds": round(seconds, 2),
        "rss_after_imports_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_over_imports_mib": round(peak - before, 1),
        "cosine_overall_checksum": checksum,
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Both variants, each in a fresh interpreter on the same adapter folders, and the bound the streamed one has."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp), args.adapters, noise=1.0)
        listing = Path(tmp) / "folders.json"
        listing.write_text(json.dumps([str(f) for f in folders]))
        runs = []
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant, "--folders", str(listing),
                       "--block", str(args.block), "--dtype", args.dtype]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout))
        first = load_lora_adapter(folders[0])
    itemsize = torch.empty((), dtype=C.DTYPES[args.dtype]).element_size()
    stored = first.modules[next(iter(first.modules))].A.element_size()
    per_layer = {  # one module-layer of all N adapters, r (d_out + d_in) numbers each
        name: args.adapters * max(m.ranks) * sum(m.shape) for name, m in first.modules.items()
    }
    all_factors = sum(n * len(first.modules[name].layers) for name, n in per_layer.items())
    results = sum(3 * len(m.layers) * args.adapters**2 for m in first.modules.values())
    return {
        "machine": C.machine(),
        "adapters": args.adapters,
        "dtype": args.dtype,
        "block": args.block,
        "runs": runs,
        "factors_all_mib": round(all_factors * stored / 2**20, 1),
        "factors_one_layer_mib": round(max(per_layer.values()) * (stored + itemsize) / 2**20, 1),
        "results_mib": round(results * 8 / 2**20, 1),
    }


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
    parser.add_argument("--memory", action="store_true", help="peak memory of the loaded and streamed zoo instead")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process of --memory
    parser.add_argument("--folders", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = C.DTYPES[args.dtype]
    if args.variant is not None:
        folders = [Path(f) for f in json.loads(args.folders.read_text())]
        print(json.dumps(run_variant(args.variant, folders, args.block, dtype)))
        return
    if args.memory:
        result = memory(args)
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(Path(tmp), args.adapters, noise=1.0)
        t0 = time.perf_counter()
        adapters = [load_lora_adapter(f) for f in folders]
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()  # what `loralens zoo --adapters-from` does: index the folders, stream each layer
        streamed = adapter_zoo(folders, block=args.block, device="cpu", dtype=dtype)
        streamed_s = time.perf_counter() - t0
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
        "streamed_from_folders_s": round(streamed_s, 2),
        "streamed_equals_loaded": all(
            torch.equal(streamed.modules[n].cosine, zoo.modules[n].cosine) for n in zoo.modules
        ),
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

"""Extra cost of the W-conditioned null (#13): ``adapter_similarity`` with ``null_draws=20`` against ``null_draws=0``.

A synthetic Llama-shaped case (q_proj + v_proj, d x d, L layers, rank r; :func:`_common.llama_checkpoint`), scaled
to run here in under two minutes, in-process (float64, CPU, the base read from the page cache). The null adds
``N r`` right-hand-side columns to each layer's LU solve (square W: A's and B's null are one distribution and share
them; about ``3 N r / d`` of the LU's flops), its Gaussian
draws and the thin SVDs of ``N`` times as many ``(d, r)`` matrices; the cost model printed extrapolates the
measured parts to d = 4096, L = 32, r = 8.

    .venv/bin/python benchmarks/bench_w_null.py --dim 1024 --layers 8 --r 8 --draws 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812

import loralens  # noqa: E402
from loralens.analyses.conversion import compute_conversions_many  # noqa: E402
from loralens.analyses.similarity import layer_similarity_many  # noqa: E402


def measure(dim: int, layers: int, r: int, draws: int, repeat: int) -> dict[str, float | int]:
    folder = Path(tempfile.mkdtemp(prefix="bench-w-null-"))
    try:
        base_dir, adapter_dir = C.llama_checkpoint(folder, layers=layers, d=dim, r=r, base_dtype=torch.float32)
        base, adapter = loralens.open_base(base_dir), loralens.load_lora_adapter(adapter_dir)

        def run(n: int) -> tuple[float, float]:  # (solve, similarity) seconds, as adapter_similarity runs them
            t = time.perf_counter()
            convs = compute_conversions_many(
                base, [adapter], device="cpu", with_product=False, with_residuals=False, null_draws=n
            )
            t1 = time.perf_counter()
            layer_similarity_many(convs, device="cpu", null_draws=n)
            return t1 - t, time.perf_counter() - t1

        run(0)  # warm the page cache and the libraries
        off = min((run(0) for _ in range(repeat)), key=sum)
        on = min((run(draws) for _ in range(repeat)), key=sum)
        W = torch.randn(layers, dim, dim, dtype=torch.float64)
        t = time.perf_counter()
        torch.linalg.lu_factor(W)
        lu = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "dim": dim,
        "layers": layers,
        "r": r,
        "draws": draws,
        "off_s": sum(off),
        "on_s": sum(on),
        "extra_solve_s": on[0] - off[0],
        "extra_similarity_s": on[1] - off[1],
        "lu_per_module_s": lu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    m = measure(args.dim, args.layers, args.r, args.draws, args.repeat)
    m["extra_ratio"] = (m["on_s"] - m["off_s"]) / m["off_s"]
    # Cost model per module type: the run without the null grows as L d^3 (the LU); the null's extra solve as
    # L d^2 N r (N r more columns in the triangular solves), its draws and thin SVDs as L d N r^2.
    d7, l7, r7 = 4096, 32, 8
    dim, layers, r = m["dim"], m["layers"], m["r"]
    base_7b = m["off_s"] * (l7 * d7**3) / (layers * dim**3)
    solve_7b = m["extra_solve_s"] * (l7 * d7**2 * r7) / (layers * dim**2 * r)
    similarity_7b = m["extra_similarity_s"] * (l7 * d7 * r7**2) / (layers * dim * r**2)
    m["model_7b_extra_ratio"] = (solve_7b + similarity_7b) / base_7b
    print(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()

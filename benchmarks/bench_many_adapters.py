"""Many adapters of one base: one LU per base weight for all of them, against one adapter at a time.

The adapters: ``--adapters`` (100) perturbations of the embedded default (real PEFT LoRA, r = 8, query + value,
trained on Rotten Tomatoes): ``A_k = A + noise * std(A) * G``, ``B_k = B + noise * std(B) * G'`` with seeded
Gaussian ``G``, written as PEFT folders (same ``adapter_config.json``). The base: the real MiniLM (6 layers, 384).

Measured (float64, CPU, everything from loading the adapters to the phi matrices):
  many, in-process   ``compute_conversions_many`` + ``layer_similarity_many`` (12 LU for all adapters)
  one by one         ``compute_conversions`` + ``layer_similarity`` per adapter (12 LU per adapter)
  CLI, many          ``loralens similarity --adapter a000 ... --adapter a099 --json`` (one process)
  CLI, one by one    ``loralens similarity --adapter a000 --json`` for ``--cli-single`` adapters, extrapolated

    .venv/bin/python benchmarks/bench_many_adapters.py --adapters 100 --json results/bench_many_adapters.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402, N812

import loralens  # noqa: E402
import loralens.analyses.conversion as conversion_engine  # noqa: E402
from loralens.analyses.similarity import layer_similarity, layer_similarity_many  # noqa: E402
from loralens.examples import default_adapter, default_base  # noqa: E402


def make_adapters(folder: Path, n: int, noise: float) -> list[Path]:
    """``n`` perturbed copies of the embedded default adapter."""
    src = default_adapter()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    config = (src / "adapter_config.json").read_text()
    paths = []
    for k in range(n):
        out = folder / f"a{k:03d}"
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(k)
        perturbed = {
            key: (t + noise * t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)
            if key.endswith(("lora_A.weight", "lora_B.weight"))
            else t
            for key, t in tensors.items()
        }
        save_file(perturbed, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(config)
        paths.append(out)
    return paths


def count_factorizations() -> list[int]:
    """Count calls of the solver's factorisation from here on (one call = one batch of layers of one module)."""
    counter = [0, 0]  # calls, layers
    original = conversion_engine.factorize

    def counted(W: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        counter[1] += len(W)
        return original(W, **kwargs)

    conversion_engine.factorize = counted  # type: ignore[assignment]
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--cli-single", type=int, default=5, help="adapters run one CLI process each (extrapolated)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loralens-bench-many"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    result: dict[str, Any] = {"machine": C.machine(), "command": " ".join(sys.argv)}
    paths = make_adapters(a.workdir, a.adapters, a.noise)
    base = loralens.open_base(default_base())
    counter = count_factorizations()

    def many() -> list[Any]:
        adapters = [loralens.load_lora_adapter(x) for x in paths]
        convs = conversion_engine.compute_conversions_many(base, adapters, device="cpu", with_product=False)
        return layer_similarity_many(convs, device="cpu")

    def one_by_one() -> list[Any]:
        reports = []
        for x in paths:
            adapter = loralens.load_lora_adapter(x)
            convs = conversion_engine.compute_conversions(base, adapter, device="cpu", with_product=False)
            reports.append(layer_similarity(convs, device="cpu"))
        return reports

    many()  # warm-up
    counter[:] = [0, 0]
    out_many: list[Any] = []
    t_many = C.best_time(lambda: out_many.__setitem__(slice(None), many()), a.repeat)
    lu_many = counter[1] // max(1, a.repeat)
    counter[:] = [0, 0]
    out_single: list[Any] = []
    t_single = C.best_time(lambda: out_single.__setitem__(slice(None), one_by_one()), a.repeat)
    lu_single = counter[1] // max(1, a.repeat)
    diff = max(
        float((x.modules[m][f].phi - y.modules[m][f].phi).abs().max())
        for x, y in zip(out_many, out_single, strict=True)
        for m in x.modules
        for f in x.modules[m]
    )
    args = ["similarity", "--base", default_base(), "--json", "--quiet", "--device", "cpu"]
    cli_many = C.run_cli([*args, *(arg for x in paths for arg in ("--adapter", x))])
    cli_out = json.loads(cli_many["stdout"])
    cli_diff = max(
        abs(e["modules"][m][f]["phi"][i][j] - float(r.modules[m][f].phi[i, j]))
        for e, r in zip(cli_out["adapters"], out_many, strict=True)
        for m in r.modules
        for f in r.modules[m]
        for i in range(6)
        for j in range(6)
    )
    start = time.perf_counter()
    for x in paths[: a.cli_single]:
        C.run_cli([*args, "--adapter", x])
    per_cli = (time.perf_counter() - start) / max(1, a.cli_single)
    n = len(paths)
    rows = [
        {"way": "many, in-process", "seconds": t_many, "adapters_per_s": n / t_many, "lu": lu_many},
        {"way": "one by one, in-process", "seconds": t_single, "adapters_per_s": n / t_single, "lu": lu_single},
        {"way": "CLI, many (one process)", "seconds": cli_many["seconds"], "adapters_per_s": n / cli_many["seconds"]},
        {
            "way": f"CLI, one by one (from {a.cli_single}, extrapolated)",
            "seconds": per_cli * n,
            "adapters_per_s": 1 / per_cli,
        },
    ]
    result |= {
        "adapters": n,
        "adapter_kind": f"perturbations of the embedded default adapter (noise {a.noise} x std, seeded)",
        "base": str(base.root),
        "rows": rows,
        "speedup_in_process": t_single / t_many,
        "max_phi_diff_many_vs_one_by_one": diff,
        "max_phi_diff_cli_vs_api": cli_diff,
        "cli_peak_rss_gb": cli_many["peak_rss_bytes"] / 1e9,
    }
    print(f"\n{n} MiniLM adapters ({result['adapter_kind']}), float64, CPU:")
    cols = [("way", "way"), ("seconds", "seconds"), ("adapters_per_s", "adapters/s"), ("lu", "LU (layers)")]
    print(C.table(rows, cols))
    print(f"speedup in-process: {t_single / t_many:.2f}x; max |phi many - one by one| = {diff:.2e}")
    print(f"max |phi CLI JSON - API| = {cli_diff:.1e} (the JSON rounds to 10 decimals)")
    C.write_json(a.json, result)
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

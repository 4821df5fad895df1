"""One small trainer for LoRA (through PEFT) and CondLoRA on a ``transformers`` sequence-classification model.

Both methods share everything but the adapter: the seeded train / dev / test split and batches, the model and its
new head, AdamW with the schedule, warmup and clipping of :class:`~loralens.training.config.TrainConfig`, the
dev-score checkpoint selection and the test metric, so their numbers can be compared (the paper's Table 2
protocol). ``transformers`` and ``peft`` (the ``train`` extra) are imported inside the functions, so importing this
module stays light.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.errors import InputPathError, LoralensError
from loralens.io.outputs import Writer, check_output_folder, json_writer, safetensors_writer, write_outputs
from loralens.training.config import FULL_FINETUNE, LR_RANGE, METHODS, TrainConfig, TrainingDivergedError
from loralens.training.data import TextDataset, load_task, split_three_way
from loralens.training.resume import FitState, fit_state_files, fit_state_path, read_fit_state, write_fit_state

__all__ = [
    "ADAPTER_FILES",
    "METHODS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "FitResult",
    "StepCallback",
    "fit",
    "make_scheduler",
    "train",
    "train_adapter",
    "train_condlora",
    "train_lora",
]

logger = logging.getLogger(__name__)

#: The default split seed and test share (:class:`TrainConfig` ``split_seed``, ``test_fraction``): runs with
#: different training seeds are scored on the same test examples.
SPLIT_SEED = 0
TEST_FRACTION = 0.1
_EVAL_BATCH = 64
_PEFT_TYPES = {"lora": "LORA", "condlora": "ConditionalLORA", FULL_FINETUNE: None}
#: The adapter files ``train`` writes (both methods use these names), besides ``metrics.json``.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: What a full fine-tune (``method="full"``) writes instead: the whole model, as ``save_pretrained`` would.
MODEL_FILES = ("config.json", "model.safetensors")
LR_SEARCH_FILE = "lr_search.json"

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
    """Accuracy, or Pearson r of the (B, 1) regression outputs, of ``model`` on all of ``ds``.

    Non-finite outputs raise :class:`TrainingDivergedError`; constant regression outputs (r undefined: they
    carry no information about the targets) score 0.0.
    """
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(ds), _EVAL_BATCH):
        batch = _encode(tokenizer, ds.texts[start : start + _EVAL_BATCH], max_length)
        outputs.append(model(**batch).logits.float())  # (B, num_labels)
    model.train(was_training)
    logits = torch.cat(outputs)  # (N, num_labels)
    if not bool(torch.isfinite(logits).all()):
        raise TrainingDivergedError(f"the model's outputs on {ds.name!r} hold NaN or Inf")
    labels = np.asarray(ds.labels)
    if ds.metric == "pearson":
        predictions = logits[:, 0].double().numpy()
        if predictions.std() == 0.0:
            return 0.0
        return float(np.corrcoef(predictions, labels)[0, 1])
    return float((logits.argmax(dim=1).numpy() == labels).mean())


def _wrap(method: str, base: Any, peft: Any, r: int, alpha: float, targets: Sequence[str], base_name: str) -> Any:
    """The base model with the method's adapter; only the adapter and the new head are trainable (every weight
    for a full fine-tune)."""
    if method == FULL_FINETUNE:
        return base
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


def _adapter_files(method: str, model: Any, peft: Any, base_name: str) -> dict[str, Writer]:
    """The adapter's files (name -> writer), for one atomic write with metrics.json; a full fine-tune's model."""
    if method == FULL_FINETUNE:
        # The classification model whole (its encoder keys carry the model's prefix, e.g. "bert."), as
        # save_pretrained writes it; contiguous copies, since safetensors refuses shared or strided storage.
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        config = model.config.to_dict()
        config["_name_or_path"] = base_name
        return {"config.json": json_writer(config), "model.safetensors": safetensors_writer(state, {"format": "pt"})}
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> Any:
    """``transformers.get_scheduler(config.schedule, ...)`` with ``config.warmup_steps(total)`` warmup steps.

    The rate of step ``s`` (0-based, the ``s``-th ``optimizer.step()``) with warmup ``w`` and peak ``lr``:
    ``lr * s / w`` while ``s < w``; then ``lr * (total - s) / (total - w)`` (linear),
    ``lr * (1 + cos(pi * (s - w) / (total - w))) / 2`` (cosine) or ``lr`` (constant).
    """
    import transformers

    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    return transformers.get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps(total), num_training_steps=total
    )


def _clip(params: Sequence[torch.nn.Parameter], max_grad_norm: float | None) -> float:
    """Clip the gradients' global 2-norm to ``max_grad_norm`` (``None``: leave them); return the norm before."""
    limit = float("inf") if max_grad_norm is None else max_grad_norm
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


@dataclass
class FitResult:
    """A trained model in memory, with the checkpoint ``config.select`` chose already restored into it."""

    model: Any
    tokenizer: Any
    config: TrainConfig
    train: TextDataset
    dev: TextDataset
    test: TextDataset
    total_steps: int
    dev_before: float
    dev_curve: list[dict[str, float]] = field(default_factory=list)
    selected_step: int = 0
    final_loss: float = math.nan
    train_seconds: float = 0.0
    test_before: float | None = None

    @property
    def dev_score(self) -> float:
        """The dev score of the selected checkpoint (what the learning-rate search maximises)."""
        return next(p["dev"] for p in self.dev_curve if p["step"] == self.selected_step)


def _load_splits(ds: TextDataset, config: TrainConfig) -> tuple[TextDataset, TextDataset, TextDataset]:
    """``(train, dev, test)`` of ``ds`` cut with ``config.split_seed``; dev and test trimmed to their sizes."""
    train, dev, test = split_three_way(ds, config.test_fraction, config.dev_fraction, config.split_seed)
    if len(train) < config.batch_size:
        raise LoralensError(
            f"task {ds.name!r}: {len(train)} training examples, fewer than batch_size={config.batch_size}"
        )

    def head(part: TextDataset, n: int) -> TextDataset:
        return TextDataset(ds.name, part.texts[:n], part.labels[:n], ds.num_labels, ds.metric)  # type: ignore[arg-type]

    return train, head(dev, config.dev_size), head(test, config.eval_size)


def fit(
    base_path: Path,
    ds: TextDataset,
    config: TrainConfig,
    *,
    base_name: str,
    progress: bool = False,
    on_step: StepCallback | None = None,
    score_test_before: bool = False,
    state_path: Path | None = None,
) -> FitResult:
    """Train ``config.method`` on ``ds`` in memory and restore the selected checkpoint; score dev, not test.

    ``score_test_before``: also score the test split with the untrained model (``test_before``; it depends on
    the seed, not on the learning rate).

    Every ``config.eval_steps`` step the dev split is scored; with ``select="best"`` the trainable tensors of the
    best dev step (the first, on ties) are kept on the CPU and copied back at the end. A NaN or infinite loss,
    gradient norm or model output raises :class:`TrainingDivergedError` at once.

    ``state_path``: after every dev score the run's state is saved there, and a run of the same ``config`` given
    that file resumes after its last saved step, ending as a run never stopped would; a finished run's state is
    restored without training (:mod:`loralens.training.resume`).
    """
    transformers, peft = _import_train_deps()
    train, dev, test = _load_splits(ds, config)
    total = config.total_steps(len(train))
    eval_steps = set(config.eval_steps(total))

    transformers.set_seed(config.seed)  # random, numpy and torch: the head and the adapter's initialisation
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
    extra = {"problem_type": "regression"} if ds.num_labels == 1 else {}
    # Quiet load: its report lists the new head as MISSING (expected: it is trained here), and its progress bar
    # would interleave with ours.
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=ds.num_labels, **extra
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = _wrap(config.method, base, peft, config.r, config.alpha, config.targets, base_name)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    dev_before = _evaluate(model, tokenizer, dev, config.max_length)
    result = FitResult(model, tokenizer, config, train, dev, test, total, dev_before)
    if score_test_before:
        result.test_before = _evaluate(model, tokenizer, test, config.max_length)

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    saved = read_fit_state(state_path, config, [n for n, _ in named]) if state_path is not None else None
    if saved is not None:
        best = _restore(saved, named, optimizer, scheduler, result)
        logger.info("%s: resuming after step %d/%d", state_path, saved.step, total)
    done = saved.step if saved is not None else 0
    model.train()
    start = time.perf_counter() - result.train_seconds
    for step, idx in enumerate(_batches(len(train), config.batch_size, total, generator), start=1):
        if step <= done:
            continue  # its batch drawn again, so that the order goes on as in a run never stopped
        batch = _encode(tokenizer, [train.texts[i] for i in idx], config.max_length)
        labels = _label_tensor([train.labels[i] for i in idx], ds.num_labels)
        loss = model(**batch, labels=labels).loss
        if not bool(torch.isfinite(loss)):
            raise _diverged(config, step, total, f"the loss is {float(loss)}")
        loss.backward()
        grad_norm = _clip(params, config.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise _diverged(config, step, total, f"the gradient norm is {grad_norm}")
        lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
        try:
            optimizer.step()
        except RuntimeError as e:  # e.g. Adam's step size lr / (1 - beta1^t) overflowing float32
            if "overflow" not in str(e):
                raise
            raise _diverged(config, step, total, f"the optimizer step overflowed ({e})") from e
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.final_loss = float(loss.item())
        if on_step is not None:
            on_step(step, total, result.final_loss)
        if progress and (step % 20 == 0 or step == total):
            elapsed = time.perf_counter() - start
            logger.info("step %d/%d  loss %.4f  lr %.3g  %.2f steps/s", step, total, loss.item(), lr, step / elapsed)
        if step in eval_steps:
            try:
                score = _evaluate(model, tokenizer, dev, config.max_length)
            except TrainingDivergedError as e:
                raise _diverged(config, step, total, str(e)) from e
            point = {"step": step, "dev": score, "lr": lr, "loss": result.final_loss, "grad_norm": grad_norm}
            result.dev_curve.append(point)
            if config.select == "last" or best is None or score > best[0]:
                result.selected_step = step
                if config.select == "best":
                    best = (score, {n: p.detach().clone() for n, p in named})
            if state_path is not None:
                result.train_seconds = time.perf_counter() - start
                _save(state_path, step, named, optimizer, scheduler, best, result)
    result.train_seconds = time.perf_counter() - start
    if best is not None and result.selected_step != total:
        with torch.no_grad():
            for n, p in named:
                p.copy_(best[1][n])
    return result


def _save(
    path: Path,
    step: int,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    best: tuple[float, dict[str, torch.Tensor]] | None,
    result: FitResult,
) -> None:
    write_fit_state(
        path,
        FitState(
            config=result.config, step=step, params={n: p.detach() for n, p in named},
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=torch.get_rng_state(),
            dev_curve=result.dev_curve, selected_step=result.selected_step,
            best=None if best is None else best[1], best_score=None if best is None else best[0],
            final_loss=result.final_loss, train_seconds=result.train_seconds,
        ),
    )  # fmt: skip


def _restore(
    saved: FitState,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    result: FitResult,
) -> tuple[float, dict[str, torch.Tensor]] | None:
    """Put ``saved`` into the model, optimizer, schedule, torch's random state and ``result``; return the best
    checkpoint so far."""
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved.params[n])
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    torch.set_rng_state(saved.rng)
    result.dev_curve = list(saved.dev_curve)
    result.selected_step, result.final_loss = saved.selected_step, saved.final_loss
    result.train_seconds = saved.train_seconds
    if saved.best is None or saved.best_score is None:
        return None
    return saved.best_score, saved.best


def _diverged(config: TrainConfig, step: int, total: int, what: str) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"{config.method} training diverged at step {step}/{total} with lr {config.lr:g}: {what}; "
        "nothing was written (try a smaller lr, or keep the warmup, warmup_ratio, and the gradient clipping, "
        "max_grad_norm, on)",
        option=("lr", "warmup_ratio", "max_grad_norm"),
    )


def train(
    base_path: str | os.PathLike[str],
    task: str | TextDataset,
    config: TrainConfig | None = None,
    *,
    out_dir: str | os.PathLike[str],
    base_name: str | None = None,
    lr_search: int = 0,
    lr_range: tuple[float, float] = LR_RANGE,
    progress: bool = False,
    on_step: StepCallback | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Train a LoRA or CondLoRA adapter for ``task`` on the local model ``base_path`` and save it to ``out_dir``.

    Steps:

    1. Load the task (a name from :data:`loralens.training.data.TASKS`, or a :class:`TextDataset`) and cut it
       into train / dev / test with ``config.split_seed`` (independent of ``config.seed``,
       :func:`~loralens.training.data.split_three_way`); the first ``eval_size`` test and ``dev_size`` dev
       examples are scored.
    2. Seed ``random``, numpy and torch with ``config.seed`` (this also fixes the new classifier head), load the
       tokenizer and ``AutoModelForSequenceClassification`` (``num_labels`` of the task;
       ``problem_type="regression"`` when it is 1) and wrap it:

       - ``method="lora"``: ``peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha,
         target_modules=targets, lora_dropout=0.0)``; ``dW_l = (alpha / r) B_l A_l`` with ``A_l``, ``B_l``
         trained per layer;
       - ``method="condlora"``: :class:`~loralens.training.condlora.CondLoraModel` with the same r, alpha and
         targets: one ``theta_A``, ``theta_B`` per module type, ``A_l = theta_A W_l^T``, ``B_l = W_l theta_B^T``.

       Both also train and save the classifier head (``modules_to_save``).
       - ``method="full"``: every weight is trained (a full fine-tune, to compare adapters with); the whole
         classification model is saved (``config.json``, ``model.safetensors``) instead of adapter files.
    3. Train with AdamW (``weight_decay``), the ``schedule`` with ``warmup_ratio`` warmup
       (:func:`make_scheduler`) and clipping at ``max_grad_norm``, for ``steps`` steps (or ``epochs``) of
       ``batch_size`` examples (shuffled with ``seed``, padded per batch, truncated to ``max_length`` tokens);
       score dev every ``eval_every`` steps and keep the checkpoint ``select`` names (:func:`fit`).
    4. With ``lr_search=N > 0``, first run an Optuna study (:func:`loralens.training.search.search_lr`: TPE
       seeded with ``config.seed``, N trials, rate log-uniform in ``lr_range``), each trial a whole run scored on
       dev; the best trial's run (the same seed, so the same run) is the one kept, and ``lr_search.json``
       records every trial. Until then each finished trial is recorded in ``.<out_dir name>.lr-search-trials.json``
       beside ``out_dir``: a search cut short resumes from it.

       Every run (each trial too) also saves its state after each dev score in ``.<out_dir name>.fit-<key>.pt``
       beside ``out_dir`` (:mod:`loralens.training.resume`; not for ``method="full"``), so a run cut short
       resumes after its last dev score and ends as if never stopped; the state files are deleted once the
       output is written.
    5. Score the test split before training and with the selected checkpoint (accuracy, or Pearson r for
       regression) and write, in one atomic step (:func:`loralens.io.outputs.write_outputs`),
       ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT's files for LoRA; the authors'
       ``ConditionalLORA`` format for CondLoRA) and ``metrics.json``. ``base_model_name_or_path`` is
       ``base_name``, else ``base_path``.

    Returns the metrics dict: task, base, method, settings, the whole ``config``, metric name, ``before`` /
    ``after`` test scores, the majority-class rate of the scored test examples (classification), ``dev_before``,
    ``dev_curve`` (``step``, ``dev``, ``lr``, ``loss``, ``grad_norm`` at each scored step), ``selected_step``,
    ``dev_best``, ``trainable_params`` (adapter only) and ``trainable_params_with_head``, ``train_seconds``,
    ``steps_per_s``, ``examples_per_s`` (training loop only, tokenisation and dev scoring included),
    ``final_loss`` and the torch / transformers / peft versions.

    Raises :class:`InputPathError` if ``base_path`` is not a folder, :class:`TrainingDivergedError` (nothing
    written) if the run diverges, :class:`LoralensError` for bad settings, an unknown task or method, or a
    missing ``train`` extra. ``replace``: replace an existing ``out_dir`` that loralens wrote.
    """
    transformers, peft = _import_train_deps()
    config = config if config is not None else TrainConfig()
    base_path = Path(base_path)
    if not base_path.is_dir():
        raise InputPathError(f"base model folder not found: {base_path} (needs config.json, weights and a tokenizer)")
    if config.method == "condlora":  # from the weights' headers, before a model is loaded
        from loralens.io.base_weights import open_base
        from loralens.training.condlora import check_square_targets

        check_square_targets(open_base(base_path), config.targets)
    saved = MODEL_FILES if config.method == FULL_FINETUNE else ADAPTER_FILES
    names = (*saved, "metrics.json", *((LR_SEARCH_FILE,) if lr_search else ()))
    # refuse an output folder before training, not after minutes of it
    check_output_folder(Path(out_dir), replace=replace, names=names)
    ds = task if isinstance(task, TextDataset) else load_task(task)
    recorded_base = base_name if base_name is not None else str(base_path)
    before: list[float] = []  # the untrained model's test score: the same for every rate, so scored once
    full = config.method == FULL_FINETUNE  # its state would be the whole model: a full fine-tune does not resume

    def run(c: TrainConfig) -> FitResult:
        with warnings.catch_warnings():
            # PeftModel reads transformers' deprecated is_gradient_checkpointing: their FutureWarning, nothing a
            # user can act on (issue #20: no library noise on stderr)
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            state = None if full else fit_state_path(out_dir, c)
            try:
                r = fit(
                    base_path, ds, c, base_name=recorded_base, progress=progress, on_step=on_step,
                    score_test_before=not before, state_path=state,
                )  # fmt: skip
            except TrainingDivergedError:
                if state is not None:  # it would diverge again from there: a diverged run leaves nothing behind
                    state.unlink(missing_ok=True)
                raise
        before.extend([] if r.test_before is None else [r.test_before])
        return r

    files: dict[str, Writer] = {}
    search: dict[str, Any] | None = None
    if lr_search:
        from loralens.training.search import journal_path, search_lr

        # finished trials are recorded beside the output as they end, so a search cut short resumes there
        journal = journal_path(out_dir)
        search, result = search_lr(run, config, lr_search, lr_range, journal=journal)
        search.update(task=ds.name, base=recorded_base)
        files[LR_SEARCH_FILE] = json_writer(search)
        config = result.config
    else:
        result = run(config)
    metrics = _metrics(result, before[0], recorded_base, peft, transformers)
    if search is not None:
        metrics["lr_search"] = {k: search[k] for k in ("n_trials", "range", "best")} | {"file": LR_SEARCH_FILE}
    files.update(_adapter_files(config.method, result.model, peft, recorded_base))
    files["metrics.json"] = json_writer(metrics)
    write_outputs(Path(out_dir), files, replace=replace)
    if lr_search:
        journal.unlink(missing_ok=True)
    for state in fit_state_files(out_dir):  # every trial's and run's saved state: the output holds the result
        state.unlink(missing_ok=True)
    return metrics


def _metrics(result: FitResult, before: float, base_name: str, peft: Any, transformers: Any) -> dict[str, Any]:
    """metrics.json of a finished fit: ``before`` (the test score of the untrained model) and the test score now."""
    config, model, test = result.config, result.model, result.test
    after = _evaluate(model, result.tokenizer, test, config.max_length)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # PEFT's lora_A/lora_B and CondLoRA's linear_for_lora_A/B; the rest is the head (modules_to_save)
    n_adapter = sum(p.numel() for n, p in named if "lora_" in n or config.method == FULL_FINETUNE)
    seconds = max(result.train_seconds, 1e-9)
    metrics: dict[str, Any] = {
        "task": test.name,
        "base": base_name,
        "method": config.method,
        "settings": {
            "peft_type": _PEFT_TYPES[config.method],
            "r": config.r,
            "lora_alpha": config.alpha,
            "target_modules": list(config.targets),
            "lora_dropout": 0.0,
            "steps": result.total_steps,
            "lr": config.lr,
            "optimizer": "AdamW",
            "weight_decay": config.weight_decay,
            "schedule": config.schedule,
            "warmup_ratio": config.warmup_ratio,
            "warmup_steps": config.warmup_steps(result.total_steps),
            "max_grad_norm": config.max_grad_norm,
            "select": config.select,
            "batch_size": config.batch_size,
            "max_length": config.max_length,
            "seed": config.seed,
            "split_seed": config.split_seed,
            "test_fraction": config.test_fraction,
            "dev_fraction": config.dev_fraction,
        },
        "config": config.to_dict(),
        "n_train": len(result.train),
        "n_dev": len(result.dev),
        "n_eval": len(test),
        "metric": test.metric,
        "before": before,
        "after": after,
        "dev_before": result.dev_before,
        "dev_curve": result.dev_curve,
        "selected_step": result.selected_step,
        "dev_best": result.dev_score,
        "trainable_params": n_adapter,
        "trainable_params_with_head": sum(p.numel() for _, p in named),
        "final_loss": result.final_loss,
        "train_seconds": round(result.train_seconds, 3),
        "steps_per_s": round(result.total_steps / seconds, 3),
        "examples_per_s": round(result.total_steps * config.batch_size / seconds, 2),
        "seed": config.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if test.metric == "accuracy":
        counts = np.bincount(np.asarray(test.labels), minlength=test.num_labels)
        metrics["majority_baseline"] = float(counts.max() / counts.sum())
    return metrics


def train_adapter(
    base_path: str | os.PathLike[str],
    task: str | TextDataset,
    *,
    out_dir: str | os.PathLike[str],
    method: str = "lora",
    config: TrainConfig | None = None,
    base_name: str | None = None,
    lr_search: int = 0,
    lr_range: tuple[float, float] = LR_RANGE,
    progress: bool = False,
    on_step: StepCallback | None = None,
    replace: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """:func:`train` with the settings as keywords (``steps=60, lr=1e-3, ...``: any :class:`TrainConfig` field).

    The compatible path for callers of the earlier keyword-argument trainer; ``config`` and keywords may be
    mixed (keywords win). Unknown keywords are a LoralensError.
    """
    base_config = config if config is not None else TrainConfig(method=method)
    try:
        config = (
            base_config.replace(method=method, **settings) if settings or method != base_config.method else base_config
        )
    except TypeError as e:
        raise LoralensError(f"train_adapter: {e}; the settings are the fields of TrainConfig") from e
    return train(
        base_path,
        task,
        config,
        out_dir=out_dir,
        base_name=base_name,
        lr_search=lr_search,
        lr_range=lr_range,
        progress=progress,
        on_step=on_step,
        replace=replace,
    )


def train_lora(base_path: str | os.PathLike[str], task: str | TextDataset, **kwargs: Any) -> dict[str, Any]:
    """:func:`train_adapter` with ``method="lora"`` (PEFT LoRA)."""
    return train_adapter(base_path, task, method="lora", **kwargs)


def train_condlora(base_path: str | os.PathLike[str], task: str | TextDataset, **kwargs: Any) -> dict[str, Any]:
    """:func:`train_adapter` with ``method="condlora"`` (the authors' CondLoRA, saved in their format)."""
    return train_adapter(base_path, task, method="condlora", **kwargs)

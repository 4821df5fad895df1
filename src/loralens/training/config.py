"""The settings of one training run: :class:`TrainConfig`, frozen, validated, and recorded whole in ``metrics.json``.

The defaults follow the paper and the authors' scripts (REFERENCE.md, "Training protocol of the paper"): AdamW
with weight decay 0, a linear schedule with 10 % warmup, gradient clipping at 1.0, r = alpha = 8, dropout 0,
batch 16, and the checkpoint with the best dev score kept. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from loralens.errors import LoralensError

__all__ = [
    "DEFAULT_STEPS",
    "FULL_FINETUNE",
    "EVALS_PER_RUN",
    "LR_RANGE",
    "METHODS",
    "SCHEDULES",
    "SELECTS",
    "TrainConfig",
    "TrainingDivergedError",
]

#: The adapters the trainer makes: PEFT LoRA, and CondLoRA (:mod:`loralens.training.condlora`).
METHODS = ("lora", "condlora")
#: The trainer's other method: a full fine-tune (every weight trained, the model saved), what adapters are
#: compared with (:mod:`loralens.analyses.finetuned`); not part of the paper's Table 2.
FULL_FINETUNE = "full"
#: Learning-rate schedules, as ``transformers.get_scheduler`` names them.
SCHEDULES = ("linear", "cosine", "constant")
#: Which checkpoint is saved: the one with the best dev score, or the last.
SELECTS = ("best", "last")
#: Optimizer steps when neither ``steps`` nor ``epochs`` is given.
DEFAULT_STEPS = 200
#: With ``eval_every=None`` the dev split is scored about this many times per run (and always at the last step).
EVALS_PER_RUN = 10
#: The paper's learning-rate search range (log-uniform).
LR_RANGE = (5e-5, 5e-3)


class TrainingDivergedError(LoralensError):
    """The loss, a gradient or the model's outputs became NaN or infinite: the run is stopped and nothing is written.

    (A subclass of :class:`~loralens.errors.LoralensError` defined here, beside the trainer that raises it.)
    """


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings, the same for LoRA and CondLoRA except ``method``.

    Attributes:
        method: ``"lora"`` (PEFT), ``"condlora"`` or ``"full"`` (every weight; r, alpha and targets unused).
        r, alpha, targets: rank, ``lora_alpha`` (the update is scaled ``alpha / r``) and the target module names.
        lr: AdamW's peak learning rate (reached at the end of warmup).
        schedule: ``"linear"`` (warmup, then linear decay to 0), ``"cosine"`` (warmup, then half a cosine to 0)
            or ``"constant"`` (warmup, then constant); built by ``transformers.get_scheduler``.
        warmup_ratio: fraction of the steps spent warming up linearly from 0, rounded up (as the HF Trainer does).
        max_grad_norm: the gradients' global 2-norm is clipped to this before every step
            (``torch.nn.utils.clip_grad_norm_``); ``None`` turns clipping off.
        weight_decay: AdamW's decoupled weight decay (0, as the paper; torch's own default is 0.01).
        steps, epochs: the run's length: ``steps`` optimizer steps, or ``epochs`` passes over the train split
            (``epochs * (n_train // batch_size)`` steps, rounded up); at most one of them; neither means
            :data:`DEFAULT_STEPS` steps.
        batch_size, max_length: examples per step, and the token limit inputs are truncated to.
        seed: seed of the head, the adapter initialisation and the batch order.
        eval_every: score the dev split every this many steps (and at the last step); ``None``: about
            :data:`EVALS_PER_RUN` times per run.
        select: ``"best"`` saves the checkpoint with the best dev score (the first, on ties); ``"last"`` the last.
        split_seed: the seed of the train / dev / test split, independent of ``seed`` so that every training
            seed sees the same examples.
        test_fraction: share of the task held out as test (what is reported as ``after``).
        dev_fraction: share of the remaining examples held out as dev (selection and learning-rate search).
        eval_size, dev_size: the first this many test / dev examples are scored.
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 8
    targets: tuple[str, ...] = ("query", "value")
    lr: float = 2e-3
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    eval_every: int | None = None
    select: str = "best"
    split_seed: int = 0
    test_fraction: float = 0.1
    dev_fraction: float = 0.1
    eval_size: int = 512
    dev_size: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        self._check()

    def _check(self) -> None:
        def fail(what: str) -> None:
            raise LoralensError(f"TrainConfig: {what}")

        if self.method not in (*METHODS, FULL_FINETUNE):
            fail(f"unknown method {self.method!r}; choose one of {', '.join((*METHODS, FULL_FINETUNE))}")
        if self.schedule not in SCHEDULES:
            fail(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.select not in SELECTS:
            fail(f"unknown select {self.select!r}; choose one of {', '.join(SELECTS)}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            fail(f"targets must be non-empty module names, got {self.targets!r}")
        positive = {"r": self.r, "alpha": self.alpha, "lr": self.lr, "batch_size": self.batch_size}
        positive |= {"max_length": self.max_length, "eval_size": self.eval_size, "dev_size": self.dev_size}
        optional = {"steps": self.steps, "epochs": self.epochs, "eval_every": self.eval_every}
        optional["max_grad_norm"] = self.max_grad_norm
        positive |= {k: v for k, v in optional.items() if v is not None}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(f"{name} must be > 0 and finite, got {value}")
        for name in ("r", "batch_size", "max_length", "eval_size", "dev_size", "steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and value != int(value):
                fail(f"{name} must be a whole number, got {value}")
        if self.steps is not None and self.epochs is not None:
            fail(f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            fail(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            fail(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("test_fraction", "dev_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(f"{name} must be in (0, 1), got {getattr(self, name)}")

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the run on a train split of ``n_train`` examples."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * (n_train // self.batch_size)))
        return int(self.steps) if self.steps is not None else DEFAULT_STEPS

    def warmup_steps(self, total: int) -> int:
        """Warmup steps of a ``total``-step run: ``ceil(warmup_ratio * total)``, as ``TrainingArguments`` does."""
        return math.ceil(self.warmup_ratio * total)

    def eval_steps(self, total: int) -> list[int]:
        """The steps after which the dev split is scored (always including the last)."""
        every = self.eval_every if self.eval_every is not None else max(1, total // EVALS_PER_RUN)
        return sorted({*range(every, total + 1, every), total})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, ``targets`` as a list."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys are a LoralensError (a metrics.json of another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LoralensError(f"TrainConfig: unknown settings {', '.join(unknown)}")
        return cls(**d)

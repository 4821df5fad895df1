"""A training run's state on disk, so that a run cut short (a stopped session, Ctrl-C) resumes where it was.

:func:`~loralens.training.trainer.fit` writes the state after every dev evaluation: the trainable tensors, AdamW's
and the schedule's state, torch's random state (dropout), the best checkpoint kept so far and the dev curve. A run
given the same file and the same :class:`~loralens.training.config.TrainConfig` continues after the last saved step
and ends with the same adapter as a run never stopped (the batch order is drawn again from the seed). A state
whose run had finished is a finished run: ``fit`` restores it without training, which is how a learning-rate search
resumed from its journal gets its best trial back.

The file is read with ``torch.load(weights_only=True)`` and written atomically (a temporary file in the same
folder, then ``os.replace``). One whose config differs, or that cannot be read, is ignored (logged) and replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralens.training.config import TrainConfig

__all__ = [
    "FitProgress",
    "FitState",
    "fit_state_files",
    "fit_state_path",
    "read_fit_progress",
    "read_fit_state",
    "write_fit_state",
]

logger = logging.getLogger(__name__)

_FORMAT = "loralens-fit-state-v1"


@dataclass
class FitState:
    """Everything a run needs to continue after ``step`` of ``config``."""

    config: TrainConfig
    step: int
    params: dict[str, torch.Tensor]  # the trainable tensors by parameter name
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # scheduler.state_dict()
    rng: torch.Tensor  # torch.get_rng_state(): dropout's stream
    dev_curve: list[dict[str, float]] = field(default_factory=list)
    selected_step: int = 0
    best: dict[str, torch.Tensor] | None = None  # the trainable tensors of the best dev step so far
    best_score: float | None = None
    final_loss: float = float("nan")
    train_seconds: float = 0.0


@dataclass(frozen=True)
class FitProgress:
    """How far a saved run got: its settings (``TrainConfig.to_dict()``) and the last step it saved."""

    config: dict[str, Any]
    step: int


def fit_state_path(out_dir: str | os.PathLike[str], config: TrainConfig) -> Path:
    """Where a run of ``config`` for ``out_dir`` keeps its state: a hidden file beside ``out_dir``, named by the
    config (every setting, the rate included), so the trials of a learning-rate search keep one each."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.fit-{hashlib.sha256(_config_key(config).encode()).hexdigest()[:12]}.pt"


def fit_state_files(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every state file of runs for ``out_dir`` (deleted once its output is written)."""
    out = Path(out_dir)
    return sorted(out.parent.glob(f".{out.name}.fit-*.pt"))


def _config_key(config: TrainConfig) -> str:
    """Every setting of ``config`` as one string: what names a state file and what a state must match."""
    return json.dumps(config.to_dict(), sort_keys=True)


def write_fit_state(path: Path, state: FitState) -> None:
    """Save ``state`` to ``path`` atomically; a failed write is logged, not raised (the run goes on)."""
    payload = {
        "format": _FORMAT,
        "config": _config_key(state.config),
        "step": state.step,
        "params": state.params,
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "rng": state.rng,
        "dev_curve": json.dumps(state.dev_curve),
        "selected_step": state.selected_step,
        "best": state.best,
        "best_score": state.best_score,
        "final_loss": state.final_loss,
        "train_seconds": state.train_seconds,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a run folder's parent is made when its output is written
        torch.save(payload, tmp)
        tmp.replace(path)  # atomic (os.replace)
    except (OSError, RuntimeError) as e:  # torch.save reports a missing or unwritable folder as RuntimeError
        tmp.unlink(missing_ok=True)
        logger.warning("%s: could not save the run's state (%s); it will not resume from here", path, e)


def read_fit_state(path: Path, config: TrainConfig, names: Sequence[str]) -> FitState | None:
    """The state in ``path`` if it is one of a run of ``config`` with trainable tensors ``names``, else None."""
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format") != _FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        if raw["config"] != _config_key(config):
            logger.info("%s: made with other settings; starting afresh", path)
            return None
        params = dict(raw["params"])
        if set(params) != set(names):
            raise ValueError("its tensors are not this model's")
        return FitState(
            config=config,
            step=int(raw["step"]),
            params=params,
            optimizer=raw["optimizer"],
            scheduler=raw["scheduler"],
            rng=raw["rng"],
            dev_curve=json.loads(raw["dev_curve"]),
            selected_step=int(raw["selected_step"]),
            best=raw["best"],
            best_score=raw["best_score"],
            final_loss=float(raw["final_loss"]),
            train_seconds=float(raw["train_seconds"]),
        )
    except Exception as e:  # noqa: BLE001  (any damage: the run starts afresh, which is always correct)
        logger.warning("%s: not a usable run state (%s); starting afresh", path, e)
        return None


def read_fit_progress(path: Path) -> FitProgress | None:
    """How far the run saved in ``path`` got (to report it; nothing is checked against a model), or None if the
    file cannot be read."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format") != _FORMAT:
            return None
        return FitProgress(json.loads(raw["config"]), int(raw["step"]))
    except Exception:  # noqa: BLE001  (a damaged or partly written file: nothing to report)
        return None

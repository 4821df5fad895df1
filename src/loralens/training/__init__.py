"""Training: real offline datasets, one small trainer for PEFT LoRA and CondLoRA, and the CondLoRA module.

Importing this package loads no ``transformers``, ``peft`` or ``optuna``; the trainers import them when called
(``pip install loralens[train]``). One run's settings are a :class:`TrainConfig`.
The CondLoRA ``nn.Module`` is in :mod:`loralens.training.condlora`.
"""

from loralens.training.config import TrainConfig, TrainingDivergedError
from loralens.training.data import (
    TASKS,
    TextDataset,
    load_rt_polarity,
    load_task,
    load_vader_polarity,
    load_vader_rating,
    split,
    split_three_way,
)
from loralens.training.trainer import METHODS, train, train_adapter, train_condlora, train_lora

__all__ = [
    "METHODS",
    "TASKS",
    "TextDataset",
    "TrainConfig",
    "TrainingDivergedError",
    "load_rt_polarity",
    "load_task",
    "load_vader_polarity",
    "load_vader_rating",
    "split",
    "split_three_way",
    "train",
    "train_adapter",
    "train_condlora",
    "train_lora",
]

"""Training: real offline datasets, one small trainer for PEFT LoRA and CondLoRA, and the CondLoRA module.

Importing this package loads no ``transformers`` or ``peft``; the trainers import them when called
(``pip install loralens[train]``). The CondLoRA ``nn.Module`` is in :mod:`loralens.training.condlora`.
"""

from loralens.training.data import (
    TASKS,
    TextDataset,
    load_rt_polarity,
    load_task,
    load_vader_polarity,
    load_vader_rating,
    split,
)
from loralens.training.trainer import METHODS, train_adapter, train_condlora, train_lora

__all__ = [
    "METHODS",
    "TASKS",
    "TextDataset",
    "load_rt_polarity",
    "load_task",
    "load_vader_polarity",
    "load_vader_rating",
    "split",
    "train_adapter",
    "train_condlora",
    "train_lora",
]

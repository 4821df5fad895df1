"""Training: real offline datasets and a small PEFT LoRA trainer.

Importing this package loads no ``transformers`` or ``peft``; :func:`train_lora` imports them
when called (``pip install loralens[train]``).
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
from loralens.training.lora import train_lora

__all__ = [
    "TASKS",
    "TextDataset",
    "load_rt_polarity",
    "load_task",
    "load_vader_polarity",
    "load_vader_rating",
    "split",
    "train_lora",
]

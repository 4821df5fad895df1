"""Train a real PEFT LoRA adapter: :func:`train_lora`, the ``method="lora"`` case of the shared trainer.

The loop, its settings and its outputs are documented in :func:`loralens.training.trainer.train_adapter`;
CondLoRA uses the same loop (:func:`loralens.training.trainer.train_condlora`).
"""

from __future__ import annotations

from loralens.training.trainer import SPLIT_SEED, TEST_FRACTION, train_lora

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "train_lora"]

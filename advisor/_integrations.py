"""The recommendation in the trainers people use: Hugging Face's ``Trainer`` and PyTorch Lightning.

Both get the objects of ``Recommendation.build`` (advisor/_recipe.py): the recommended ``kernels`` optimizer
over the model's trainable parameters in the advised weight-decay groups, and the advised schedule as a
``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step. Gradient clipping belongs to the
trainer: pass ``rec.recipe.max_grad_norm`` to it (the HF Trainer's ``max_grad_norm``, 1.0 by default whatever
the optimizer; Lightning's ``Trainer(gradient_clip_val=...)``). Neither library is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ._recipe import build

if TYPE_CHECKING:
    from ._engine import Recommendation


def for_hf_trainer(rec: Recommendation, model: torch.nn.Module, num_training_steps: int,
                   **overrides: Any) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(optimizers=...)``."""
    recipe = build(rec, model, num_training_steps, where="for_hf_trainer", argument="num_training_steps",
                   **overrides)
    return recipe.optimizer, recipe.scheduler


def lightning_optimizers(rec: Recommendation, model: torch.nn.Module, total_steps: int,
                         **overrides: Any) -> dict[str, Any]:
    """What a ``LightningModule.configure_optimizers`` returns: the optimizer and its scheduler, stepped every
    optimizer step (``interval: "step"``)."""
    recipe = build(rec, model, total_steps, where="lightning_optimizers", **overrides)
    return {"optimizer": recipe.optimizer,
            "lr_scheduler": {"scheduler": recipe.scheduler, "interval": "step", "frequency": 1}}

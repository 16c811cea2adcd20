"""The recommendation in the trainers people use: Hugging Face's ``Trainer`` and PyTorch Lightning.

Both get the same two objects, built here once:
- the optimizer: the recommended ``kernels`` optimizer over the model's trainable parameters in the groups of
  ``optadvisor.create_optimizer`` (no weight decay on biases, normalization parameters and what the model's
  ``no_weight_decay()`` names; frozen parameters left out);
- the scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` stepped once per optimizer step. The rules advise
  no schedule yet (a constant learning rate is what the advice benchmark measured), so it holds the advised
  learning rate for ``total_steps`` steps; it is a real scheduler object so that a trainer that insists on
  one, and checkpoints that save one, work unchanged.

Neither library is imported here: what they take are plain torch objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._engine import Choice, Recommendation


def _steps(total_steps: Any, where: str, argument: str) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{where}: {argument} must be a positive int (optimizer steps of the whole run); "
                         f"got {total_steps!r}")
    return total_steps


def model_optimizer(choice: Choice, model: torch.nn.Module, where: str, **overrides: Any):
    """The chosen ``kernels`` optimizer over ``model`` in ``create_optimizer``'s groups, with the choice's
    hyperparameters (coerced through kernels' catalog, as ``Recommendation.build_optimizer`` does) and
    ``overrides`` on top."""
    from optadvisor.kernels import _catalog as catalog
    from optadvisor.kernels._factory import create_optimizer

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module (got {type(model).__name__}); for a list of "
                        "parameters use rec.build_optimizer(params)")
    entry = catalog.entry(choice.name)
    if entry.kind != "optimizer":
        raise ValueError(f"{where}: {choice.name} is a {entry.kind}, not an optimizer")
    kwargs = {k: entry.params[k].coerce(v) if k in entry.params else v
              for k, v in {**choice.params, **overrides}.items()}
    return create_optimizer(model, choice.name.lower(), **kwargs)


def scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The advised schedule over ``total_steps`` optimizer steps: constant (no rule advises another yet)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)


def _constant(step: int) -> float:  # a module-level function: the scheduler's state_dict pickles
    return 1.0


def for_hf_trainer(rec: Recommendation, model: torch.nn.Module, num_training_steps: int,
                   **overrides: Any) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(optimizers=...)``."""
    steps = _steps(num_training_steps, "for_hf_trainer", "num_training_steps")
    opt = model_optimizer(rec.optimizer, model, "for_hf_trainer", **overrides)
    return opt, scheduler(opt, steps)


def lightning_optimizers(rec: Recommendation, model: torch.nn.Module, total_steps: int,
                         **overrides: Any) -> dict[str, Any]:
    """What a ``LightningModule.configure_optimizers`` returns: the optimizer and its scheduler, stepped every
    optimizer step (``interval: "step"``)."""
    steps = _steps(total_steps, "lightning_optimizers", "total_steps")
    opt = model_optimizer(rec.optimizer, model, "lightning_optimizers", **overrides)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt, steps), "interval": "step",
                                               "frequency": 1}}

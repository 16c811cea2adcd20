"""The training recipe around the optimizer: schedule, warmup, weight-decay groups, gradient clipping, batch
scaling — declared by rules like any hyperparameter (the pseudo-candidate ``recipe``), built in one call.

In a rule::

    then:
      params:
        recipe: {schedule: cosine, warmup_fraction: 0.02, final_lr_fraction: 0.1, max_grad_norm: 1.0,
                 decay_embeddings: false}

``rec.build(model, total_steps=N)`` returns a :class:`Recipe`: ``.optimizer`` (the recommended ``kernels``
optimizer over ``model`` in ``create_optimizer``'s groups), ``.scheduler`` (a ``LambdaLR`` stepped once per
optimizer step), ``.loss`` (the loss module) and ``.max_grad_norm`` (a float, or None for no clipping).

The schedule's factor of the base learning rate at optimizer step ``s`` (0-based: the factor the ``s``-th
call of ``optimizer.step()`` uses) over ``T`` steps with ``W = round(warmup_fraction * T)`` warmup steps:

- warmup, ``s < W``: ``(s + 1) / W`` (linear; the first step already moves, the last warmup step is at 1);
- then, with ``p = (s - W) / (T - W)`` (clipped to [0, 1]) and ``f = final_lr_fraction``:
  ``constant``: 1; ``cosine``: ``f + (1 - f) * (1 + cos(pi * p)) / 2``; ``linear``: ``f + (1 - f) * (1 - p)``;
  ``step``: ``gamma ** k``, ``k`` the number of ``milestones`` (fractions of ``T``) with ``s >= m * T``.

Past ``T`` the last factor holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from ._engine import Recommendation

SCHEDULES = ("constant", "cosine", "linear", "step")
BATCH_SCALINGS = ("none", "linear", "sqrt")

# the recipe's hyperparameters as the rule language sees them ("choice:" = one of the listed words)
RECIPE_PARAMS: dict[str, str] = {
    "schedule": "choice:" + "|".join(SCHEDULES),
    "warmup_fraction": "number",
    "final_lr_fraction": "number",
    "milestones": "list[number]",
    "gamma": "number",
    "max_grad_norm": "number",
    "decay_bias_and_norm": "bool",
    "decay_embeddings": "bool",
    "layer_decay": "number",
    "batch_scaling": "choice:" + "|".join(BATCH_SCALINGS),
}


class RecipeSpec(BaseModel):
    """What the rules advise around the optimizer (defaults: what a user gets without us — a constant
    learning rate, no clipping — except that biases and normalization parameters get no weight decay)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    schedule: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the steps spent warming up")
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine/linear: the last factor")
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75],
                                    description="step: fractions of the steps where the rate is cut")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: the cut's factor")
    max_grad_norm: float | None = Field(None, gt=0.0, description="clip the gradients' global norm; None: no")
    decay_bias_and_norm: bool = Field(False, description="weight decay on biases and normalization parameters")
    decay_embeddings: bool = Field(True, description="weight decay on nn.Embedding weights")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="layer-wise lr decay (fine-tuning)")
    batch_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="how the learning rate follows a batch size other than the advised one")

    @model_validator(mode="after")
    def _milestones_in_order(self) -> RecipeSpec:
        ms = self.milestones
        if any(not 0.0 < m < 1.0 for m in ms) or ms != sorted(set(ms)):
            raise ValueError(f"milestones must be increasing fractions of the steps in (0, 1); got {ms}")
        return self

    @property
    def scheduled(self) -> bool:
        """The learning rate changes over the run (a decay or a warmup)."""
        return self.schedule != "constant" or self.warmup_fraction > 0

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.warmup_fraction * total_steps)

    def describe(self, total_steps: int | None = None) -> str:
        """One line for ``explain()``."""
        parts = [self.schedule if self.schedule == "constant" else f"{self.schedule} decay"]
        if self.schedule in ("cosine", "linear"):
            parts[0] += f" to {self.final_lr_fraction:g}x the learning rate" if self.final_lr_fraction else " to 0"
        if self.schedule == "step":
            parts[0] += f" (x{self.gamma:g} at {', '.join(f'{m:g}' for m in self.milestones)} of the steps)"
        if self.warmup_fraction:
            w = f"{self.warmup_fraction:.3g} of the steps"
            parts.append(f"linear warmup over {w}" + (f" ({self.warmup_steps(total_steps)})" if total_steps else ""))
        parts.append(f"clip gradient norm at {self.max_grad_norm:g}" if self.max_grad_norm else "no clipping")
        no_decay = [w for w, on in (("biases and norms", not self.decay_bias_and_norm),
                                    ("embeddings", not self.decay_embeddings)) if on]
        if no_decay:
            parts.append("no weight decay on " + " or ".join(no_decay))
        if self.layer_decay is not None:
            parts.append(f"layer-wise lr decay {self.layer_decay:g}")
        if self.batch_scaling != "none":
            parts.append(f"{self.batch_scaling} learning-rate scaling with the batch size")
        return "; ".join(parts)


class LRFactor:
    """The schedule as ``LambdaLR``'s factor (a class, not a closure: the scheduler's ``state_dict`` keeps it)."""

    def __init__(self, spec: RecipeSpec, total_steps: int):
        self.schedule, self.total = spec.schedule, total_steps
        self.warmup = spec.warmup_steps(total_steps)
        self.final, self.milestones, self.gamma = spec.final_lr_fraction, list(spec.milestones), spec.gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return self.gamma ** sum(step >= m * self.total for m in self.milestones)
        p = min(max((step - self.warmup) / (self.total - self.warmup), 0.0), 1.0)
        if self.schedule == "cosine":
            return self.final + (1.0 - self.final) * (1.0 + math.cos(math.pi * p)) / 2.0
        return self.final + (1.0 - self.final) * (1.0 - p)


@dataclass
class Recipe:
    """What ``Recommendation.build`` returns: ready objects for a training loop."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: torch.nn.Module
    max_grad_norm: float | None
    total_steps: int
    warmup_steps: int
    spec: RecipeSpec

    def clip(self, parameters: Any = None) -> torch.Tensor | None:
        """Clip the gradients' global norm at ``max_grad_norm`` (call between ``backward()`` and ``step()``);
        ``parameters`` default to the optimizer's. Returns the norm before clipping, or None without clipping."""
        if self.max_grad_norm is None:
            return None
        if parameters is None:
            parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)


def _positive_int(value: Any, where: str, argument: str, meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {argument} must be a positive int{meaning}; got {value!r}")
    return value


def check_schedule(name: str, spec: RecipeSpec, where: str) -> None:
    """Refuse a schedule the optimizer cannot take: schedule-free AdamW's averaging is its schedule, and its
    own ``warmup_steps`` argument its warmup (a scheduler on top changes the rate its average is weighted by)."""
    if name.lower().startswith("schedulefree") and spec.scheduled:
        raise ValueError(f"{where}: {name} takes no learning-rate schedule (its averaging replaces one; warm up "
                         f"with its own warmup_steps argument), but the recipe has {spec.describe()}: set the recipe's "
                         "schedule to 'constant' and warmup_fraction to 0, or pick another optimizer")


def grouped_optimizer(name: str, model: torch.nn.Module, spec: RecipeSpec, where: str = "build",
                      **kwargs: Any) -> torch.optim.Optimizer:
    """The ``kernels`` optimizer ``name`` over ``model`` in the recipe's parameter groups (no weight decay on
    biases, normalization parameters and, per the recipe, embeddings; layer-wise rates), with ``kwargs`` its
    arguments; schedule-free AdamW returned in train mode (and refused with a schedule: ``check_schedule``).
    What ``build`` and the trial's runs share."""
    from optadvisor.kernels._factory import create_optimizer

    check_schedule(name, spec, where)
    optimizer = create_optimizer(model, name.lower(), no_decay_bias_and_norm=not spec.decay_bias_and_norm,
                                 layer_decay=spec.layer_decay, no_decay_embeddings=not spec.decay_embeddings, **kwargs)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if untrained:  # create_optimizer groups every trainable parameter: this would be a bug of ours
        raise RuntimeError(f"{where}: parameters in no group: {', '.join(untrained)}")
    if hasattr(optimizer, "train"):  # schedule-free AdamW steps in train mode (optimizer.eval() to evaluate)
        optimizer.train()
    return optimizer


def build(rec: Recommendation, model: torch.nn.Module, total_steps: int, batch_size: int | None = None,
          where: str = "build", argument: str = "total_steps", **overrides: Any) -> Recipe:
    """The recommendation as ready objects over ``model`` for ``total_steps`` optimizer steps.

    ``batch_size``: the batch size you will train with, when it differs from the one advised for
    (``rec.facts.batch_size``): the learning rate follows the recipe's ``batch_scaling`` (linear, square root,
    or not at all). ``overrides`` replace the optimizer's hyperparameters (``lr=...``)."""
    from optadvisor.kernels import _catalog as catalog

    from ._engine import optimizer_arguments

    steps = _positive_int(total_steps, where, argument, " (optimizer steps of the whole run)")
    spec = rec.recipe
    warmup = spec.warmup_steps(steps)
    if warmup >= steps:
        raise ValueError(f"{where}: the warmup ({warmup} steps, warmup_fraction {spec.warmup_fraction:g}) is not "
                         f"shorter than the budget ({argument}={steps}): give more steps")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module (got {type(model).__name__}); for a list of "
                        "parameters use rec.build_optimizer(params)")
    choice = rec.optimizer
    try:
        kwargs = optimizer_arguments(choice, **overrides)
    except ValueError as exc:  # a loss where the optimizer should be
        raise ValueError(f"{where}: {exc}") from None
    entry = catalog.entry(choice.name)
    if batch_size is not None:
        _positive_int(batch_size, where, "batch_size")
        advised = rec.facts.batch_size
        if spec.batch_scaling != "none" and "lr" not in overrides:
            if advised is None:
                raise ValueError(f"{where}: batch_size={batch_size} given, but the advice was made without a batch "
                                 "size to scale from: pass batch_size to advise(...) too")
            ratio = batch_size / advised
            base = kwargs.get("lr", entry.params["lr"].default if "lr" in entry.params else None)
            if base is not None:
                kwargs["lr"] = base * (ratio if spec.batch_scaling == "linear" else math.sqrt(ratio))
    optimizer = grouped_optimizer(choice.name, model, spec, where, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(spec, steps))
    return Recipe(optimizer=optimizer, scheduler=scheduler, loss=rec.build_loss(), max_grad_norm=spec.max_grad_norm,
                  total_steps=steps, warmup_steps=warmup, spec=spec)

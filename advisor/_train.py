"""One training run and its validation yardstick: the protocol ``trial`` and the advice benchmark share.

A run builds a fresh model (seeded), trains it for ``steps`` mini-batches with one optimizer/loss choice at
one learning rate, and evaluates the validation metric every ``eval_every`` steps (and at the end). A run
*diverges* when the training loss or the validation metric stops being finite; it then ends at once and says
where. Everything is deterministic given the seed (CPU).

Metrics (all minimized):

- ``val_loss``: the yardstick loss (the recommended loss) on the validation data;
- ``val_mse`` / ``val_mae`` (regression): mean squared / absolute error;
- ``val_error`` (classification): the misclassification rate;
- ``val_balanced_error`` (classification): the mean over the classes present in the validation data of each
  class's error rate (1 - balanced accuracy), which a model that ignores a rare class cannot win.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._engine import Choice, build_loss, build_optimizer, optimizer_arguments
from ._recipe import LRFactor, RecipeSpec, grouped_optimizer

METRICS = ("val_loss", "val_mse", "val_mae", "val_error", "val_balanced_error")
CLASSIFICATION_METRICS = ("val_error", "val_balanced_error")
REGRESSION_METRICS = ("val_mse", "val_mae")
COMPILE_MIN_PARAMS = 1 << 20


def default_metric(task: str | None, class_imbalance: float | None = None) -> str:
    """The default yardstick: the error rate for classification (balanced when the largest class is more than
    3x the smallest), the mean squared error for regression (what the model is used for, whatever loss
    trained it)."""
    if task == "classification":
        return "val_balanced_error" if class_imbalance is not None and class_imbalance > 3 else "val_error"
    return "val_mse"


def batches(data: Any, batch_size: int, name: str = "train_data") -> Iterable[tuple[Any, Any]]:
    """Endless mini-batches from a DataLoader/iterable of (x, y), or from an (X, y) pair of tensors (in order;
    shuffle the tensors once beforehand if their order means something)."""
    if is_pair(data):
        X, y = data
        if X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise ValueError(f"{name}: X has {X.shape[0]} rows and y has {y.shape[0]}; need equal, > 0")
        while True:
            for i in range(0, X.shape[0], batch_size):
                yield X[i:i + batch_size], y[i:i + batch_size]
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch[0], batch[1]
        if empty:
            raise ValueError(f"{name} yielded no batches")


def is_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def evaluate(model: torch.nn.Module, val_data: Any, metric: str, yardstick: Callable | None = None) -> float:
    """The validation metric of ``model`` (eval mode, no grad; the model is put back in train mode)."""
    model.eval()
    total, count = 0.0, 0
    per_class: dict[int, list[int]] = {}
    try:
        with torch.no_grad():
            for x, y in ([val_data] if is_pair(val_data) else val_data):
                out = model(x)
                if metric == "val_loss":
                    total += float(yardstick(out, y)) * len(y)
                elif metric in CLASSIFICATION_METRICS:
                    wrong = out.argmax(-1) != y
                    total += float(wrong.sum())
                    if metric == "val_balanced_error":
                        for c in torch.unique(y).tolist():
                            mask = y == c
                            acc = per_class.setdefault(int(c), [0, 0])
                            acc[0] += int(wrong[mask].sum())
                            acc[1] += int(mask.sum())
                else:
                    diff = out.reshape(y.shape).double() - y.double()
                    total += float((diff * diff).sum() if metric == "val_mse" else diff.abs().sum())
                count += len(y)
    finally:
        model.train()
    if count == 0:
        raise ValueError("the validation data is empty")
    if metric == "val_balanced_error":
        return sum(w / n for w, n in per_class.values()) / len(per_class)
    return total / count


def fused_for(model: torch.nn.Module) -> bool | None:
    """The kernels optimizers' ``fused`` for short runs: compiled (None) for models of 1M parameters or more,
    eager (False) below, where compiling the first step would cost more than it saves; same update either way."""
    return None if sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS else False


@dataclass
class RunResult:
    """A run's validation curve [(step, value)], where it ended and why, and the time spent training."""

    curve: list[tuple[int, float]] = field(default_factory=list)
    keys: list[float] = field(default_factory=list)
    steps: int = 0
    diverged: str | None = None
    stopped: bool = False
    train_seconds: float = 0.0

    @property
    def best(self) -> tuple[int, float]:
        """(step, value) of the best validation point (by its ranking key; the first of equals): early
        stopping's choice."""
        if not self.curve:
            return 0, math.inf
        i = min(range(len(self.curve)), key=lambda i: (self.keys[i], self.curve[i][0]))
        return self.curve[i]


def train_run(model_fn: Callable[[], torch.nn.Module], seed: int, optimizer: Choice, loss: Choice, lr: float,
              train_data: Any, val_data: Any, steps: int, *, batch_size: int = 64, eval_every: int | None = None,
              metric: str = "val_loss", yardstick: Callable | None = None,
              on_eval: Callable[[int, float], bool] | None = None, weight_decay: float | None = None,
              fused: bool | None = None, tiebreak: tuple[Callable, float] | None = None,
              recipe: RecipeSpec | None = None) -> RunResult:
    """Train a fresh model (``torch.manual_seed(seed)`` before ``model_fn()``) for ``steps`` steps.

    ``on_eval(step, value)`` is called after each evaluation; returning True stops the run there (pruned).
    ``weight_decay`` (when not None) replaces the optimizer choice's. ``fused``: the kernels optimizer's
    (``None``: compiled for models of 1M parameters or more, eager below, where the first step's compile
    would cost more than it saves; the two paths compute the same update).
    ``tiebreak=(loss, weight)``: each point's ranking key (``RunResult.keys``, what ``on_eval`` receives) is the
    metric plus ``weight`` x the validation ``loss`` (capped at 10) — for an error rate, which ties often on
    small validation sets, a weight small enough never to reorder two different error rates.
    ``recipe``: train with it as ``Recommendation.build`` would over ``steps`` steps — the optimizer in the
    recipe's parameter groups, its schedule stepped once per step, the gradients clipped at its
    ``max_grad_norm``; None: one group, a constant rate, no clipping.
    """
    every = eval_every or max(1, steps // 10)
    torch.manual_seed(seed)
    model = model_fn()
    overrides: dict[str, Any] = {"lr": lr, "fused": fused_for(model) if fused is None else fused}
    if weight_decay is not None:
        overrides["weight_decay"] = weight_decay
    schedule = None
    if recipe is None:
        opt = build_optimizer(optimizer, model.parameters(), **overrides)
    else:
        opt = grouped_optimizer(optimizer.name, model, recipe, "train_run", **optimizer_arguments(optimizer, **overrides))
        if recipe.scheduled:
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(recipe, steps))
    clip = None if recipe is None else recipe.max_grad_norm
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_fn = build_loss(loss)
    source = iter(batches(train_data, batch_size))
    result = RunResult()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        x, y = next(source)
        opt.zero_grad()
        value = loss_fn(model(x), y)
        finite = bool(torch.isfinite(value))
        if finite:
            value.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if schedule is not None:
                schedule.step()
        result.train_seconds += time.perf_counter() - t0
        result.steps = step
        if not finite:
            result.diverged = f"the training loss became {float(value.detach())} at step {step}"
            return result
        if step % every == 0 or step == steps:
            v = evaluate(model, val_data, metric, yardstick)
            if not math.isfinite(v):
                result.diverged = f"the validation metric {metric} became {v} at step {step}"
                return result
            key = v
            if tiebreak is not None:
                key += tiebreak[1] * min(evaluate(model, val_data, "val_loss", tiebreak[0]), 10.0)
            result.curve.append((step, v))
            result.keys.append(key)
            if on_eval is not None and on_eval(step, key):
                result.stopped = True
                return result
    return result

"""``lr_range_test``: sweep the learning rate exponentially, watch the loss, suggest where to train.

The sweep (Smith 2017, "Cyclical Learning Rates"; the fastai "LR finder") raises the learning rate from
``start`` to ``end`` geometrically over ``steps`` mini-batches, records the loss, smooths it with a
bias-corrected exponential moving average of a trailing median (the median of the last 3-9 losses: robust to
batches dominated by outliers or noise, which would otherwise pull an average up for many steps and make the
sweep look diverged early), and stops when the smoothed loss exceeds ``diverge_factor`` x its best. Model
parameters, buffers and the RNG state are restored afterwards, exactly.

Suggestions, computed on the smoothed curve without its first and last 10% of points:
- ``steepest``: where the loss falls fastest per unit of log-lr;
- ``valley``: 2/3 of the way down the deepest descending stretch (fastai's "valley", by depth not length);
- ``min_div_10``: the learning rate at the minimum loss, divided by 10.
The recommendation is the valley (robust on noisy curves), capped by min/10 x 3 so that it stays well
below the divergence point; with fewer than 10 usable points no suggestion is made, and the result says so.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ._train import batches as _batches


def pyplot():
    """matplotlib.pyplot on a file backend (plots are an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'optadvisor[plots]'") from exc
    return plt


def save_figure(plt: Any, fig: Any, ax: Any, path: str, xlabel: str, ylabel: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class LRRangeResult(BaseModel):
    """The sweep: learning rates, raw and smoothed losses, suggestions, a recommendation and why."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestions: dict[str, float]
    recommended: float | None
    reasoning: str
    stopped_early: bool

    def plot(self, path: str) -> str:
        """Save the curve with the suggestions marked (PNG or SVG by extension; needs matplotlib)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed")
        for name, lr in self.suggestions.items():
            ax.axvline(lr, linestyle="--", linewidth=1, label=f"{name} {lr:.2g}")
        if self.recommended:
            ax.axvline(self.recommended, color="black", linewidth=1.5, label=f"recommended {self.recommended:.2g}")
        ax.set_xscale("log")
        return save_figure(plt, fig, ax, path, "learning rate", "loss")


def lr_range_test(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  optimizer_factory: Callable[..., torch.optim.Optimizer], train_data: Any, start: float = 1e-7,
                  end: float = 10.0, steps: int = 100, *, batch_size: int = 64, smoothing: float = 0.9,
                  diverge_factor: float = 4.0) -> LRRangeResult:
    """Exponential learning-rate sweep; the model is restored afterwards.

    ``optimizer_factory(params, lr=...)`` builds the optimizer (e.g. ``kernels.Adam`` or
    ``rec.build_optimizer``-style ``lambda p, lr: kernels.SGD(p, lr=lr, momentum=0.9)``).

    Example::

        >>> res = lr_range_test(model, kernels.MSELoss(), lambda p, lr: kernels.Adam(p, lr=lr), (X, y))
        >>> res.recommended, res.reasoning
    """
    if not (0 < start < end):
        raise ValueError(f"lr_range_test: need 0 < start < end (got start={start}, end={end})")
    if steps < 2:
        raise ValueError(f"lr_range_test: steps must be >= 2 (got {steps})")
    if not 0 <= smoothing < 1:
        raise ValueError(f"lr_range_test: smoothing must be in [0, 1) (got {smoothing})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lr_range_test: the model has no trainable parameters")
    saved_state = copy.deepcopy(model.state_dict())
    saved_rng = torch.get_rng_state()
    was_training = model.training
    lrs, losses, smoothed = [], [], []
    stopped = False
    try:
        opt = optimizer_factory(model.parameters(), lr=start)
        model.train()
        ratio = (end / start) ** (1 / (steps - 1))
        avg, best = 0.0, math.inf
        window: list[float] = []
        median_window = max(3, min(9, steps // 12) | 1)
        batches = iter(_batches(train_data, batch_size, "lr_range_test"))
        for i in range(steps):
            lr = start * ratio ** i
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = True
                break
            loss.backward()
            opt.step()
            # a trailing median first: one batch full of outliers is a spike the median ignores, where a
            # mean (and an EMA of raw losses) would carry it for many steps
            window.append(value)
            robust = statistics.median(window[-median_window:])
            avg = smoothing * avg + (1 - smoothing) * robust
            smooth = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            if i > 0 and smooth > diverge_factor * best:
                stopped = True
                break
    finally:
        model.load_state_dict(saved_state)
        torch.set_rng_state(saved_rng)
        model.train(was_training)
    suggestions, recommended, reasoning = _suggest(lrs, smoothed, stopped)
    return LRRangeResult(lrs=lrs, losses=losses, smoothed=smoothed, suggestions=suggestions,
                         recommended=recommended, reasoning=reasoning, stopped_early=stopped)


def _suggest(lrs: list[float], smooth: list[float], stopped: bool) -> tuple[dict[str, float], float | None, str]:
    n = len(lrs)
    cut = max(1, n // 10)
    idx = list(range(cut, n - cut))
    if len(idx) < 10:
        return {}, None, (f"only {n} points before {'divergence' if stopped else 'the end'} ({len(idx)} after "
                          "trimming the first and last 10%): too few to suggest a learning rate; sweep more steps "
                          "or start lower")
    logs = [math.log(lr) for lr in lrs]
    slopes = {i: (smooth[i + 1] - smooth[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in idx}
    steepest = min(slopes, key=slopes.get)
    i_min = min(idx, key=lambda i: smooth[i])
    # the descent (a stretch of decreasing smoothed loss) with the largest total drop: on a noisy curve the
    # longest stretch can be an early wiggle, the deepest one is where the model actually learns
    best_drop, best_start, best_len, run_start = -1.0, idx[0], 0, idx[0]
    for a, b in zip(idx, idx[1:]):
        if smooth[b] >= smooth[a]:
            run_start = b
        elif smooth[run_start] - smooth[b] > best_drop:
            best_drop, best_start, best_len = smooth[run_start] - smooth[b], run_start, b - run_start
    valley = best_start + (2 * best_len) // 3
    suggestions = {"steepest": lrs[steepest], "valley": lrs[valley], "min_div_10": lrs[i_min] / 10}
    cap = 3 * suggestions["min_div_10"]
    recommended = min(suggestions["valley"], cap)
    reasoning = (f"the smoothed loss is lowest at lr={lrs[i_min]:.3g}{' before it diverged' if stopped else ''}; "
                 f"it falls fastest at {lrs[steepest]:.3g}; the deepest descent runs from {lrs[best_start]:.3g} to "
                 f"{lrs[best_start + best_len]:.3g}. Recommended: the valley point 2/3 along that descent "
                 f"({suggestions['valley']:.3g})" + (f", capped at 3 x (min/10) = {cap:.3g}" if recommended == cap and
                                                    cap < suggestions["valley"] else ""))
    return suggestions, recommended, reasoning

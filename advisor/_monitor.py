"""Watching training: a small recorder for plain PyTorch loops, and ``diagnose`` that turns curves into facts.

Each finding names the steps and numbers that show it. The facts it sets (``diverged``, ``exploding_gradients``,
``plateau``, ``noisy_loss``, ``overfitting``, ``loss_rising``, ``lr_too_low``, ``grad_norm_p90``) are
``TaskProfile`` fields, so ``rules/diagnostics.yaml`` maps them to actions like any other rule, and
``advise(profile, history=monitor)`` folds them into the recommendation.

Thresholds (documented, deliberately simple; smoothing is a centered running median):
- diverged: a non-finite training loss, or a smoothed loss above 4x its best after the first 10% of steps;
- exploding_gradients: a non-finite gradient norm, or one above 10x the median norm;
- plateau: over the last quarter of steps the smoothed loss improved by less than 1% (and it is not at ~0);
- noisy_loss: residuals around the smoothed curve, in the second half, have a spread above 25% of its level;
- overfitting: validation loss rose more than 5% above its minimum, for at least two records after it,
  while the training loss kept falling;
- loss_rising: the smoothed training loss at the end is more than 10% above its value at mid-run;
- lr_too_low: the loss falls steadily (over 90% of smoothed steps go down) but by less than 20% in total.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import operator
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ._yaml import load_json, read_text

METRICS = ("train_loss", "val_loss", "grad_norm", "lr")


class TrainingMonitor:
    """Record metrics from a training loop; pass it (or its ``history``) to ``diagnose`` or ``advise``.

    Example::

        >>> monitor = TrainingMonitor()
        >>> for step in range(100):
        ...     loss = train_step()
        ...     monitor.log(step, train_loss=loss.item(), grad_norm=norm, lr=opt.param_groups[0]["lr"])
        >>> print(diagnose(monitor).explain())
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def log(self, step: int, **metrics: float) -> None:
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"TrainingMonitor.log: unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}")
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"TrainingMonitor.log: 'step' must be an int (got {type(step).__name__})")
        row: dict[str, float] = {"step": step}
        for k, v in metrics.items():
            if v is None:
                continue
            if hasattr(v, "item"):
                v = v.item()
            row[k] = float(v)
        self.history.append(row)

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *METRICS])
            writer.writeheader()
            writer.writerows(self.history)

    @classmethod
    def load(cls, path: str | Path) -> TrainingMonitor:
        """Read a history written by ``to_csv`` or a JSON list of records."""
        path = Path(path)
        monitor = cls()
        text = read_text(path, "training history")
        if path.suffix == ".json":
            rows = load_json(text, str(path))
        else:
            try:
                rows = list(csv.DictReader(io.StringIO(text, newline="")))
            except csv.Error as exc:
                raise ValueError(f"{path}: malformed CSV: {exc}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a history is a list of records")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not all(isinstance(k, str) for k in row):
                raise ValueError(f"{path}: record {i + 1}: expected a mapping of column names to numbers")
            try:
                step = float(row["step"])
                if not (math.isfinite(step) and step == int(step)):
                    raise ValueError(f"step must be a finite integer (got {row['step']!r})")
                monitor.log(int(step), **{k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)})
            except KeyError:
                raise ValueError(f"{path}: record {i + 1}: no 'step'") from None
            except (ValueError, TypeError, OverflowError) as exc:
                raise ValueError(f"{path}: record {i + 1}: {exc}") from None
        return monitor


class Finding(BaseModel):
    """One condition seen in the curves, with the evidence."""

    fact: str
    steps: list[int] = Field(default_factory=list)
    numbers: dict[str, float] = Field(default_factory=dict)
    message: str


class Diagnosis(BaseModel):
    """What the curves show: findings, the facts they set for the rules, and the facts the history cannot
    settle (``unknown``: fact -> what to log). A fact not measured is unknown, never false."""

    findings: list[Finding]
    facts: dict[str, Any]
    n_records: int
    unknown: dict[str, str] = Field(default_factory=dict)

    def explain(self) -> str:
        if not self.findings:
            lines = [f"Diagnosis of {self.n_records} records: nothing abnormal found."]
        else:
            lines = [f"Diagnosis of {self.n_records} records:"]
            lines += [f"  - {f.fact}: {f.message}" for f in self.findings]
        lines += [f"  ? {fact} unknown: {why}" for fact, why in self.unknown.items()]
        return "\n".join(lines)


def _by_step(records: list[Mapping[str, float]]) -> list[Mapping[str, float]]:
    """The records in step order (a history stored newest-first reads as it happened), those of one step
    merged (a train record and a validation record logged apart); one metric given twice for a step is
    refused: which value is the step's?"""
    steps = [int(r["step"]) for r in records]
    if all(map(operator.lt, steps, steps[1:])):  # already in order, one record a step: the usual history
        return records
    merged: dict[int, dict[str, float]] = {}
    for r in records:
        step = int(r["step"])
        row = merged.setdefault(step, {"step": step})
        for key, value in r.items():
            if key == "step" or value is None:
                continue
            if key in row and not (row[key] == value or (row[key] != row[key] and value != value)):
                raise ValueError(f"diagnose: step {step} has two values of {key} ({row[key]!r} and {value!r}); "
                                 "log each metric once per step")
            row[key] = value
    return [merged[s] for s in sorted(merged)]


def _series(history: list[Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in history:  # one pass, no tuples: a million records are read four times
        v = r.get(key)
        if v is not None:
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def _running_median(values: list[float], window: int) -> list[float]:
    """The median of ``values[i - half : i + half + 1]`` for each ``i`` (``half = window // 2``, at least 1),
    as ``statistics.median`` computes it, over a sliding window in O(n log window): a max-heap of the lower
    half (negated), a min-heap of the upper half, removals deferred until a removed value reaches a top.
    Sorting a fresh window per record (what this replaced) took 21-45 s for 60k-80k records. Written as one
    loop: method calls cost more than the heap operations at a million records."""
    half = max(1, window // 2)
    n = len(values)
    low: list[float] = []   # negated: a max-heap
    high: list[float] = []
    sizes = [0, 0]          # live elements in low, high
    removed: dict[float, int] = {}
    push, pop = heapq.heappush, heapq.heappop

    def prune(heap: list[float], sign: int) -> None:
        while heap:
            x = sign * heap[0]
            count = removed.get(x)
            if not count:
                return
            if count == 1:
                del removed[x]
            else:
                removed[x] = count - 1
            pop(heap)

    def balance() -> None:
        if sizes[0] > sizes[1] + 1:
            push(high, -pop(low))
            sizes[0] -= 1
            sizes[1] += 1
            prune(low, -1)
        elif sizes[0] < sizes[1]:
            push(low, -pop(high))
            sizes[0] += 1
            sizes[1] -= 1
            prune(high, 1)

    def add(x: float) -> None:
        if not low or x <= -low[0]:
            push(low, -x)
            sizes[0] += 1
        else:
            push(high, x)
            sizes[1] += 1
        if sizes[0] > sizes[1] + 1 or sizes[0] < sizes[1]:
            balance()

    for x in values[:min(n, half)]:
        add(x)
    out = []
    append = out.append
    for i in range(n):
        if i + half < n:
            add(values[i + half])
        if i > half:
            x = values[i - half - 1]
            removed[x] = removed.get(x, 0) + 1
            if x <= -low[0]:
                sizes[0] -= 1
                if x == -low[0]:
                    prune(low, -1)
            else:
                sizes[1] -= 1
                if x == high[0]:
                    prune(high, 1)
            if sizes[0] > sizes[1] + 1 or sizes[0] < sizes[1]:
                balance()
        append(-low[0] if (sizes[0] + sizes[1]) % 2 else (-low[0] + high[0]) / 2)
    return out


def diagnose(history: TrainingMonitor | Iterable[Mapping[str, float]]) -> Diagnosis:
    """Turn training curves into facts for the rules. ``history``: a TrainingMonitor or a list of records
    ``{"step": int, "train_loss": float, "val_loss": ..., "grad_norm": ..., "lr": ...}``."""
    given = list(history.history if isinstance(history, TrainingMonitor) else history)
    records = _by_step(given)
    steps, loss = _series(records, "train_loss")
    if not loss:
        raise ValueError("diagnose: the history has no train_loss values")
    findings: list[Finding] = []
    facts: dict[str, Any] = {}
    unknown: dict[str, str] = {}

    def add(fact: str, message: str, steps_: list[int], **numbers: float) -> None:
        facts[fact] = True
        findings.append(Finding(fact=fact, steps=steps_[:10], numbers=numbers, message=message))

    bad = [s for s, v in zip(steps, loss) if not math.isfinite(v)]
    finite = [(s, v) for s, v in zip(steps, loss) if math.isfinite(v)]
    if bad:
        add("diverged", f"training loss is not finite from step {bad[0]} ({len(bad)} records)", bad)
    n = len(finite)
    if n >= 8 or bad:
        facts["diverged"] = bool(bad)
    else:
        unknown["diverged"] = f"needs at least 8 finite train_loss records (the history has {n})"
    smooth = _running_median([v for _, v in finite], max(3, n // 20)) if n else []
    fs = [s for s, _ in finite]
    if n >= 8 and not bad:
        warm = max(1, n // 10)
        best = min(smooth[warm:] or smooth)
        worst_i = max(range(warm, n), key=lambda i: smooth[i])
        if best > 0 and smooth[worst_i] > 4 * best and smooth[-1] > 2 * best:
            add("diverged", f"smoothed loss reached {smooth[worst_i]:.4g} at step {fs[worst_i]}, over 4x its "
                f"best {best:.4g}", [fs[worst_i]], best=best, peak=smooth[worst_i])
    gsteps, gnorm = _series(records, "grad_norm")
    if not gnorm:
        unknown["exploding_gradients"] = "log grad_norm (the gradient's norm each step)"
    else:
        facts["exploding_gradients"] = False
        finite_g = [g for g in gnorm if math.isfinite(g)]
        if finite_g:
            ordered = sorted(finite_g)
            facts["grad_norm_p90"] = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        med = statistics.median(finite_g) if finite_g else float("nan")
        spikes = [s for s, g in zip(gsteps, gnorm) if not math.isfinite(g) or (med > 0 and g > 10 * med)]
        if spikes:
            add("exploding_gradients", f"gradient norm above 10x its median {med:.4g} (or not finite) at "
                f"{len(spikes)} steps, first {spikes[0]}; clip at about the 90th percentile "
                f"{facts.get('grad_norm_p90', float('nan')):.4g}", spikes, median=med,
                p90=facts.get("grad_norm_p90", float("nan")))
    curve_facts = ("plateau", "noisy_loss", "loss_rising", "lr_too_low")
    if n >= 8 and not facts["diverged"]:
        facts.update(dict.fromkeys(curve_facts, False))
        q = max(2, n // 4)
        start, end = smooth[-q], smooth[-1]
        scale = max(abs(v) for v in smooth) or 1.0
        if start > 0 and (start - end) / start < 0.01 and end > 1e-3 * scale:
            add("plateau", f"over the last {q} records (steps {fs[-q]}-{fs[-1]}) the smoothed loss moved from "
                f"{start:.4g} to {end:.4g} (< 1% better)", [fs[-q], fs[-1]], start=start, end=end)
        half = n // 2
        resid = [abs(v - m) for (_, v), m in zip(finite[half:], smooth[half:])]
        level = statistics.median([abs(m) for m in smooth[half:]]) or 1.0
        spread = statistics.median(resid) * 1.4826 / level if resid else 0.0
        if spread > 0.25:
            add("noisy_loss", f"in the second half the loss scatters by {spread:.0%} of its level around the "
                "smoothed curve", [fs[half], fs[-1]], relative_spread=spread)
        mid = smooth[half]
        if mid > 0 and smooth[-1] > 1.1 * mid:
            add("loss_rising", f"smoothed training loss rose from {mid:.4g} (step {fs[half]}) to "
                f"{smooth[-1]:.4g} (step {fs[-1]})", [fs[half], fs[-1]], mid=mid, end=smooth[-1])
        downs = sum(1 for a, b in zip(smooth, smooth[1:]) if b < a)
        moving = sum(1 for a, b in zip(smooth, smooth[1:]) if b != a) or 1
        total = (smooth[0] - smooth[-1]) / smooth[0] if smooth[0] > 0 else 0.0
        if downs / moving > 0.9 and 0 < total < 0.2 and not facts["plateau"]:
            add("lr_too_low", f"the loss falls steadily ({downs}/{moving} smoothed steps down) but only "
                f"{total:.0%} over steps {fs[0]}-{fs[-1]}: the learning rate is likely too low",
                [fs[0], fs[-1]], total_decrease=total)
    elif n >= 8:
        unknown.update(dict.fromkeys(curve_facts, "not judged: the loss diverged"))
    else:
        unknown.update(dict.fromkeys(curve_facts, f"needs at least 8 finite train_loss records (the history "
                                                  f"has {n})"))
    vsteps, val = _series(records, "val_loss")
    if len(val) < 4 or not all(math.isfinite(v) for v in val):
        unknown["overfitting"] = (f"log val_loss (at least 4 finite values; the history has "
                                  f"{sum(map(math.isfinite, val))})")
    else:
        facts["overfitting"] = False
        i_min = min(range(len(val)), key=lambda i: val[i])
        after = val[i_min + 1:]
        rising = [v for v in after if v > 1.05 * val[i_min]]
        train_at = [v for s, v in finite if s <= vsteps[i_min]]
        train_end = [v for s, v in finite if s >= vsteps[-1]] or [finite[-1][1]] if finite else []
        if len(rising) >= 2 and val[-1] > 1.05 * val[i_min] and train_at and train_end and \
                train_end[0] < train_at[-1]:
            add("overfitting", f"validation loss rose from its minimum {val[i_min]:.4g} (step {vsteps[i_min]}) "
                f"to {val[-1]:.4g} (step {vsteps[-1]}) while training loss fell from {train_at[-1]:.4g} to "
                f"{train_end[0]:.4g}: stop early or regularize", [vsteps[i_min], vsteps[-1]],
                val_min=val[i_min], val_end=val[-1])
    lrs = [v for _, v in zip(*_series(records, "lr")) if math.isfinite(v) and v > 0]
    if lrs:
        facts["last_lr"] = lrs[-1]
    return Diagnosis(findings=findings, facts=facts, n_records=len(given), unknown=unknown)

"""``python -m benchmarks families``: the whole training recipe on the model families users train.

Six CPU-sized workloads in two halves, each a real model on data shipped with Python, scikit-learn or a
generator. The **fitting half** (``--half fit``) is what any change to the family rules was decided on; the
**reporting half** (``--half report``, the default) is each one's held-out twin, never used to decide anything:

- ``cnn``: a small convolutional network (three 3x3 convolutions with BatchNorm, 57k parameters) on
  scikit-learn's 8x8 digits as 1x8x8 images (75/25 split, fixed), 400 steps of batch 64, from scratch;
  twin ``cnn1d``: a 1-D CNN (24k) on MNIST-1D (the ``mnist1d`` generator's 4,000 + 1,000 signals), 400 steps;
- ``charlm``: a character-level transformer language model (2 pre-norm blocks, d=64, 4 heads, context 64,
  116k parameters) on the text of four of Python's standard-library modules (the 90/10 split of
  ``benchmarks.quality``), 600 steps of batch 32, from scratch; twin ``charlm-b``: the same model on six other
  standard-library modules' text;
- ``finetune``: the CNN pretrained (one checkpoint: 400 steps of Adam 1e-3 on the digits 0-4), its head
  replaced by a fresh 5-way one, fine-tuned on a quarter of the training images of the digits 5-9 (the
  validation images of 5-9 judge it), 200 steps of batch 32; twin ``finetune-b``: pretrained on 5-9,
  fine-tuned on 0-4.

For each workload:

- **naive**: what a user picks without us — ``kernels.Adam`` at lr 1e-3, constant, every parameter in one group,
  no clipping, cross-entropy;
- **advised**: ``advise(...)`` on the facts a user would give (task, model kind and size from
  ``profile_model``, samples, classes, batch size, budget, pretrained) and ``rec.build(model, total_steps)`` —
  the advised optimizer in its parameter groups, the scheduler stepped once per step, the loss, the clipping;
- **grid**: ``kernels.Adam`` at lr 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, each constant and with 5% linear warmup then
  cosine decay to zero (ten recipes: what a careful user's small grid would try);
- **trial**: ``advisor.trial`` seeded by the advice, searching optimizer, loss, learning rate, weight decay and
  the recipe (schedule or constant, warmup) on its own cut of the training data (80/20; the benchmark's
  validation data stays unseen) with its own seeds (100-102), 16 configurations; its recommendation is then
  built with ``rec.build`` and trained like the others. Its cost in steps is reported against the grid's.

The yardstick is the validation cross-entropy (the language model's natural metric; for the image
workloads the validation error is reported beside it), evaluated 20 times per run, averaged over the seeds
(three for the image workloads, two for the language models). **Time to target** (as in MLCommons' AlgoPerf):
the first evaluated step at which a recipe's mean validation loss reaches the naive recipe's final one, as a
fraction of the budget (the target: <= 0.7). **Near best**: the final value within 2% of the grid's best.

Writes DIR/families[-fit|-report|-both].md and .json (``--out DIR``, default ``benchmarks/latest``; the half's
name in the file's). ``--quick``: a tenth of the steps, one seed, two grid points, a small trial (a smoke test:
its numbers mean nothing). Needs scikit-learn and, for ``cnn1d``, ``pip install -e '.[families]'``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from optadvisor import kernels
from optadvisor.advisor import advise, profile_model
from optadvisor.advisor._recipe import LRFactor, RecipeSpec

EVALS = 20
GRID_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
GRID_SCHEDULES = {"constant": RecipeSpec(), "cosine": RecipeSpec(schedule="cosine", warmup_fraction=0.05)}
TIME_TO_TARGET = 0.7
NEAR_BEST = 1.02


# ---- data and models ---------------------------------------------------------------------------------------
def _digits() -> tuple[torch.Tensor, torch.Tensor, int]:
    """scikit-learn's digits as standardized 1x8x8 images, in a fixed shuffled order; the training cut."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order].reshape(-1, 1, 8, 8)
    y = torch.tensor(y)[order]
    cut = int(0.75 * len(y))
    x = (x - x[:cut].mean()) / x[:cut].std()
    return x, y, cut


class SmallCNN(torch.nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()

        def block(i: int, o: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

        self.features = torch.nn.Sequential(*block(1, 32), *block(32, 64), torch.nn.MaxPool2d(2), *block(64, 64),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _sampler(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        yield x[idx], y[idx]


class _LM(torch.nn.Module):
    """The character LM with its logits as (batch, vocab, context): what cross-entropy takes with (batch,
    context) targets, so that (X, y) pairs of windows work with the trial as they do here."""

    def __init__(self, vocab: int):
        super().__init__()
        from .quality import _CharLM

        self.lm = _CharLM(vocab, d=64, heads=4, blocks=2, context=64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(idx).transpose(1, 2)


def _split(x: torch.Tensor, y: torch.Tensor, share: float = 0.8, max_val: int | None = None) -> tuple[tuple, tuple]:
    """The trial's own (train, validation) pairs: the first ``share`` of the (already shuffled) training rows
    and the rest (at most ``max_val`` of them) — the benchmark's validation rows stay unseen by the trial."""
    k = int(share * len(y))
    end = len(y) if max_val is None else min(len(y), k + max_val)
    return (x[:k], y[:k]), (x[k:end], y[k:end])


@dataclass
class Workload:
    name: str
    description: str
    steps: int
    batch: int
    seeds: tuple[int, ...]
    facts: dict[str, Any]
    model_fn: Callable[[], torch.nn.Module]   # a fresh model (the caller seeds torch first)
    train: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # seed -> endless batches
    val: tuple[torch.Tensor, torch.Tensor]
    trial_data: Callable[[], tuple[tuple, tuple]]  # (train, validation) pairs, both cut from the training data
    report_error: bool = True
    cache: dict[str, Any] = field(default_factory=dict)


def cnn_workload(steps: int = 400, seeds: tuple[int, ...] = (0, 1, 2)) -> Workload:
    x, y, cut = _digits()
    return Workload("cnn", "small CNN on 8x8 digits, from scratch", steps, 64, seeds,
                    {"task": "classification", "n_samples": cut, "n_classes": 10}, SmallCNN,
                    lambda seed: _sampler(x[:cut], y[:cut], 64, seed), (x[cut:], y[cut:]),
                    lambda: _split(x[:cut], y[:cut]))


HELD_OUT_TEXT = ("http.client", "email.message", "unittest.case", "pathlib", "json.decoder", "json.encoder")


def _text_of(modules: tuple[str, ...]) -> str:
    import importlib

    return "".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def charlm_workload(steps: int = 600, seeds: tuple[int, ...] = (0, 1), held_out: bool = False) -> Workload:
    from .quality import _corpus

    text = _text_of(HELD_OUT_TEXT) if held_out else _corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(ch) for ch in text])
    cut, context = int(0.9 * len(data)), 64
    starts = torch.arange(cut, len(data) - context - 1, (len(data) - cut - context - 1) // 128)[:128]

    def windows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([data[i:i + context + 1] for i in s.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def train(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield windows(torch.randint(0, cut - context - 1, (32,), generator=gen))

    def trial_data() -> tuple[tuple, tuple]:  # the training text in windows every 32 characters, shuffled once
        tiled = torch.arange(0, cut - context - 1, 32)
        return _split(*windows(tiled[torch.randperm(len(tiled), generator=torch.Generator().manual_seed(0))]),
                      max_val=256)  # as many windows as the benchmark's validation (128) and then some

    name, where = (("charlm-b", "other stdlib modules' text (" + ", ".join(HELD_OUT_TEXT) + ")") if held_out else
                   ("charlm", "Python's stdlib text (argparse, collections, inspect, typing)"))
    return Workload(name, f"char-level transformer LM on {where}, from scratch", steps, 32,
                    seeds, {"task": "classification", "n_samples": cut // context, "n_classes": len(chars)},
                    lambda: _LM(len(chars)), train, windows(starts), trial_data, report_error=False)


def finetune_workload(steps: int = 200, seeds: tuple[int, ...] = (0, 1, 2), pretrain_steps: int = 400,
                      reverse: bool = False) -> Workload:
    """Pretrain on the digits 0-4, fine-tune on 5-9 (``reverse``: pretrain on 5-9, fine-tune on 0-4)."""
    x, y, cut = _digits()
    first = (y >= 5) if reverse else (y < 5)  # the pretraining classes
    low_tr, high_tr = first[:cut], ~first[:cut]
    shift = 0 if reverse else 5
    xh, yh = x[:cut][high_tr], y[:cut][high_tr] - shift
    keep = len(yh) // 4
    val_mask = ~first[cut:]
    box: dict[str, Any] = {}

    def pretrained() -> dict[str, torch.Tensor]:
        if "state" not in box:  # one checkpoint, as a user has one: pretraining's own seed, outside the runs'
            rng = torch.get_rng_state()
            torch.manual_seed(1234)
            net = SmallCNN(10)
            opt = kernels.Adam(net.parameters(), lr=1e-3, fused=False)
            source = _sampler(x[:cut][low_tr], y[:cut][low_tr], 64, 1234)
            for _ in range(pretrain_steps):
                xb, yb = next(source)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xb), yb).backward()
                opt.step()
            box["state"] = {k: v.detach().clone() for k, v in net.features.state_dict().items()}
            torch.set_rng_state(rng)
        return box["state"]

    def model_fn() -> torch.nn.Module:
        state = pretrained()
        net = SmallCNN(5)  # the fresh head is drawn from the caller's seed
        net.features.load_state_dict(state)
        return net

    a, b = ("5-9", "0-4") if reverse else ("0-4", "5-9")
    return Workload("finetune-b" if reverse else "finetune",
                    f"the CNN pretrained on digits {a}, fine-tuned on {b} (a quarter of their images)", steps, 32, seeds, {"task": "classification", "n_samples": keep, "n_classes": 5, "pretrained": True},
                    model_fn, lambda seed: _sampler(xh[:keep], yh[:keep], 32, seed),
                    (x[cut:][val_mask], y[cut:][val_mask] - shift), lambda: _split(xh[:keep], yh[:keep]))


class SmallCNN1d(torch.nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()

        def block(i: int, o: int, k: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv1d(i, o, k, padding=k // 2), torch.nn.BatchNorm1d(o), torch.nn.ReLU()]

        self.features = torch.nn.Sequential(*block(1, 32, 5), *block(32, 64, 5), torch.nn.MaxPool1d(2),
                                            *block(64, 64, 3), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn1d_workload(steps: int = 400, seeds: tuple[int, ...] = (0, 1, 2)) -> Workload:
    """A 1-D CNN on MNIST-1D (Greydanus 2020: 4,000 + 1,000 signals of 40 points, generated offline by the
    ``mnist1d`` package from its fixed seed): the image family's held-out workload."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise SystemExit("python -m benchmarks families: the held-out CNN workload needs the mnist1d generator: "
                         "pip install -e '.[families]'") from exc
    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    xt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    mean, std = x.mean(), x.std()
    x, xt = (x - mean) / std, (xt - mean) / std
    y, yt = torch.tensor(d["y"]), torch.tensor(d["y_test"])
    return Workload("cnn1d", "small 1-D CNN on MNIST-1D signals, from scratch", steps, 64, seeds,
                    {"task": "classification", "n_samples": len(y), "n_classes": 10}, SmallCNN1d,
                    lambda seed: _sampler(x, y, 64, seed), (xt, yt), lambda: _split(x, y))


# the fitting half (what any rule change was decided on) and the reporting half (each family's held-out twin)
FIT = {"cnn": cnn_workload, "charlm": charlm_workload, "finetune": finetune_workload}
REPORT = {"cnn1d": cnn1d_workload, "charlm-b": functools.partial(charlm_workload, held_out=True),
          "finetune-b": functools.partial(finetune_workload, reverse=True)}
WORKLOADS = {**FIT, **REPORT}


# ---- recipes -----------------------------------------------------------------------------------------------
def advised_recommendation(w: Workload):
    """What ``advise`` says for the workload's facts, with the model's own facts from ``profile_model``."""
    torch.manual_seed(0)
    model_facts = profile_model(w.model_fn()).facts
    facts = {**w.facts, "model_kind": model_facts["model_kind"], "n_params": model_facts["n_params"],
             "batch_size": w.batch, "budget_steps": w.steps}
    return advise(**facts)


def _setup(w: Workload, recipe: dict[str, Any], model: torch.nn.Module):
    """(optimizer, scheduler or None, loss, max_grad_norm) of a recipe over ``model``."""
    if recipe["kind"] in ("advised", "trial"):
        rec = advised_recommendation(w) if recipe["kind"] == "advised" else recipe["recommendation"]
        built = rec.build(model, total_steps=w.steps)
        return built.optimizer, built.scheduler, built.loss, built.max_grad_norm
    opt = kernels.Adam(model.parameters(), lr=recipe["lr"], fused=False)
    spec = GRID_SCHEDULES[recipe["schedule"]]
    sched = None if spec.schedule == "constant" else torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(spec, w.steps))
    return opt, sched, torch.nn.CrossEntropyLoss(), None


def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(validation cross-entropy, validation error) in eval mode."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(val[0])
            return (float(torch.nn.functional.cross_entropy(out, val[1])),
                    float((out.argmax(1) != val[1]).float().mean()))
    finally:
        model.train()


def run(w: Workload, recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    """One training run: the curve of (step, validation loss, validation error), 20 points."""
    torch.manual_seed(seed)
    model = w.model_fn()
    opt, sched, loss_fn, clip = _setup(w, recipe, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    source = w.train(seed)
    every = max(1, w.steps // EVALS)
    curve: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    for step in range(1, w.steps + 1):
        xb, yb = next(source)
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        if not torch.isfinite(loss):
            curve.append((step, math.inf, 1.0))
            break
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        if step % every == 0 or step == w.steps:
            curve.append((step, *evaluate(model, w.val)))
    return {"curve": curve, "seconds": time.perf_counter() - t0}


def recipes(quick: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"naive": {"kind": "grid", "lr": 1e-3, "schedule": "constant"},
                                      "advised": {"kind": "advised"}}
    lrs = (1e-3, 1e-2) if quick else GRID_LRS
    for lr in lrs:
        for sched in (("cosine",) if quick else GRID_SCHEDULES):
            out[f"Adam {lr:g} {sched}"] = {"kind": "grid", "lr": lr, "schedule": sched}
    return out


# ---- the measurement ---------------------------------------------------------------------------------------
TRIAL_SEEDS = (100, 101, 102)  # the trial's own seeds: none of the benchmark's


def trial_recipe(w: Workload, quick: bool, storage: str) -> dict[str, Any]:
    """``advisor.trial`` on the workload's training data alone (its own train/validation cut), seeded by the
    advice; its recommendation, what it cost, and its verdict."""
    from optadvisor.advisor import trial

    train, val = w.trial_data()
    t0 = time.perf_counter()
    res = trial(w.model_fn, train, val, advised_recommendation(w), budget_steps=w.steps, batch_size=w.batch,
                metric="val_loss", n_trials=6 if quick else 16, top_k=1 if quick else 2,
                seeds=TRIAL_SEEDS[:2] if quick else TRIAL_SEEDS, lr_steps=20 if quick else 40, storage=storage,
                progress=False)
    rec = res.recommendation
    return {"kind": "trial", "recommendation": rec, "steps": res.steps_total, "seconds": time.perf_counter() - t0,
            "verdict": res.verdict, "advice": describe(rec, w.steps)}


def describe(rec, steps: int) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(rec.optimizer.params.items()))
    return f"{rec.optimizer.name}({params}) + {rec.loss.name}; {rec.recipe.describe(steps)}"


def _job(args: tuple[str, bool, str, dict[str, Any], int | None, str]) -> tuple[str, str, Any, Any]:
    """One run (seed given), or the trial with its runs on every benchmark seed (seed None)."""
    name, quick, label, recipe, seed, tmp = args
    torch.set_num_threads(1)
    w = make_workload(name, quick)
    if seed is not None:
        return name, label, seed, run(w, recipe, seed)
    found = trial_recipe(w, quick, os.path.join(tmp, f"{name}.db"))
    runs = [run(w, found, s) for s in w.seeds]
    found.pop("recommendation")
    return name, label, found, runs


_MADE: dict[tuple[str, bool], Workload] = {}


def make_workload(name: str, quick: bool) -> Workload:
    if (name, quick) not in _MADE:
        factory = WORKLOADS[name]
        if quick:
            full = factory()
            kwargs = {"steps": max(EVALS, full.steps // 10), "seeds": full.seeds[:1]}
            if name == "finetune":
                kwargs["pretrain_steps"] = 40
            _MADE[(name, quick)] = factory(**kwargs)
        else:
            _MADE[(name, quick)] = factory()
    return _MADE[(name, quick)]


def mean_curve(runs: list[dict[str, Any]], column: int) -> list[tuple[int, float]]:
    """The seeds' mean of one column at each evaluated step (the advice benchmark's: a step some seed lacks,
    where a diverged run stopped, is inf)."""
    from .advice import mean_curve as seeds_mean

    return seeds_mean([[(p[0], p[column]) for p in r["curve"]] for r in runs])


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def summarize(w: Workload, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per recipe: final mean loss (and error), steps to the naive recipe's final loss; the grid's best."""
    rows = {}
    for label, runs in results.items():
        loss = mean_curve(runs, 1)
        rows[label] = {"final_loss": loss[-1][1], "final_error": mean_curve(runs, 2)[-1][1], "loss_curve": loss,
                       "seconds": sum(r["seconds"] for r in runs) / len(runs)}
    target = rows["naive"]["final_loss"]
    for row in rows.values():
        hit = steps_to(row["loss_curve"], target)
        row["steps_to_target"] = hit
        row["time_to_target"] = None if hit is None else hit / w.steps
    grid = {k: v for k, v in rows.items() if k.startswith("Adam ")}
    best = min(grid, key=lambda k: grid[k]["final_loss"])
    return {"rows": rows, "target": target, "grid_best": best, "grid_best_loss": grid[best]["final_loss"]}


def verdicts(summary: dict[str, Any], label: str = "advised") -> dict[str, bool]:
    row = summary["rows"][label]
    ttt = row["time_to_target"]
    return {"time_to_target_ok": ttt is not None and ttt <= TIME_TO_TARGET,
            "near_best_ok": row["final_loss"] <= NEAR_BEST * summary["grid_best_loss"]}


def _fmt_ttt(row: dict[str, Any]) -> str:
    return "never" if row["time_to_target"] is None else f"{row['time_to_target']:.2f} ({row['steps_to_target']})"


def _n_params(w: Workload) -> int:
    return sum(p.numel() for p in w.model_fn().parameters())


def report(workloads: list[Workload], summaries: dict[str, dict[str, Any]], advice: dict[str, str],
           trials: dict[str, dict[str, Any]], quick: bool, command: str, seconds: float) -> list[str]:
    lines = ["# The training recipe on three model families", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"Python {platform.python_version()}; {seconds:.0f} s.", f"Command: `{command}`", ""]
    if quick:
        lines += ["**Quick mode: a tenth of the steps and one seed; these numbers are a smoke test.**", ""]
    lines += ["Validation cross-entropy at the end of the budget (mean over seeds), the steps to reach the naive "
              f"recipe's final value as a fraction of the budget (target <= {TIME_TO_TARGET}), and the final value "
              f"against the small grid's best (target: within {NEAR_BEST - 1:.0%}).", "",
              "| workload | recipe | final val loss | val error | time to naive's final | vs grid best |",
              "|---|---|---|---|---|---|"]
    for w in workloads:
        s = summaries[w.name]
        for label in ("naive", "advised", "trial", s["grid_best"]):
            if label not in s["rows"]:
                continue
            row = s["rows"][label]
            err = f"{row['final_error']:.4f}" if w.report_error else "-"
            name = "grid best: " + label if label == s["grid_best"] else label
            lines.append(f"| {w.name} | {name} | {row['final_loss']:.4f} | {err} | {_fmt_ttt(row)} | "
                         f"{row['final_loss'] / s['grid_best_loss']:.3f}x |")
    lines += ["", "Targets:"]
    for w in workloads:
        for label in ("advised", "trial"):
            if label in summaries[w.name]["rows"]:
                v = verdicts(summaries[w.name], label)
                lines.append(f"- {w.name}, {label}: time to target <= {TIME_TO_TARGET}: "
                             f"{'met' if v['time_to_target_ok'] else 'MISSED'}; within {NEAR_BEST - 1:.0%} of the grid's "
                             f"best: {'met' if v['near_best_ok'] else 'MISSED'}")
    lines += ["", "## The recipes", "", "| workload | advised (rules only) | trial's |", "|---|---|---|"]
    for w in workloads:
        t = trials.get(w.name)
        lines.append(f"| {w.name} | {advice[w.name]} | {t['advice'] if t else '(not run)'} |")
    if trials:
        grid_steps = {w.name: len(GRID_LRS) * len(GRID_SCHEDULES) * w.steps * len(w.seeds) for w in workloads}
        lines += ["", "The trial's cost (its search on its own cut of the training data, seeds "
                  f"{list(TRIAL_SEEDS)}), against the grid's (10 recipes on the benchmark's seeds): " + "; ".join(
                      f"{n}: {t['steps']:,} steps, {t['seconds']:.0f} s ({t['steps'] / grid_steps[n]:.2f}x the grid's "
                      f"{grid_steps[n]:,} steps)" for n, t in trials.items()) + "."]
        lines += [f"- {n}: {t['verdict']}" for n, t in trials.items()]
    lines += ["", "## Every recipe", "", "| workload | recipe | final val loss | val error | time to naive's final "
              "| s per run |", "|---|---|---|---|---|---|"]
    for w in workloads:
        for label, row in summaries[w.name]["rows"].items():
            err = f"{row['final_error']:.4f}" if w.report_error else "-"
            lines.append(f"| {w.name} | {label} | {row['final_loss']:.4f} | {err} | {_fmt_ttt(row)} | "
                         f"{row['seconds']:.1f} |")
    lines += ["", "Workloads: " + "; ".join(f"{w.name}: {w.description} ({_n_params(w):,} parameters), {w.steps} steps "
                                            f"of batch {w.batch}, seeds {list(w.seeds)}" for w in workloads) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m benchmarks families", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps, one seed (a smoke test)")
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None,
                    help="default: the half --half names")
    ap.add_argument("--half", choices=("fit", "report", "both"), default="report",
                    help="fit: cnn, charlm, finetune (rule changes were decided on these); report (default): their "
                         "held-out twins cnn1d, charlm-b, finetune-b; both")
    ap.add_argument("--no-trial", action="store_true", help="leave out the trial's recipe (the longest part)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="benchmarks/latest")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names = args.workloads or list({"fit": FIT, "report": REPORT, "both": WORKLOADS}[args.half])
    workloads = [make_workload(n, args.quick) for n in names]
    plan = recipes(args.quick)
    advice = {w.name: describe(advised_recommendation(w), w.steps) for w in workloads}
    results: dict[str, dict[str, list]] = {w.name: {label: [None] * len(w.seeds) for label in plan} for w in workloads}
    trials: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the trials first: each is one long job (its search, then its recipe on every benchmark seed)
        jobs = [] if args.no_trial else [(w.name, args.quick, "trial", {}, None, tmp) for w in workloads]
        jobs += [(w.name, args.quick, label, recipe, seed, tmp) for w in workloads for label, recipe in plan.items()
                 for seed in w.seeds]

        def take(name: str, label: str, seed: Any, res: Any) -> None:
            w = make_workload(name, args.quick)
            if seed is None or isinstance(seed, dict):
                trials[name] = seed
                results[name]["trial"] = res
                print(f"  {name} trial: {res[0]['curve'][-1][1]:.4f} ({seed['seconds']:.0f} s)", file=sys.stderr,
                      flush=True)
                return
            results[name][label][w.seeds.index(seed)] = res
            print(f"  {name} {label} seed {seed}: {res['curve'][-1][1]:.4f} ({res['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)

        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers) as pool:
                for out in pool.imap_unordered(_job, jobs):
                    take(*out)
        else:
            for job in jobs:
                take(*_job(job))
    summaries = {w.name: summarize(w, results[w.name]) for w in workloads}
    command = "python -m benchmarks families" + (" " + " ".join(argv if argv is not None else sys.argv[2:])).rstrip()
    lines = report(workloads, summaries, advice, trials, args.quick, command, time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "families" + ("" if args.workloads else f"-{args.half}"))
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as fh:
        json.dump({"summaries": summaries, "advice": advice, "trials": trials, "quick": args.quick}, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

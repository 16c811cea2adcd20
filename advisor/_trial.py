"""``trial``: try the top optimizer/loss candidates of a recommendation on a validation set.

Each candidate gets its learning rate from a range test, then trains for ``budget_steps`` steps per seed;
all candidates are judged on the validation data with the *same yardstick*:

- ``metric="val_loss"``: the recommended loss (``rec.loss``) on the validation data, whatever loss the
  candidate trained with (a Huber-trained model is judged by the same function as an MSE-trained one);
- ``metric="val_error"`` (classification): the misclassification rate; ``"val_mae"`` (regression): the mean
  absolute error.

Every (candidate, seed) run is an Optuna trial in a study: an SQLite file by default, so an interrupted
trial resumes without redoing finished runs, or any Optuna storage URL (PostgreSQL, MySQL) so that several
machines can run workers on one study (each skips runs that are finished or running elsewhere; runs whose
worker died are failed by Optuna's heartbeat and redone). Deterministic given the seeds.
Needs the ``trial`` extra: ``pip install 'optadvisor[trial]'`` (optuna, tqdm).
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ._engine import Choice, Reason, Recommendation, build_loss, build_optimizer
from ._lr import _cycle, lr_range_test, pyplot, save_figure

METRICS = ("val_loss", "val_error", "val_mae")


class CandidateResult(BaseModel):
    """One optimizer/loss pair: its learning rate (and how it was found) and its validation results."""

    optimizer: Choice
    loss: Choice
    lr: float
    lr_reasoning: str
    values: list[float]
    mean: float
    spread: float
    curves: list[list[tuple[int, float]]]


class TrialResult(BaseModel):
    """The ranked table, the winner, and the recommendation updated with the measured evidence."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    metric: str
    ranked: list[CandidateResult]
    winner: CandidateResult
    recommendation: Recommendation
    study_name: str
    storage: str
    steps_run: int
    skipped: list[str]

    def table(self) -> str:
        lines = [f"| rank | optimizer | loss | lr | {self.metric} (mean ± spread over seeds) |",
                 "|---|---|---|---|---|"]
        for i, c in enumerate(self.ranked, 1):
            lines.append(f"| {i} | {c.optimizer.name} | {c.loss.name} | {c.lr:.3g} | {c.mean:.4g} ± {c.spread:.2g} |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Validation curves of every candidate and seed (PNG/SVG; needs matplotlib)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for c in self.ranked:
            for j, curve in enumerate(c.curves):
                xs, ys = zip(*curve) if curve else ((), ())
                ax.plot(xs, ys, alpha=0.8, label=f"{c.optimizer.name} + {c.loss.name}" if j == 0 else None)
        return save_figure(plt, fig, ax, path, "step", self.metric)


def _pairs(rec: Recommendation, top_k: int) -> list[tuple[Choice, Choice]]:
    opts = [c for c in rec.candidates.values() if c.name in ("Adam", "AdamW", "SGD", "RMSprop")]
    losses = [c for c in rec.candidates.values() if c.name not in ("Adam", "AdamW", "SGD", "RMSprop")]
    chosen = (rec.optimizer.name, rec.loss.name)
    pairs = [(o, lo) for o in opts for lo in losses]
    pairs.sort(key=lambda p: ((p[0].name, p[1].name) != chosen, -(p[0].score + p[1].score), p[0].name, p[1].name))
    return pairs[:top_k]


def _evaluate(model: torch.nn.Module, val_data: Any, yardstick: Callable, metric: str) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        batches = [val_data] if isinstance(val_data, (tuple, list)) and len(val_data) == 2 and \
            isinstance(val_data[0], torch.Tensor) else val_data
        for x, y in batches:
            out = model(x)
            if metric == "val_loss":
                value = float(yardstick(out, y)) * len(y)
            elif metric == "val_error":
                value = float((out.argmax(-1) != y).sum())
            else:
                value = float((out.reshape(y.shape) - y).abs().sum())
            total += value
            count += len(y)
    model.train()
    if count == 0:
        raise ValueError("trial: the validation data is empty")
    return total / count


_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _dead_local_run(study: Any, t: Any, optuna: Any) -> bool:
    """A RUNNING trial started on this host by a process that no longer exists (killed): mark it failed so
    that it is redone now. Runs of other hosts are left to Optuna's heartbeat (failed after its grace period)."""
    if t.state != optuna.trial.TrialState.RUNNING:
        return False
    host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:  # alive, another user's
        return False
    try:
        study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
    except Exception:  # noqa: BLE001 - storage internals differ across optuna versions; redo it anyway
        pass
    return True


def _open_study(storage: str | None, study_name: str):
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("advisor.trial needs optuna: pip install 'optadvisor[trial]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or "optadvisor-trials.db"
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    try:
        rdb = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        study = optuna.create_study(study_name=study_name, storage=rdb, load_if_exists=True,
                                    direction="minimize")
        optuna.storages.fail_stale_trials(study)
    except Exception as exc:  # sqlalchemy/optuna raise many types for a bad or unreachable URL
        raise ValueError(f"trial: cannot open the Optuna storage {url!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return optuna, study, url


def trial(model_fn: Callable[[], torch.nn.Module], train_data: Any, val_data: Any, rec: Recommendation,
          top_k: int = 3, budget_steps: int = 300, metric: str = "val_loss", **options: Any) -> TrialResult:
    """Train the top-k candidates of ``rec`` briefly, judge them on ``val_data``, return the ranking.

    ``model_fn()`` builds a fresh model (seeded by us before each call); ``train_data``/``val_data``: an
    (X, y) pair of tensors or an iterable of (x, y) batches. ``storage``: an SQLite file path (default
    ``optadvisor-trials.db``) or an Optuna storage URL. ``study_name`` defaults to a name derived from the
    candidates, budget and seeds, so the same call resumes the same study.

    Example::

        >>> result = trial(lambda: MyNet(), (X_train, y_train), (X_val, y_val), advise(profile))
        >>> print(result.table()); result.recommendation.optimizer
    """
    args, kwargs = (model_fn, train_data, val_data, rec, top_k, budget_steps, metric), options
    with warnings.catch_warnings():
        # optuna warns that heartbeats are meant for Study.optimize; we use them to fail dead workers' runs
        warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        return _trial(*args, **kwargs)


def _trial(model_fn: Callable[[], torch.nn.Module], train_data: Any, val_data: Any, rec: Recommendation,
          top_k: int = 3, budget_steps: int = 300, metric: str = "val_loss", *, seeds: Sequence[int] = (0, 1, 2),
          batch_size: int = 64, lr_steps: int = 60, eval_every: int | None = None, storage: str | None = None,
          study_name: str | None = None, progress: bool = True) -> TrialResult:
    """See :func:`trial`."""
    if metric not in METRICS:
        raise ValueError(f"trial: metric must be one of {METRICS} (got {metric!r})")
    if metric == "val_error" and rec.facts.task != "classification":
        raise ValueError("trial: metric='val_error' needs a classification task")
    if metric == "val_mae" and rec.facts.task != "regression":
        raise ValueError("trial: metric='val_mae' needs a regression task")
    if top_k < 1 or budget_steps < 1 or not seeds:
        raise ValueError("trial: top_k, budget_steps and seeds must be positive / non-empty")
    pairs = _pairs(rec, top_k + 2)
    skipped = [f"{o.name}+{lo.name}: HingeLoss needs one score per example and +-1 targets; trial it by hand"
               for o, lo in pairs if lo.name == "HingeLoss"]
    pairs = [(o, lo) for o, lo in pairs if lo.name != "HingeLoss"][:top_k]
    yardstick = build_loss(rec.loss if rec.loss.name != "HingeLoss" else pairs[0][1])
    name = study_name or ("optadvisor-" + "-".join(f"{o.name}+{lo.name}" for o, lo in pairs) +
                          f"-{budget_steps}-{'.'.join(map(str, seeds))}-{metric}")
    optuna, study, url = _open_study(storage, name)
    every = eval_every or max(1, budget_steps // 10)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total_runs = len(pairs) * (len(seeds) + 1)
    bar = tqdm(total=total_runs, desc="advisor.trial", disable=not progress) if tqdm else None
    results, steps_run = [], 0

    def run(opt_choice: Choice, loss_fn: Any, loss_choice: Choice, seed: int, lr: float):
        out = run_or_reuse(opt_choice, loss_fn, loss_choice, seed, lr)
        if bar:
            bar.update(1)
        return out

    def run_or_reuse(opt_choice: Choice, loss_fn: Any, loss_choice: Choice, seed: int, lr: float):
        """One (candidate, seed, lr) run as an Optuna trial; finished runs in the study are reused."""
        nonlocal steps_run
        key = f"{opt_choice.name}|{loss_choice.name}|{seed}|{lr:.6g}"
        known = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("key") == key
                 and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
                 and not _dead_local_run(study, t, optuna)]
        done = [t for t in known if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            return done[0].value, [tuple(x) for x in done[0].user_attrs.get("curve", [])]
        if known:  # running on another worker: its value will be in the study when it finishes
            return None, []
        t = study.ask()
        for k, v in (("key", key), ("optimizer", opt_choice.name), ("loss", loss_choice.name), ("seed", seed),
                     ("lr", lr), ("worker", _WORKER)):
            t.set_user_attr(k, v)
        try:
            value, curve = _train_one(model_fn, seed, opt_choice, loss_fn, lr, train_data, val_data, budget_steps,
                                      batch_size, every, yardstick, metric)
        except BaseException:
            study.tell(t, state=optuna.trial.TrialState.FAIL)  # never a half-written result
            raise
        steps_run += budget_steps
        value = value if math.isfinite(value) else float("inf")
        t.set_user_attr("curve", curve)
        study.tell(t, value)
        return value, [tuple(x) for x in curve]

    for opt_choice, loss_choice in pairs:
        loss_fn = build_loss(loss_choice)
        # the learning rate: a range test on a fresh model (seeded), restored afterwards
        torch.manual_seed(seeds[0])
        probe = model_fn()
        lr_res = lr_range_test(probe, loss_fn, lambda p, lr: build_optimizer(opt_choice, p, lr=lr), train_data,
                               start=1e-6, end=10.0, steps=lr_steps, batch_size=batch_size)
        steps_run += len(lr_res.lrs)
        lr = lr_res.recommended or float(opt_choice.params.get("lr", 1e-3))
        lr_reason = lr_res.reasoning if lr_res.recommended else f"range test gave no suggestion ({lr_res.reasoning}); " \
                                                                 f"the rule's lr {lr:.3g} was used"
        # the range test finds the edge of stability; a constant rate over a short budget does best somewhat
        # below it, so half and a fifth of its suggestion are tried on the first seed and the better one is
        # kept for the other seeds
        first = {}
        for cand_lr in (lr / 2, lr / 5):
            first[cand_lr] = run(opt_choice, loss_fn, loss_choice, seeds[0], cand_lr)
        first = {k: v for k, v in first.items() if v[0] is not None}
        if not first:
            continue  # both runs are in progress on other workers
        lr = min(first, key=lambda k: (first[k][0], -k))
        lr_reason += f"; on seed {seeds[0]} lr {lr:.3g} beat " + ", ".join(
            f"{k:.3g} ({first[k][0]:.4g})" for k in first if k != lr)
        runs = [first[lr]] + [run(opt_choice, loss_fn, loss_choice, seed, lr) for seed in seeds[1:]]
        runs = [r for r in runs if r is not None and r[0] is not None]
        values = [v for v, _ in runs]
        curves = [c for _, c in runs]
        if not values:
            continue
        finite = [v for v in values if math.isfinite(v)]
        mean = statistics.fmean(finite) if len(finite) == len(values) else float("inf")
        spread = statistics.pstdev(finite) if len(finite) > 1 else 0.0
        results.append(CandidateResult(optimizer=opt_choice.model_copy(update={"params": {**opt_choice.params, "lr": lr}}),
                                       loss=loss_choice, lr=lr, lr_reasoning=lr_reason, values=values, mean=mean,
                                       spread=spread, curves=curves))
    if bar:
        bar.close()
    if not results:
        raise RuntimeError("trial: every run is still running on other workers; call again later")
    ranked = sorted(results, key=lambda c: (c.mean, c.optimizer.name, c.loss.name))
    winner = ranked[0]
    evidence = Reason(
        rule_id="trial", priority=100,
        concluded=[f"{winner.optimizer.name} + {winner.loss.name} (lr {winner.lr:.3g}) won"],
        matched={f"{c.optimizer.name}+{c.loss.name}": round(c.mean, 6) for c in ranked},
        because=(f"measured on the validation data ({metric}, mean over seeds {list(seeds)}, {budget_steps} steps "
                 f"each, learning rates from range tests, refined on the first seed): " +
                 "; ".join(f"{c.optimizer.name}+{c.loss.name} {c.mean:.4g} ± {c.spread:.2g}" for c in ranked)),
        source=f"Optuna study {name!r} in {url}")
    updated = rec.model_copy(update={"optimizer": winner.optimizer, "loss": winner.loss,
                                     "reasons": [evidence, *rec.reasons]}, deep=True)
    return TrialResult(metric=metric, ranked=ranked, winner=winner, recommendation=updated, study_name=name,
                       storage=url, steps_run=steps_run, skipped=skipped)


def _train_one(model_fn, seed, opt_choice, loss_fn, lr, train_data, val_data, budget_steps, batch_size, every,
               yardstick, metric) -> tuple[float, list[tuple[int, float]]]:
    """Train a fresh model (seeded) for budget_steps; the validation value at the end, and the curve."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = build_optimizer(opt_choice, model.parameters(), lr=lr)
    batches = iter(_cycle(train_data, batch_size))
    curve = []
    for step in range(1, budget_steps + 1):
        x, y = next(batches)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return float("inf"), curve
        loss.backward()
        opt.step()
        if step % every == 0 or step == budget_steps:
            curve.append((step, _evaluate(model, val_data, yardstick, metric)))
    return curve[-1][1], curve

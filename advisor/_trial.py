"""``trial``: search optimizer, loss, learning rate and weight decay on a validation set, seeded by the rules.

How it searches (the defaults; every number is an argument):

1. **Range tests centre the learning rates.** For each candidate optimizer, a learning-rate range test
   (``lr_range_test``, robust to outliers) on a fresh model with the recommended loss gives a centre; the
   search covers ``centre x 10^-2.5 .. centre x 10^0.5`` on a log scale — the validation optimum of a short
   run on small data is often one or two decades below where the training loss falls fastest.
2. **A plan of configurations fixed up front** (``n_trials``, on the first seed): the rules-only advice
   itself first, the naive default (Adam 1e-3 with MSE or cross-entropy) second (both never pruned), then
   the three best-ranked optimizer/loss pairs of the rules at half a decade
   and a decade and a half below their centre (the best one also two and a half decades below), then a scrambled Sobol sequence over (optimizer, loss, log
   learning rate, log weight decay for AdamW).
3. **Successive halving** (Optuna's ``SuccessiveHalvingPruner``, reduction factor 3) on the best validation
   value so far, evaluated every ``budget_steps // 10`` steps: about a third of the configurations survive
   each rung (at 1/10, 3/10 and 9/10 of the budget), so many configurations cost little more than a few.
4. **Finalists on fresh seeds**: the rules-only advice (the *incumbent*), the naive default and the ``top_k``
   best configurations that ran the whole budget are trained on the other seeds (``seeds[1:]``, three by
   default), which did not select them. Each one's stopping step is the latest step within one standard
   error of its best mean on those seeds (**early stopping**: ``recommendation.train_steps``); a challenger
   replaces the incumbent only when its fresh mean is better by more than the noise (a one-sided
   many-to-one test at alpha 0.10, each pair with its own variance, see ``_select.py``). The winner's
   reported value is its fresh seeds' mean: an unbiased estimate, not the search's luckiest point.

Every run is an Optuna trial in one study (an SQLite file by default, any Optuna storage URL for several
machines). The study is named after a fingerprint of everything that determines its results (the data, the
model's architecture and initial weights, the candidates' hyperparameters, the budget, seeds and metric),
so a changed call starts fresh while an interrupted identical call resumes, redoing nothing that finished.
Workers on one study share the plan (stored in the study), claim each run exactly once (an atomic
insert of a claim record), prune in plan order (a run's pruning decision waits for the runs before it to
reach the same rung, so it is the decision one worker alone would take), wait for runs in flight, take over
the runs of a worker whose heartbeat stopped (after ``grace_period`` seconds; at once for a dead process on
the same host), and all end with the same answer. A run whose loss or validation metric stops being finite
is recorded as failed with its reason, and the search goes on.
Needs the ``trial`` extra: ``pip install 'optadvisor[trial]'`` (optuna, tqdm).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from optadvisor.kernels import catalog
from pydantic import BaseModel, ConfigDict

from ._engine import Choice, Note, Reason, Recommendation, build_loss, build_optimizer
from ._lr import lr_range_test, pyplot, save_figure
from ._select import choose, robust_step
from ._train import (
    CLASSIFICATION_METRICS,
    METRICS,
    REGRESSION_METRICS,
    RunResult,
    default_metric,
    fused_for,
    is_pair,
    train_run,
)

PLAN_VERSION = "3"
LOG_SCALE_METRICS = ("val_mse", "val_mae", "val_loss")  # compared as ratios (see _select.py)
NAIVE_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
NAIVE_LOSS = {"regression": "MSELoss", "classification": "CrossEntropyLoss"}
LR_DECADES = (-2.5, 0.5)       # the learning-rate range around the range test's centre, in decades
WD_DECADES = (-4.0, -1.0)      # AdamW's decoupled weight decay
SEEDED_OFFSETS = (-0.5, -1.5)  # the rules' best pairs start here (decades below the centre)
REDUCTION = 3
MIN_RUNG = 10                  # the first pruning decision comes after at least this many steps


class CandidateResult(BaseModel):
    """One finalist: its configuration, how its learning rate was found, and its validation results."""

    optimizer: Choice
    loss: Choice
    lr: float
    weight_decay: float | None
    origin: str
    lr_reasoning: str
    best_step: int
    values: list[float]
    mean: float
    spread: float
    curves: list[list[tuple[int, float]]]
    seeds: list[int] = []
    search_value: float | None = None


class TrialResult(BaseModel):
    """The finalists ranked, the winner, the updated advice, and what the search cost."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    metric: str
    ranked: list[CandidateResult]
    winner: CandidateResult
    verdict: str = ""
    recommendation: Recommendation
    study_name: str
    storage: str
    configs_tried: int
    pruned: int
    failed: list[str]
    skipped: list[str]
    steps_run: int
    steps_total: int
    train_seconds: float
    wall_seconds: float

    def table(self) -> str:
        lines = [f"| rank | optimizer | loss | lr | weight decay | best step | {self.metric} (mean ± spread) | from |",
                 "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(self.ranked, 1):
            wd = f"{c.weight_decay:.2g}" if c.weight_decay else "-"
            lines.append(f"| {i} | {c.optimizer.name} | {c.loss.name} | {c.lr:.3g} | {wd} | {c.best_step} | "
                         f"{c.mean:.4g} ± {c.spread:.2g} | {c.origin} |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Validation curves of every finalist and seed (PNG/SVG; needs matplotlib)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, c in enumerate(self.ranked):
            for j, curve in enumerate(c.curves):  # one colour per finalist, its seeds' lines alike: one entry
                xs, ys = zip(*curve) if curve else ((), ())
                ax.plot(xs, ys, alpha=0.8, color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                        label=f"{c.optimizer.name} {c.lr:.2g} + {c.loss.name}" if j == 0 else None)
        return save_figure(plt, fig, ax, path, "step", self.metric)


def trial(model_fn: Callable[[], torch.nn.Module], train_data: Any, val_data: Any, rec: Recommendation,
          top_k: int = 4, budget_steps: int = 300, metric: str | None = None, **options: Any) -> TrialResult:
    """Search the configurations around ``rec`` on ``val_data``; return the ranking and the updated advice.

    ``model_fn()`` builds a fresh model (seeded by us before each call); ``train_data``/``val_data``: an
    (X, y) pair of tensors or an iterable of (x, y) batches. ``metric``: ``None`` picks the default — the
    error rate for classification (``val_balanced_error`` when the largest class is over 3x the smallest),
    the MSE for regression — or one of ``val_loss`` (the recommended loss), ``val_mse``, ``val_mae``,
    ``val_error``, ``val_balanced_error``. Keyword options: ``n_trials`` (50 configurations), ``seeds``
    ((0, 1, 2, 3): the search on the first, the finalists judged on the others; fewer than three leave the
    choice unverified, with a warning), ``batch_size`` (64), ``lr_steps`` (60, per range test), ``storage``
    (an SQLite path, default ``optadvisor-trials.db``, or an Optuna storage URL), ``study_name`` (default: from
    the fingerprint),
    ``progress`` (a tqdm bar), ``heartbeat_interval`` (10 s), ``grace_period`` (60 s) and ``cv_folds`` (None; k:
    the finalists are judged by k-fold cross-validation over the training and validation rows together, one
    fold per fresh seed, so ``seeds`` defaults to ``range(k + 1)``; (X, y) tensor pairs only).

    Example::

        >>> result = trial(lambda: MyNet(), (X_train, y_train), (X_val, y_val), advise(profile))
        >>> print(result.table()); result.recommendation.optimizer, result.recommendation.train_steps
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")
        return _Search(model_fn, train_data, val_data, rec, top_k, budget_steps, metric, **options).run()


# ----------------------------------------------------------------------------------------------------------
# checks and the fingerprint

def _check_data(data: Any, name: str, task: str, h: Any) -> int:
    """Hash the data into ``h``; refuse data that cannot rank models (one class, a constant target); the
    number of rows."""
    import numpy as np

    distinct: set[float] = set()
    rows = 0
    for x, y in ([data] if is_pair(data) else data):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        for t in (x, y):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
        rows += len(y)
        if len(distinct) < 3:
            distinct.update(torch.unique(y.detach().reshape(-1)[:100_000]).double().tolist()[:3])
    if rows == 0:
        raise ValueError(f"trial: {name} is empty")
    if len(distinct) < 2:
        what = "one class" if task == "classification" else "a constant target"
        raise ValueError(f"trial: {name} has {what} ({next(iter(distinct), None)!r}): it cannot tell one model "
                         "from another" + (" (every model has the same error)" if task == "classification" else
                                           " (nothing to learn)" if name == "train_data" else ""))
    return rows


def _fingerprint(model_fn, train_data, val_data, rec: Recommendation, settings: dict[str, Any]) -> tuple[str, int]:
    """A digest of everything that determines the study's results, and the number of validation rows."""
    h = hashlib.sha256(f"optadvisor trial plan v{PLAN_VERSION}".encode())
    task = rec.facts.task or "regression"
    _check_data(train_data, "train_data", task, h)
    n_val = _check_data(val_data, "val_data", task, h)
    torch.manual_seed(settings["seeds"][0])
    model = model_fn()
    h.update(repr(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(json.dumps({"optimizer": rec.optimizer.model_dump(), "loss": rec.loss.model_dump(),
                         "candidates": {k: c.model_dump() for k, c in rec.candidates.items()},
                         **settings}, sort_keys=True, default=str).encode())
    return h.hexdigest(), n_val


# ----------------------------------------------------------------------------------------------------------
# the study: opening, claims, heartbeats

_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _open_storage(storage: str | None, heartbeat_interval: int, grace_period: int):
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("advisor.trial needs optuna: pip install 'optadvisor[trial]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or "optadvisor-trials.db"
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        _sqlite_wal(url[len("sqlite:///"):])
    for attempt in range(6):
        try:
            rdb = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                             grace_period=grace_period)
            return optuna, rdb, url
        except Exception as exc:  # sqlalchemy/optuna raise many types for a bad or unreachable URL
            text = str(exc)
            # workers started together on a new database race to create its tables: the loser retries
            if attempt < 5 and any(k in text for k in _SCHEMA_RACE):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise ValueError(f"trial: cannot open the Optuna storage {url!r}: {type(exc).__name__}: "
                             f"{text.splitlines()[0] if text else ''}") from None
    raise AssertionError("unreachable")


def _sqlite_wal(path: str) -> None:
    """Write-ahead logging for an SQLite study file (a setting stored in the file): readers no longer block
    the writer, which is what several workers on one machine need, and each commit costs less."""
    import sqlite3

    # Changing the journal mode needs the file to itself, and SQLite answers "database is locked" at once
    # (without its busy timeout) while another worker starting beside this one holds it: retry for ~30 s.
    for attempt in range(60):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(path, timeout=60)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) and attempt < 59:
                time.sleep(min(0.05 * (attempt + 1), 1.0))
                continue
            raise ValueError(f"trial: cannot open the SQLite study file {path!r}: {exc}") from None
        except sqlite3.Error as exc:
            raise ValueError(f"trial: cannot open the SQLite study file {path!r}: {exc}") from None


_SCHEMA_RACE = ("already exists", "duplicate key", "UniqueViolation", "UNIQUE constraint", "database is locked")


class _Heartbeat:
    """Record a run's heartbeat every ``interval`` seconds while it trains (Optuna fails stale runs)."""

    def __init__(self, rdb: Any, trial_id: int, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(rdb, trial_id, interval), daemon=True)
        rdb.record_heartbeat(trial_id)
        self._thread.start()

    def _beat(self, rdb, trial_id, interval):
        while not self._stop.wait(interval):
            try:
                rdb.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only risks a takeover; the run goes on
                pass

    def stop(self):
        self._stop.set()
        self._thread.join()


def _pid_dead(worker: str) -> bool:
    """A worker id of this host whose process no longer exists (killed: its runs can be taken over now)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _PlanOrderView:
    """What Optuna's pruner sees when deciding on the run in plan slot ``slot``: the runs of earlier slots only
    (each slot's latest attempt), exactly what it would see if one worker ran the plan in order."""

    def __init__(self, storage: Any, trials: list[Any], direction: Any):
        self._storage = storage  # the pruner records the rung it reached through the storage
        self._trials = trials
        self.direction = direction

    def get_trials(self, deepcopy: bool = False, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]


class _RunRecord:
    """This worker's own copy of a running trial (what the pruner reads), kept in step with what is written
    to the storage, so that a rung costs two writes and no read."""

    def __init__(self, optuna: Any, storage: Any, tid: int, template: Any):
        self.optuna, self.storage, self.tid = optuna, storage, tid
        self.system_attrs: dict[str, Any] = {}
        self.intermediate: dict[int, float] = {}
        self.template = template

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:  # the pruner's one write
        self.storage.set_trial_system_attr(trial_id, key, value)
        if trial_id == self.tid:
            self.system_attrs[key] = value

    def report(self, step: int, value: float) -> None:
        self.storage.set_trial_intermediate_value(self.tid, step, value)
        self.intermediate[step] = value

    def frozen(self, state: Any = None, value: float | None = None, user_attrs: dict | None = None) -> Any:
        t = self.template
        return self.optuna.trial.FrozenTrial(
            number=-1, state=state or t.state, value=value, datetime_start=t.datetime_start,
            datetime_complete=None, params={}, distributions={}, user_attrs={**t.user_attrs, **(user_attrs or {})},
            system_attrs=dict(self.system_attrs), intermediate_values=dict(self.intermediate), trial_id=self.tid)


# ----------------------------------------------------------------------------------------------------------
# the search

class _Search:
    def __init__(self, model_fn, train_data, val_data, rec: Recommendation, top_k: int, budget_steps: int,
                 metric: str | None, *, n_trials: int = 50, seeds: Sequence[int] | None = None,
                 batch_size: int = 64, lr_steps: int = 60, storage: str | None = None, study_name: str | None = None,
                 progress: bool = True, heartbeat_interval: int = 10, grace_period: int = 60,
                 poll_seconds: float = 0.2, cv_folds: int | None = None):
        task = rec.facts.task
        metric = metric or default_metric(task, rec.facts.class_imbalance)
        if metric not in METRICS:
            raise ValueError(f"trial: metric must be one of {METRICS} (got {metric!r})")
        if metric in CLASSIFICATION_METRICS and task != "classification":
            raise ValueError(f"trial: metric={metric!r} needs a classification task (the advice is for {task})")
        if metric in REGRESSION_METRICS and task != "regression":
            raise ValueError(f"trial: metric={metric!r} needs a regression task (the advice is for {task})")
        for name, value, low in (("top_k", top_k, 1), ("budget_steps", budget_steps, 1), ("n_trials", n_trials, 1),
                                 ("batch_size", batch_size, 1), ("lr_steps", lr_steps, 10)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"trial: {name} must be an integer >= {low} (got {value!r})")
        if cv_folds is not None:
            if not isinstance(cv_folds, int) or isinstance(cv_folds, bool) or cv_folds < 2:
                raise ValueError(f"trial: cv_folds must be an integer >= 2 or None (got {cv_folds!r})")
            if not (is_pair(train_data) and is_pair(val_data)):
                raise ValueError("trial: cv_folds needs train_data and val_data as (X, y) pairs of tensors (the folds "
                                 "are drawn from their rows together)")
            if seeds is None:
                seeds = tuple(range(cv_folds + 1))
            elif len(tuple(seeds)) != cv_folds + 1:
                raise ValueError(f"trial: cv_folds={cv_folds} needs {cv_folds + 1} seeds, the search's and one per "
                                 f"fold (got {len(tuple(seeds))}); leave seeds unset to get range({cv_folds + 1})")
        seeds = tuple((0, 1, 2, 3) if seeds is None else seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"trial: seeds must be distinct integers, at least one (got {seeds!r})")
        if grace_period <= heartbeat_interval:
            raise ValueError("trial: grace_period must be longer than heartbeat_interval")
        self.model_fn, self.train_data, self.val_data, self.rec = model_fn, train_data, val_data, rec
        self.top_k, self.budget, self.metric, self.seeds = top_k, budget_steps, metric, seeds
        self.batch_size, self.lr_steps, self.poll = batch_size, lr_steps, poll_seconds
        self.eval_every = max(1, budget_steps // 10)
        self.rung0 = self.eval_every * max(1, round(budget_steps / (3 * REDUCTION * self.eval_every)))
        if self.rung0 < MIN_RUNG:  # a validation score after a handful of steps says little
            self.rung0 = self.eval_every * math.ceil(MIN_RUNG / self.eval_every)
        self.skipped: list[str] = []
        self.can_prune = self.rung0 * REDUCTION <= budget_steps
        if not self.can_prune:
            fits = max(top_k + 1, n_trials // 3)
            warnings.warn(f"trial: budget_steps={budget_steps} is too small to prune (the first rung is at step "
                          f"{self.rung0}, the next at {self.rung0 * REDUCTION}): every configuration trains the "
                          f"whole budget, so only the first {min(fits, n_trials)} of {n_trials} run",
                          UserWarning, stacklevel=3)
            self.skipped.append(f"{max(0, n_trials - fits)} configurations: budget too small to prune")
            n_trials = min(n_trials, fits)
        self.n_trials = n_trials
        if len(seeds) < 3:
            warnings.warn(f"trial: {len(seeds)} seed(s): the finalists are judged on {len(seeds) - 1} fresh seed(s), "
                          "too few to tell a better configuration from a luckier one; the choice is unverified. "
                          "Pass seeds with 3 or more entries (default (0, 1, 2, 3))", UserWarning, stacklevel=3)
        # the search, then the finalists' fresh seeds: the rules' advice, the naive default, the top_k
        self.total_slots = n_trials + (top_k + 2) * (len(seeds) - 1)
        # the candidate pairs, from kernels' catalog: every optimizer the catalog searches by default plus any
        # other a rule scored (Adagrad when features are sparse), and every loss for the task that can be
        # trialled automatically
        missing = [e.name for e in catalog.optimizers() if e.default_candidate and e.name not in rec.optimizers]
        if missing or rec.optimizer.name not in rec.optimizers or rec.loss.name not in rec.losses:
            raise ValueError(f"trial: the recommendation lacks candidates ({', '.join(missing) or 'its own choice'}); "
                             "pass what advise() returned, or re-run advise() for it")
        self.optimizers = [e.name for e in catalog.optimizers() if e.name in rec.optimizers and (
            e.default_candidate or rec.optimizers[e.name].score > 0 or e.name == rec.optimizer.name)]
        task_losses = catalog.losses(rec.facts.task or "regression")
        self.losses = [e.name for e in task_losses if e.trial_note is None]
        self.skipped += [e.trial_note for e in task_losses if e.trial_note is not None]
        if not self.losses:
            raise ValueError("trial: no loss candidate can be trialled ("
                             + "; ".join(e.trial_note for e in task_losses if e.trial_note) + ")")
        self.yardstick_choice = rec.loss if rec.loss.name in self.losses else rec.losses[self.losses[0]]
        self.yardstick = build_loss(self.yardstick_choice) if metric == "val_loss" else None
        self.tiebreak = None
        settings = {"budget_steps": budget_steps, "seeds": list(seeds), "batch_size": batch_size, "metric": metric,
                    "n_trials": n_trials, "top_k": top_k, "lr_steps": lr_steps}
        if cv_folds is not None:  # (absent otherwise: the fingerprints of earlier studies stay valid)
            settings["cv_folds"] = cv_folds
        self.folds = _folds(train_data, val_data, cv_folds, seeds[0]) if cv_folds else None
        self.fingerprint, n_val = _fingerprint(model_fn, train_data, val_data, rec, settings)
        if metric in CLASSIFICATION_METRICS and "CrossEntropyLoss" in rec.losses:
            # error rates tie often on small validation sets: the validation cross-entropy breaks the ties,
            # weighted so that it never reorders two different error rates (they differ by >= 1/(C n_val))
            classes = rec.facts.n_classes or len(rec.facts.class_counts or ()) or 2
            self.tiebreak = (build_loss(rec.losses["CrossEntropyLoss"].model_copy(update={"params": {}})),
                             0.01 / (classes * n_val))
        self.name = study_name or f"optadvisor-{self.fingerprint[:24]}"
        self.heartbeat_interval, self.grace = heartbeat_interval, grace_period
        self.optuna, self.rdb, self.url = _open_storage(storage, heartbeat_interval, grace_period)
        self.progress = progress
        self.steps_run = 0
        self.train_seconds = 0.0
        self._final: dict[int, Any] = {}  # slot -> its ended run (final: never changes again)
        self._finalists: list[int] | None = None

    # ---- study and plan ------------------------------------------------------------------------------
    def _open_study(self):
        optuna = self.optuna
        try:
            self.study = optuna.create_study(study_name=self.name, storage=self.rdb, direction="minimize")
            creator = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.name, storage=self.rdb)
            creator = False
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"trial: cannot open the Optuna storage {self.url!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        # Optuna's caching wrapper of the RDB storage (finished runs are read once): every run is written and
        # read through it, with the storage API (one insert to start a run, two writes to end it)
        self.storage = self.study._storage
        attrs = self.study.user_attrs
        if creator:
            self.study.set_user_attr("fingerprint", self.fingerprint)
            self.study.set_user_attr("creator", _WORKER)
        elif attrs.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"trial: the study {self.name!r} in {self.url} was run with other data, another model "
                             "or other settings (its fingerprint differs); its results do not apply here. Use "
                             "another study_name, or leave it unset to get one derived from the fingerprint")
        self.plan = self._wait_for_plan(creator)

    def _wait_for_plan(self, creator: bool) -> list[dict[str, Any]]:
        start = time.monotonic()
        while not creator:
            attrs = self.study.user_attrs
            if "plan" in attrs:
                self.centres = attrs["centres"]
                return attrs["plan"]
            if time.monotonic() - start > self.grace or _pid_dead(str(attrs.get("creator", ""))):
                break  # the worker that created the study died before writing its plan: write it ourselves
            time.sleep(self.poll)
        plan = self._make_plan()
        self.study.set_user_attr("centres", self.centres)
        self.study.set_user_attr("plan", plan)
        return plan

    def _make_plan(self) -> list[dict[str, Any]]:
        rec = self.rec
        self.centres = {}
        for name in self.optimizers:
            choice = rec.optimizers[name]
            torch.manual_seed(self.seeds[0])
            probe = self.model_fn()
            res = lr_range_test(probe, build_loss(self.yardstick_choice),
                                lambda p, lr, c=choice, f=fused_for(probe): build_optimizer(c, p, lr=lr, fused=f),
                                self.train_data, start=1e-6, end=10.0, steps=self.lr_steps,
                                batch_size=self.batch_size)
            self.steps_run += len(res.lrs)
            rule_lr = float(choice.params.get("lr", 1e-3))
            if res.recommended:
                self.centres[name] = {"lr": res.recommended, "why": f"range test: {res.reasoning}",
                                      "steps": len(res.lrs)}
            else:
                self.centres[name] = {"lr": rule_lr, "why": f"range test gave no suggestion ({res.reasoning}); "
                                      f"centred on the rules' lr {rule_lr:.3g}", "steps": len(res.lrs)}
        plan = [self._config(rec.optimizer.name, self.yardstick_choice.name, float(rec.optimizer.params.get("lr", 1e-3)),
                             None, "rules", exempt=True)]
        plan[0]["lr_why"] = "the rules' learning rate"
        naive = self._naive()
        if naive is not None and len(plan) < self.n_trials:
            plan.append(naive)
        opts = self.optimizers
        pairs = sorted(((o, lo) for o in opts for lo in self.losses),
                       key=lambda p: (-(rec.optimizers[p[0]].score + rec.losses[p[1]].score),
                                      opts.index(p[0]), self.losses.index(p[1])))
        for i, (o, lo) in enumerate(pairs[:3]):
            for off in SEEDED_OFFSETS + ((LR_DECADES[0],) if i == 0 else ()):
                if len(plan) < self.n_trials:
                    plan.append(self._config(o, lo, self.centres[o]["lr"] * 10 ** off, None, "rules-ranked", off))
        sobol = torch.quasirandom.SobolEngine(4, scramble=True, seed=self.seeds[0])
        while len(plan) < self.n_trials:
            u = sobol.draw(1)[0].tolist()
            o = opts[min(int(u[0] * len(opts)), len(opts) - 1)]
            lo = self.losses[min(int(u[1] * len(self.losses)), len(self.losses) - 1)]
            off = LR_DECADES[0] + u[2] * (LR_DECADES[1] - LR_DECADES[0])
            wd = 10 ** (WD_DECADES[0] + u[3] * (WD_DECADES[1] - WD_DECADES[0])) if o == "AdamW" else None
            plan.append(self._config(o, lo, self.centres[o]["lr"] * 10 ** off, wd, "search", off))
        return plan

    def _data_for(self, slot: int) -> tuple[Any, Any]:
        """(train, val) of a run: the caller's split, except for a finalist's fresh run under ``cv_folds``,
        which holds out its fold of the pooled rows."""
        if self.folds is None or slot < self.n_trials:
            return self.train_data, self.val_data
        return self.folds[(slot - self.n_trials) % (len(self.seeds) - 1)]

    def _naive(self) -> dict[str, Any] | None:
        """The naive default (Adam at torch's defaults, lr 1e-3, with MSE or plain cross-entropy), a finalist
        always: None when it is the rules' advice itself or is not a candidate here."""
        loss = NAIVE_LOSS.get(self.rec.facts.task or "regression")
        if "Adam" not in self.optimizers or loss not in self.losses:
            return None
        rules = self.rec.optimizer
        same_opt = rules.name == "Adam" and _normal({**NAIVE_ADAM, "lr": 1e-3}) == _normal({**NAIVE_ADAM, **rules.params})
        if same_opt and self.yardstick_choice.name == loss and not self.yardstick_choice.params:
            return None
        cfg = self._config("Adam", loss, 1e-3, None, "naive", exempt=True)
        cfg.update(plain=True, lr_why="the naive default: what a user picks without advice")
        return cfg

    def _choices(self, cfg: dict[str, Any]) -> tuple[Choice, Choice]:
        """The optimizer and loss choices a configuration trains with (the naive default's: bare)."""
        if cfg.get("plain"):
            return Choice(name=cfg["optimizer"], params={}, score=0), Choice(name=cfg["loss"], params={}, score=0)
        return self.rec.optimizers[cfg["optimizer"]], self.rec.losses[cfg["loss"]]

    def _config(self, opt: str, loss: str, lr: float, wd: float | None, origin: str, offset: float | None = None,
                exempt: bool = False) -> dict[str, Any]:
        cfg = {"optimizer": opt, "loss": loss, "lr": lr, "weight_decay": wd, "origin": origin, "exempt": exempt}
        if offset is not None:
            cfg["lr_why"] = f"range-test centre {self.centres[opt]['lr']:.3g} x 10^{offset:+.2f}"
        return cfg

    # ---- slots -----------------------------------------------------------------------------------------
    def _trials_by_slot(self) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for t in self.study.get_trials(deepcopy=False):
            if "run" in t.user_attrs:
                out.setdefault(int(t.user_attrs["run"]["slot"]), []).append(t)
        for slot, ts in out.items():
            ts.sort(key=lambda t: t.user_attrs["run"]["attempt"])
            if slot not in self._final and self._status(ts) == "done":
                self._final[slot] = ts[-1]
        return out

    def _status(self, attempts: list[Any]) -> str:
        """'free' (never run, or its last attempt was abandoned), 'running' or 'done'."""
        TS = self.optuna.trial.TrialState
        if not attempts:
            return "free"
        t = attempts[-1]
        if t.state in (TS.COMPLETE, TS.PRUNED) or (t.state == TS.FAIL and "diverged" in _outcome(t)):
            return "done"
        if t.state == TS.RUNNING:
            if _pid_dead(str(t.user_attrs["run"]["worker"])):
                try:
                    self.storage.set_trial_state_values(t._trial_id, state=TS.FAIL)
                except self.optuna.exceptions.UpdateFinishedTrialError:
                    pass
                return "free"
            return "running"
        return "free"  # FAIL (abandoned: its worker died) or WAITING

    def _claim(self, slot: int, attempt: int) -> bool:
        """Atomically claim (slot, attempt): the storage refuses a second study of the same name."""
        try:
            self.rdb.create_new_study([self.optuna.study.StudyDirection.MINIMIZE],
                                      f"{self.name}/claim/{slot}/{attempt}")
            return True
        except self.optuna.exceptions.DuplicatedStudyError:
            return False

    def _take(self, slot: int, by_slot: dict[int, list[Any]] | None = None) -> None:
        """Run ``slot`` here if nobody has it (or its worker is gone)."""
        by_slot = self._trials_by_slot() if by_slot is None else by_slot
        attempts = by_slot.get(slot, [])
        if self._status(attempts) != "free":
            return
        attempt = (attempts[-1].user_attrs["run"]["attempt"] + 1) if attempts else 0
        if slot >= self.n_trials:
            cfg, seed = self._finalist_config(slot)
            if cfg is None:
                return
        else:
            cfg, seed = self.plan[slot], self.seeds[0]
        if self._claim(slot, attempt):
            self._run(slot, attempt, cfg, seed)

    def _seed_slot(self, j: int, k: int) -> int:
        """The slot of finalist ``j`` on seed ``seeds[k + 1]`` (its first seed's run is its search slot)."""
        return self.n_trials + j * (len(self.seeds) - 1) + k

    def _finalist_config(self, slot: int) -> tuple[dict[str, Any] | None, int]:
        j, k = divmod(slot - self.n_trials, len(self.seeds) - 1)
        finalists = self._finalist_slots()
        if j >= len(finalists):
            return None, 0
        return {**self.plan[finalists[j]], "exempt": True, "of": finalists[j]}, self.seeds[k + 1]

    def _finalist_slots(self) -> list[int]:
        """The rules' configuration, the naive default and the top_k best complete search runs (waits for the
        search to end; then final, so kept). Fewer complete runs than top_k leave the last finalist slots
        void."""
        if self._finalists is None:
            by_slot = self._wait(range(self.n_trials))
            TS = self.optuna.trial.TrialState
            exempt = [s for s in range(self.n_trials) if self.plan[s]["exempt"]]
            complete = [(by_slot[s][-1].value, s) for s in range(self.n_trials)
                        if s not in exempt and by_slot[s][-1].state == TS.COMPLETE]
            self._finalists = exempt + [s for _, s in sorted(complete)[:self.top_k]]
        return self._finalists

    def _live_slots(self) -> list[int]:
        """Every slot that has a run to do: the search, and the finalists' other seeds that are not void."""
        return list(range(self._seed_slot(len(self._finalist_slots()), 0)))

    def _wait(self, slots: Sequence[int], ready: Callable[[Any], bool] | None = None) -> dict[int, list[Any]]:
        """Wait until every slot is done (or ``ready(latest attempt)``), taking over abandoned ones."""
        last_stale_check = 0.0
        while True:
            by_slot = self._trials_by_slot()
            pending = []
            for s in slots:
                attempts = by_slot.get(s, [])
                status = self._status(attempts)
                if status == "done" or (status == "running" and ready is not None and ready(attempts[-1])):
                    continue
                pending.append((s, status))
            if not pending:
                return by_slot
            for s, status in pending:
                if status == "free":
                    self._take(s)
            if time.monotonic() - last_stale_check > self.heartbeat_interval:
                self.optuna.storages.fail_stale_trials(self.study)
                last_stale_check = time.monotonic()
            self._tick(by_slot)
            time.sleep(self.poll)

    def _tick(self, by_slot: dict[int, list[Any]] | None = None) -> None:
        """Progress: runs done by any worker (counted when waiting) or by this one."""
        if self.bar is None or self.bar.disable:
            return
        if by_slot is None:
            self.bar.update(1)
        else:
            self.bar.n = sum(1 for ts in by_slot.values() if self._status(ts) == "done")
            self.bar.refresh()

    # ---- one run -----------------------------------------------------------------------------------------
    def _run(self, slot: int, attempt: int, cfg: dict[str, Any], seed: int) -> None:
        """One run as an Optuna trial, written through the storage API: created RUNNING with its
        configuration in one insert, its rungs reported for the pruner, its outcome and state at the end."""
        optuna, st = self.optuna, self.storage
        TS = optuna.trial.TrialState
        template = optuna.trial.FrozenTrial(
            number=-1, state=TS.RUNNING, value=None, datetime_start=datetime.datetime.now(), datetime_complete=None,
            params={}, distributions={}, system_attrs={}, intermediate_values={}, trial_id=-1,
            user_attrs={"run": {"slot": slot, "attempt": attempt, "worker": _WORKER, "seed": seed, **cfg}})
        tid = st.create_new_trial(self.study._study_id, template_trial=template)
        record = _RunRecord(optuna, st, tid, template)
        heartbeat = _Heartbeat(self.rdb, tid, self.heartbeat_interval)
        prune = self.can_prune and slot < self.n_trials and not cfg["exempt"]
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=self.rung0, reduction_factor=REDUCTION)
        best = [math.inf]
        next_rung = [self.rung0]

        def on_eval(step: int, value: float) -> bool:
            best[0] = min(best[0], value)
            if not prune or step < next_rung[0]:
                return False  # only the rungs are reported: the pruner reads nothing else, the curve is kept
            while next_rung[0] <= step:
                next_rung[0] *= REDUCTION
            record.report(step, best[0])
            if pruner.prune(self._view_for(slot, step, record), record.frozen()):
                return True
            st.set_trial_user_attr(tid, "rung_passed", step)  # what later slots wait for (see _view_for)
            return False

        try:
            res: RunResult = train_run(self.model_fn, seed, *self._choices(cfg), cfg["lr"], *self._data_for(slot),
                                       self.budget, batch_size=self.batch_size, eval_every=self.eval_every,
                                       metric=self.metric, yardstick=self.yardstick, on_eval=on_eval,
                                       weight_decay=cfg["weight_decay"], tiebreak=self.tiebreak)
        except BaseException:
            heartbeat.stop()
            st.set_trial_state_values(tid, state=TS.FAIL)  # abandoned: another attempt redoes it
            raise
        heartbeat.stop()
        self.steps_run += res.steps
        self.train_seconds += res.train_seconds
        outcome = {"steps": res.steps, "curve": res.curve, "keys": res.keys, "best_step": res.best[0]}
        if res.diverged:
            outcome["diverged"] = res.diverged
        st.set_trial_user_attr(tid, "outcome", outcome)
        if res.diverged:
            st.set_trial_state_values(tid, state=TS.FAIL)
        elif res.stopped:
            st.set_trial_state_values(tid, state=TS.PRUNED)
        else:
            st.set_trial_state_values(tid, state=TS.COMPLETE, values=[min(res.keys)])
        state = TS.FAIL if res.diverged else TS.PRUNED if res.stopped else TS.COMPLETE
        self._final[slot] = record.frozen(state, None if state != TS.COMPLETE else min(res.keys),
                                          {"outcome": outcome})
        self._tick()

    def _view_for(self, slot: int, step: int, record: _RunRecord) -> _PlanOrderView:
        """Wait until every earlier prunable slot has passed ``step`` or ended, then show only those."""
        earlier = [s for s in range(slot) if not self.plan[s]["exempt"]]
        if all(s in self._final for s in earlier):  # ended runs never change: no need to read them again
            trials = [self._final[s] for s in earlier]
        else:
            by_slot = self._wait(earlier, ready=lambda t: t.user_attrs.get("rung_passed", -1) >= step)
            trials = [by_slot[s][-1] for s in earlier]
        return _PlanOrderView(record, trials, self.optuna.study.StudyDirection.MINIMIZE)

    # ---- the whole search ------------------------------------------------------------------------------
    def run(self) -> TrialResult:
        t0 = time.perf_counter()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        self.bar = tqdm(total=self.total_slots, desc="advisor.trial", disable=not self.progress) if tqdm else None
        try:
            self._open_study()
            self.optuna.storages.fail_stale_trials(self.study)
            snapshot, taken_at = self._trials_by_slot(), time.monotonic()
            for slot in range(self.total_slots):
                if time.monotonic() - taken_at > 1.0:  # claims are atomic: a stale view only costs a failed claim
                    snapshot, taken_at = self._trials_by_slot(), time.monotonic()
                self._take(slot, snapshot)
            by_slot = self._wait(self._live_slots())
        finally:
            if self.bar is not None:
                self.bar.close()
        return self._result(by_slot, time.perf_counter() - t0)

    def _result(self, by_slot: dict[int, list[Any]], wall: float) -> TrialResult:
        TS = self.optuna.trial.TrialState
        finalists = self._finalist_slots()
        latest = {s: ts[-1] for s, ts in by_slot.items()}
        fresh = len(self.seeds) > 1
        rows: list[CandidateResult] = []
        for j, s in enumerate(finalists):
            runs = [latest[self._seed_slot(j, k)] for k in range(len(self.seeds) - 1)] if fresh else [latest[s]]
            cfg = self.plan[s]
            if any(r.state != TS.COMPLETE for r in runs) or latest[s].state != TS.COMPLETE:
                continue  # diverged on some seed: not a candidate
            curves = [[tuple(p) for p in _outcome(r)["curve"]] for r in runs]
            best_step, values = robust_step(curves)
            opt, loss = self._choices(cfg)
            params = {**opt.params, "lr": cfg["lr"]}
            if cfg["weight_decay"] is not None:
                params["weight_decay"] = cfg["weight_decay"]
            rows.append(CandidateResult(
                optimizer=opt.model_copy(update={"params": params}), loss=loss, lr=cfg["lr"],
                weight_decay=cfg["weight_decay"], origin=cfg["origin"], lr_reasoning=cfg.get("lr_why", ""),
                best_step=best_step, values=values, mean=statistics.fmean(values),
                spread=statistics.pstdev(values) if len(values) > 1 else 0.0, curves=curves,
                seeds=[int(r.user_attrs["run"]["seed"]) for r in runs],
                search_value=min(_outcome(latest[s])["keys"])))
        if not rows:
            raise RuntimeError("trial: every finalist diverged on some seed; see the failed runs in the study "
                               f"{self.name!r} ({self.url})")
        # the incumbent: the rules' advice (or, when it diverged, the naive default; else the search's best)
        order = sorted(range(len(rows)), key=lambda i: ({"rules": 0, "naive": 1}.get(rows[i].origin, 2),
                                                        rows[i].search_value))
        names = [f"{rows[i].optimizer.name} {rows[i].lr:.3g} + {rows[i].loss.name} ({rows[i].origin})" for i in order]
        decision = choose([rows[i].values for i in order], log=self.metric in LOG_SCALE_METRICS)
        winner = rows[order[decision.winner]]
        verdict = decision.text(names)
        ranked = [winner] + sorted((r for r in rows if r is not winner),
                                   key=lambda r: (r.mean, r.origin != "rules", r.optimizer.name, r.loss.name, r.lr))
        trials = [t for t in self.study.get_trials(deepcopy=False) if "run" in t.user_attrs]
        searched = [latest[s] for s in range(self.n_trials)]
        failed = []
        for s in sorted(latest):
            if "diverged" in _outcome(latest[s]):
                run = latest[s].user_attrs["run"]
                failed.append(f"run {s} ({run['optimizer']} lr {run['lr']:.3g} + {run['loss']}, seed {run['seed']}): "
                              f"{_outcome(latest[s])['diverged']}")
        range_steps = sum(c.get("steps", 0) for c in self.centres.values())
        steps_total = range_steps + sum(int(_outcome(t).get("steps", 0)) for t in trials)
        rules_row = next((c for c in ranked if c.origin == "rules"), None)
        wd = f", weight decay {winner.weight_decay:.2g}" if winner.weight_decay else ""
        judged = list(self.seeds[1:]) if fresh else [self.seeds[0]]
        how = (f"seeds {judged}, one fold each of {len(judged)}-fold cross-validation over the training and "
               "validation rows together" if self.folds else f"seeds {judged}")
        se = winner.spread * math.sqrt(len(winner.values) / max(len(winner.values) - 1, 1)) / math.sqrt(len(winner.values))
        evidence = Reason(
            rule_id="trial", priority=100,
            concluded=[f"{winner.optimizer.name} (lr {winner.lr:.3g}{wd}) + {winner.loss.name} won; "
                       f"train {winner.best_step} steps; {self.metric} {winner.mean:.4g} ± {se:.2g} (standard error "
                       f"over {how})", verdict],
            matched={f"{c.optimizer.name} {c.lr:.3g} + {c.loss.name}": round(c.mean, 6) for c in ranked},
            because=(f"measured on the validation data ({self.metric}): {len(searched)} configurations searched on seed "
                     f"{self.seeds[0]} with successive halving ({sum(1 for t in searched if t.state == TS.PRUNED)} "
                     f"pruned); the finalists judged on {how}, which did not select them, each at the latest "
                     "step within one standard error of its best mean: " + "; ".join(
                         f"{c.optimizer.name} {c.lr:.3g} + {c.loss.name} {c.mean:.4g} ± {c.spread:.2g} "
                         f"(step {c.best_step}, {c.origin})" for c in ranked) + f". {verdict}." +
                     (f" The rules' own advice scored {rules_row.mean:.4g}." if rules_row else "")),
            source=f"Optuna study {self.name!r} in {self.url}")
        note = Note(rule_id="trial", text=f"Train for about {winner.best_step} steps of batch {self.batch_size} "
                    f"(the validation {self.metric} was within the noise of its best there on fresh seeds; later "
                    "it got worse or stopped improving): stop early on a validation set.")
        updated = self.rec.model_copy(update={"optimizer": winner.optimizer, "loss": winner.loss,
                                              "reasons": [evidence, *self.rec.reasons],
                                              "notes": [note, *self.rec.notes], "train_steps": winner.best_step},
                                      deep=True)
        return TrialResult(metric=self.metric, ranked=ranked, winner=winner, verdict=verdict, recommendation=updated,
                           study_name=self.name, storage=self.url, configs_tried=len(searched),
                           pruned=sum(1 for t in searched if t.state == TS.PRUNED), failed=failed,
                           skipped=self.skipped, steps_run=self.steps_run, steps_total=steps_total,
                           train_seconds=self.train_seconds, wall_seconds=wall)


def _folds(train_data: tuple, val_data: tuple, k: int, seed: int) -> list[tuple[tuple, tuple]]:
    """k (train, val) pairs over the pooled rows: a seeded permutation cut into k near-equal folds."""
    X = torch.cat([train_data[0], val_data[0]])
    y = torch.cat([train_data[1], val_data[1]])
    if len(y) < 2 * k:
        raise ValueError(f"trial: cv_folds={k} needs at least {2 * k} rows (got {len(y)})")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out = []
    for part in torch.tensor_split(perm, k):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[part] = False
        rest = perm[keep[perm]]  # the other rows, in the permutation's order (batches come in order)
        out.append(((X[rest], y[rest]), (X[part], y[part])))
    return out


def _normal(params: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def _outcome(t: Any) -> dict[str, Any]:
    return t.user_attrs.get("outcome", {})

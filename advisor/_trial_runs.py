"""The trial's runs: one training run per claimed slot, its rung reports and the pruner's decision in plan
order, and the search loop that ties plan, study and result together."""

from __future__ import annotations

import datetime
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from optadvisor.kernels import catalog

from ._engine import Recommendation, build_loss
from ._recipe import RecipeSpec
from ._train import (
    CLASSIFICATION_METRICS,
    METRICS,
    REGRESSION_METRICS,
    RunResult,
    batches,
    default_metric,
    is_pair,
    train_run,
)
from ._trial_plan import MIN_RUNG, REDUCTION, _fingerprint, _folds, _Plan
from ._trial_result import TrialResult, _Results
from ._trial_study import _WORKER, _Heartbeat, _open_storage, _Study


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


class _Search(_Plan, _Study, _Results):
    """One ``trial`` call: plan (``_trial_plan``), study (``_trial_study``), runs (here), result
    (``_trial_result``)."""

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
        self.losses = self._losses_the_model_takes(model_fn, train_data, batch_size, seeds[0])
        if not self.losses:
            raise ValueError("trial: no loss candidate can be trialled ("
                             + "; ".join(e.trial_note for e in task_losses if e.trial_note) + "; "
                             + "; ".join(self.skipped) + ")")
        self.yardstick_choice = rec.loss if rec.loss.name in self.losses else rec.losses[self.losses[0]]
        self.yardstick = build_loss(self.yardstick_choice) if metric == "val_loss" else None
        self.tiebreak = None
        settings = {"budget_steps": budget_steps, "seeds": list(seeds), "batch_size": batch_size, "metric": metric,
                    "n_trials": n_trials, "top_k": top_k, "lr_steps": lr_steps}
        # the recipe is searched where the rules advise one (a schedule, warmup, clipping, groups): every run but
        # the naive default's trains with it; the default recipe leaves the runs (and earlier studies) as they were
        self.recipe_search = rec.recipe != RecipeSpec()
        if self.recipe_search:
            settings["recipe"] = rec.recipe.model_dump()
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

    def _losses_the_model_takes(self, model_fn, train_data, batch_size: int, seed: int) -> list[str]:
        """The candidate losses that take the model's output with the data's targets (one forward pass on the
        first batch): a per-example loss such as MultiMarginLoss cannot score a sequence model's (N, C, T)
        logits; those are left out, each with why, rather than failing the search at its first run."""
        torch.manual_seed(seed)
        x, y = next(iter(batches(train_data, batch_size)))
        with torch.no_grad():
            out = model_fn()(x)
        kept = []
        for name in self.losses:
            try:
                build_loss(self.rec.losses[name])(out, y)
            except (ValueError, RuntimeError, IndexError, TypeError) as exc:
                self.skipped.append(f"{name}: cannot take this model's output {tuple(out.shape)} with targets "
                                    f"{tuple(y.shape)} ({str(exc).splitlines()[0]})")
                continue
            kept.append(name)
        return kept

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
                                       weight_decay=cfg["weight_decay"], tiebreak=self.tiebreak,
                                       recipe=RecipeSpec(**cfg["recipe"]) if cfg.get("recipe") else None)
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

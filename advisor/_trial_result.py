"""The trial's result: each candidate's search and fresh-seed record, and the choice among them."""

from __future__ import annotations

import math
import statistics
from typing import Any

from pydantic import BaseModel, ConfigDict

from ._engine import Choice, Note, Reason, Recommendation
from ._recipe import RecipeSpec
from ._lr import pyplot, save_figure
from ._select import choose, robust_step


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
    recipe: RecipeSpec | None = None
    """The recipe it trained with (None: the naive default's — one group, a constant rate, no clipping)."""

    @property
    def scheduled(self) -> bool:
        return self.recipe is not None and self.recipe.scheduled


from ._trial_plan import LOG_SCALE_METRICS
from ._trial_study import _outcome


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
        if any(c.recipe is not None for c in self.ranked):  # the recipe searched too: one more column
            lines[0] += " recipe |"
            lines[1] += "---|"
            for i, c in enumerate(self.ranked, 2):
                lines[i] += f" {c.recipe.describe(c.best_step) if c.recipe else 'naive: constant, one group'} |"
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


class _Results:
    """How ``_Search`` ends: the finalists' fresh-seed means, the choice, the record."""

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
            recipe = RecipeSpec(**cfg["recipe"]) if cfg.get("recipe") else None
            if recipe is not None and recipe.scheduled:
                # a schedule is tuned to its budget: judged where it ends, not stopped early (that would be
                # another schedule, one no run measured)
                best_step, values = self.budget, [dict(c)[self.budget] for c in curves]
            else:
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
                search_value=min(_outcome(latest[s])["keys"]), recipe=recipe))
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
        if winner.scheduled:
            note = Note(rule_id="trial", text=f"Train the whole budget, {winner.best_step} steps of batch "
                        f"{self.batch_size}, with the recipe's schedule over it (rec.build(model, total_steps="
                        f"{winner.best_step})): the schedule was judged where it ends.")
        else:
            note = Note(rule_id="trial", text=f"Train for about {winner.best_step} steps of batch {self.batch_size} "
                        f"(the validation {self.metric} was within the noise of its best there on fresh seeds; later "
                        "it got worse or stopped improving): stop early on a validation set.")
        if self.recipe_search:
            recipe_line = (f"recipe: {winner.recipe.describe(winner.best_step)}" if winner.recipe is not None else
                           "recipe: the naive default's (one parameter group, a constant rate, no clipping)")
            evidence.concluded.append(recipe_line)
        updated = self.rec.model_copy(update={"optimizer": winner.optimizer, "loss": winner.loss,
                                              "recipe": winner.recipe or RecipeSpec(),
                                              "reasons": [evidence, *self.rec.reasons],
                                              "notes": [note, *self.rec.notes], "train_steps": winner.best_step},
                                      deep=True)
        return TrialResult(metric=self.metric, ranked=ranked, winner=winner, verdict=verdict, recommendation=updated,
                           study_name=self.name, storage=self.url, configs_tried=len(searched),
                           pruned=sum(1 for t in searched if t.state == TS.PRUNED), failed=failed,
                           skipped=self.skipped, steps_run=self.steps_run, steps_total=steps_total,
                           train_seconds=self.train_seconds, wall_seconds=wall)



"""The trial's plan: its defaults, the configurations fixed up front (the rules-only advice, the naive
default, the rules' best pairs, a Sobol sequence) and the finalists' folds (``_trial.py`` says how it searches)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ._engine import Choice, Recommendation, build_loss, build_optimizer
from ._lr import lr_range_test
from ._recipe import RecipeSpec
from ._train import fused_for, is_pair

PLAN_VERSION = "3"
LOG_SCALE_METRICS = ("val_mse", "val_mae", "val_loss")  # compared as ratios (see _select.py)
NAIVE_ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
NAIVE_LOSS = {"regression": "MSELoss", "classification": "CrossEntropyLoss"}
LR_DECADES = (-2.5, 0.5)       # the learning-rate range around the range test's centre, in decades
WD_DECADES = (-4.0, -1.0)      # AdamW's decoupled weight decay
SEEDED_OFFSETS = (-0.5, -1.5)  # the rules' best pairs start here (decades below the centre)
REDUCTION = 3
MIN_RUNG = 10                  # the first pruning decision comes after at least this many steps
WARMUP_MAX = 0.1               # the recipe search's warmup fractions: 0 .. max(this, twice the rules')


class _Plan:
    """What ``_Search`` plans: the configurations and the data of each slot."""

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
        # where the rules advise a recipe, two more dimensions: its schedule or a constant rate, and the warmup
        sobol = torch.quasirandom.SobolEngine(6 if self.recipe_search else 4, scramble=True, seed=self.seeds[0])
        while len(plan) < self.n_trials:
            u = sobol.draw(1)[0].tolist()
            o = opts[min(int(u[0] * len(opts)), len(opts) - 1)]
            lo = self.losses[min(int(u[1] * len(self.losses)), len(self.losses) - 1)]
            off = LR_DECADES[0] + u[2] * (LR_DECADES[1] - LR_DECADES[0])
            decays = o == "AdamW" or (self.recipe_search and "weight_decay" in rec.optimizers[o].params)
            wd = 10 ** (WD_DECADES[0] + u[3] * (WD_DECADES[1] - WD_DECADES[0])) if decays else None
            cfg = self._config(o, lo, self.centres[o]["lr"] * 10 ** off, wd, "search", off)
            if self.recipe_search:
                cfg["recipe"] = self._recipe_for(o, RecipeSpec(**self._searched_recipe(u[4], u[5])))
            plan.append(cfg)
        return plan

    @staticmethod
    def _recipe_for(opt: str, recipe: RecipeSpec) -> dict[str, Any]:
        """The recipe a configuration of ``opt`` trains with: schedule-free AdamW's averaging is its schedule, so
        it keeps the recipe's groups and clipping at a constant rate without warmup (see check_schedule)."""
        if opt.lower().startswith("schedulefree"):
            recipe = recipe.model_copy(update={"schedule": "constant", "warmup_fraction": 0.0})
        return recipe.model_dump()

    def _searched_recipe(self, u_schedule: float, u_warmup: float) -> dict[str, Any]:
        """The rules' recipe with its schedule kept or made constant (even odds) and its warmup drawn from
        0 .. max(WARMUP_MAX, twice the rules' warmup)."""
        rules = self.rec.recipe
        top = max(WARMUP_MAX, 2 * rules.warmup_fraction)
        return rules.model_copy(update={"schedule": rules.schedule if u_schedule >= 0.5 else "constant",
                                        "warmup_fraction": round(u_warmup * top, 4)}).model_dump()

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
        if same_opt and self.yardstick_choice.name == loss and not self.yardstick_choice.params and not self.recipe_search:
            return None
        cfg = self._config("Adam", loss, 1e-3, None, "naive", exempt=True)
        cfg.pop("recipe", None)
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
        if self.recipe_search:  # (absent otherwise: a tabular study's plan is what it was)
            cfg["recipe"] = self._recipe_for(opt, self.rec.recipe)
        if offset is not None:
            cfg["lr_why"] = f"range-test centre {self.centres[opt]['lr']:.3g} x 10^{offset:+.2f}"
        return cfg

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

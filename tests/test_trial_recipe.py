"""The trial searches the recipe where the rules advise one: every run but the naive default's trains with the
recipe's groups, schedule and clipping (as ``rec.build`` would), the search draws the schedule and the warmup,
a scheduled winner is judged where its schedule ends, and the updated advice carries the winner's recipe."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("optuna")

from optadvisor.advisor import advise, trial  # noqa: E402
from optadvisor.advisor._recipe import RecipeSpec  # noqa: E402
from optadvisor.advisor._train import batches, train_run  # noqa: E402
from optadvisor.advisor._trial_plan import WARMUP_MAX  # noqa: E402


def _data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 6, 6, generator=g)
    y = (X[:, 0, :3].mean((1, 2)) > X[:, 0, 3:].mean((1, 2))).long()
    return (X[:180], y[:180]), (X[180:], y[180:])


def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 2))


def _cnn_rec(steps=60):
    return advise(task="classification", model_kind="cnn", n_classes=2, batch_size=32, budget_steps=steps)


def test_a_run_with_a_recipe_is_the_loop_rec_build_gives():
    """train_run(recipe=...) trains exactly as a plain loop over rec.build's objects: groups, schedule, clip."""
    rec = advise(task="classification", model_kind="transformer", n_classes=2, batch_size=32, budget_steps=40)
    assert rec.recipe.max_grad_norm == 1.0 and rec.recipe.schedule == "cosine"
    (X, y), val = _data()
    res = train_run(_cnn, 3, rec.optimizer, rec.loss, 0.05, (X, y), val, 40, batch_size=32, eval_every=40,
                    metric="val_loss", yardstick=torch.nn.CrossEntropyLoss(), recipe=rec.recipe, fused=False)
    torch.manual_seed(3)
    model = _cnn()
    built = rec.build(model, total_steps=40, lr=0.05, fused=False)
    assert sorted(g["weight_decay"] for g in built.optimizer.param_groups) == [0.0, 0.1]  # none on biases, norms
    source = batches((X, y), 32)
    for _ in range(40):
        xb, yb = next(source)
        built.optimizer.zero_grad()
        built.loss(model(xb), yb).backward()
        built.clip()
        built.optimizer.step()
        built.scheduler.step()
    model.eval()
    with torch.no_grad():
        expected = float(torch.nn.CrossEntropyLoss()(model(val[0]), val[1]))
    assert res.curve == [(40, pytest.approx(expected, rel=1e-6, abs=1e-7))]
    # without the recipe: one group, a constant rate, no clipping — another run
    plain = train_run(_cnn, 3, rec.optimizer, rec.loss, 0.05, (X, y), val, 40, batch_size=32, eval_every=40,
                      metric="val_loss", yardstick=torch.nn.CrossEntropyLoss(), fused=False)
    assert plain.curve[0][1] != res.curve[0][1]


def test_the_trial_searches_the_rules_recipe_and_the_winner_carries_its_own(tmp_path):
    import optuna

    rec = _cnn_rec()
    assert rec.recipe.scheduled and rec.recipe.schedule == "cosine"
    train, val = _data()
    res = trial(_cnn, train, val, rec, budget_steps=60, n_trials=14, top_k=2, seeds=(0, 1, 2), batch_size=32,
                lr_steps=20, storage=str(tmp_path / "r.db"), progress=False)
    plan = optuna.load_study(study_name=res.study_name, storage=res.storage).user_attrs["plan"]
    naive = [c for c in plan if c["origin"] == "naive"]
    assert len(naive) == 1 and "recipe" not in naive[0]  # the naive default: one group, constant, no clipping
    rules_recipe = rec.recipe.model_dump()
    for cfg in plan:
        if cfg["origin"] in ("rules", "rules-ranked"):
            assert cfg["recipe"] == rules_recipe
        elif cfg["origin"] == "search":
            drawn = RecipeSpec(**cfg["recipe"])
            assert drawn.schedule in ("cosine", "constant")
            assert 0.0 <= drawn.warmup_fraction <= max(WARMUP_MAX, 2 * rec.recipe.warmup_fraction)
            assert drawn.model_copy(update={"schedule": "cosine", "warmup_fraction": 0.02}) == rec.recipe
    searched = [RecipeSpec(**c["recipe"]) for c in plan if c["origin"] == "search"]
    assert {r.schedule for r in searched} == {"cosine", "constant"}  # both sides of the schedule drawn
    assert len({r.warmup_fraction for r in searched}) == len(searched)
    for c in res.ranked:
        if c.origin == "naive":
            assert c.recipe is None and not c.scheduled
        else:
            assert c.recipe is not None
        if c.scheduled:  # judged where the schedule ends, at the whole budget
            assert c.best_step == 60 and c.values == [dict(curve)[60] for curve in c.curves]
    w = res.winner
    assert res.recommendation.recipe == (w.recipe or RecipeSpec())
    assert res.recommendation.train_steps == w.best_step
    assert any(line.startswith("recipe: ") for line in res.recommendation.reasons[0].concluded)
    assert "| recipe |" in res.table().splitlines()[0]
    if w.scheduled:
        assert "Train the whole budget, 60 steps" in res.recommendation.notes[0].text
    built = res.recommendation.build(_cnn(), total_steps=60)
    assert built.spec == res.recommendation.recipe
    assert math.isfinite(w.mean)


def test_a_tabular_trial_plans_no_recipe(tmp_path):
    """Where the rules advise the default recipe, the plan is what it was: no recipe key, constant runs."""
    import optuna

    rec = advise(task="classification", model_kind="mlp", n_classes=2)
    assert rec.recipe == RecipeSpec()
    (X, y), (vX, vy) = _data()
    res = trial(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.ReLU(),
                                            torch.nn.Linear(8, 2)), (X, y), (vX, vy), rec, budget_steps=40,
                n_trials=4, top_k=1, seeds=(0, 1, 2), batch_size=32, lr_steps=20, storage=str(tmp_path / "t.db"),
                progress=False)
    plan = optuna.load_study(study_name=res.study_name, storage=res.storage).user_attrs["plan"]
    assert all("recipe" not in c for c in plan)
    assert all(c.recipe is None for c in res.ranked) and "recipe" not in res.table().splitlines()[0]
    assert res.recommendation.recipe == RecipeSpec()


class _SeqModel(torch.nn.Module):
    """A sequence model's output: logits (N, C, T) for targets (N, T), as cross-entropy takes them."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.embed(x)).transpose(1, 2)


def test_losses_that_cannot_take_the_models_output_are_left_out_with_why(tmp_path):
    """A per-example loss (MultiMarginLoss, (N, C) only) cannot score (N, C, T) logits: the trial leaves it out
    and says why, instead of failing at the first run that draws it (it did, on a language model)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 5, (160, 6), generator=g)
    y = (X + 1) % 5
    rec = advise(task="classification", model_kind="transformer", n_classes=5, batch_size=16, budget_steps=40)
    res = trial(_SeqModel, (X[:120], y[:120]), (X[120:], y[120:]), rec, budget_steps=40, n_trials=8, top_k=1,
                seeds=(0, 1, 2), batch_size=16, lr_steps=20, metric="val_loss", storage=str(tmp_path / "s.db"),
                progress=False)
    why = [s for s in res.skipped if s.startswith("MultiMarginLoss: cannot take this model's output (16, 5, 6) "
                                                  "with targets (16, 6) (multi_margin_loss: input must be")]
    assert len(why) == 1, res.skipped
    assert all(c.loss.name != "MultiMarginLoss" for c in res.ranked)
    assert res.winner.loss.name in ("CrossEntropyLoss", "FocalLoss")
    with pytest.raises(ValueError, match=r"^trial: no loss candidate can be trialled \(.*MultiMarginLoss: cannot"):
        trial(lambda: torch.nn.Sequential(_SeqModel(), torch.nn.Flatten()), (X[:120], y[:120]), (X[120:], y[120:]),
              rec, budget_steps=40, n_trials=4, seeds=(0, 1, 2), storage=str(tmp_path / "t.db"), progress=False)


def test_the_searched_recipe_at_the_edges_of_its_draws():
    """_searched_recipe(u_schedule, u_warmup): the schedule kept from 0.5 up, constant below; the warmup
    u x max(WARMUP_MAX, twice the rules'), rounded to 4 places; everything else the rules'."""
    from optadvisor.advisor._trial_plan import _Plan

    plan = _Plan()
    plan.rec = _cnn_rec()  # cosine, warmup 0.02: the top is WARMUP_MAX
    assert WARMUP_MAX == 0.1
    for u_s, u_w, schedule, warmup in ((0.0, 0.0, "constant", 0.0), (0.4999, 1.0, "constant", 0.1),
                                       (0.5, 0.5, "cosine", 0.05), (0.99, 0.123456, "cosine", 0.0123)):
        got = RecipeSpec(**plan._searched_recipe(u_s, u_w))
        assert (got.schedule, got.warmup_fraction) == (schedule, warmup)
        assert got.model_copy(update={"schedule": "cosine", "warmup_fraction": 0.02}) == plan.rec.recipe
    plan.rec = plan.rec.model_copy(update={"recipe": plan.rec.recipe.model_copy(update={"warmup_fraction": 0.08})})
    assert RecipeSpec(**plan._searched_recipe(0.7, 1.0)).warmup_fraction == 0.16  # twice the rules' 0.08


def test_schedule_free_configurations_train_at_a_constant_rate():
    """Schedule-free AdamW takes no schedule (build refuses one): its configurations keep the recipe's groups
    and clipping at a constant rate without warmup; the others keep the recipe as drawn."""
    from optadvisor.advisor._trial_plan import _Plan

    rules = advise(task="classification", model_kind="transformer", n_classes=2).recipe
    sf = RecipeSpec(**_Plan._recipe_for("ScheduleFreeAdamW", rules))
    assert (sf.schedule, sf.warmup_fraction, sf.max_grad_norm) == ("constant", 0.0, 1.0)
    assert sf.model_copy(update={"schedule": rules.schedule, "warmup_fraction": rules.warmup_fraction}) == rules
    assert RecipeSpec(**_Plan._recipe_for("AdamW", rules)) == rules

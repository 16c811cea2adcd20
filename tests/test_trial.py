"""advisor.trial end to end on scikit-learn's bundled data sets, resume after a kill, and bad input."""

import math
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits

from advisor import advise, profile_data, trial
from advisor._engine import build_loss
from advisor._trial import _train_one

BUDGET, SEEDS = 200, (0, 1)


def _data(name):
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        X, y, out = torch.tensor(X, dtype=torch.float32), torch.tensor(y), 10
    else:
        X, y = load_diabetes(return_X_y=True)
        X, y, out = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), 1
        y = (y - y.mean()) / y.std()
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n = int(0.75 * len(y))
    tr, va = perm[:n], perm[n:]

    def model_fn():
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, out))
        return net if out > 1 else torch.nn.Sequential(net, torch.nn.Flatten(0))
    return model_fn, (X[tr], y[tr]), (X[va], y[va])


@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_trial_winner_is_within_5_percent_of_the_full_grid_at_under_a_third_of_its_compute(name, tmp_path):
    model_fn, train, val = _data(name)
    rec = advise(profile_data(*train, model=model_fn()))
    res = trial(model_fn, train, val, rec, top_k=3, budget_steps=BUDGET, seeds=SEEDS,
                storage=str(tmp_path / "study.db"), progress=False)
    assert res.winner is res.ranked[0] and len(res.ranked) == 3
    assert res.recommendation.optimizer.name == res.winner.optimizer.name
    assert res.recommendation.optimizer.params["lr"] == res.winner.lr
    assert res.recommendation.reasons[0].rule_id == "trial" and "Optuna study" in res.recommendation.reasons[0].source
    # the full grid: every optimizer x every loss of the task x 5 learning rates, same seeds, same yardstick
    yardstick = build_loss(rec.loss)
    grid = {}
    for opt in ("Adam", "AdamW", "SGD", "RMSprop"):
        for loss in [c for c in rec.candidates if c not in ("Adam", "AdamW", "SGD", "RMSprop", "HingeLoss")]:
            for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
                vals = [_train_one(model_fn, s, rec.candidates[opt], build_loss(rec.candidates[loss]), lr, train, val,
                                   BUDGET, 64, BUDGET, yardstick, "val_loss")[0] for s in SEEDS]
                grid[(opt, loss, lr)] = sum(vals) / len(vals)
    best = min(v for v in grid.values() if math.isfinite(v))
    grid_steps = len(grid) * BUDGET * len(SEEDS)
    print(f"{name}: trial {res.winner.mean:.4f} ({res.winner.optimizer.name}+{res.winner.loss.name}, "
          f"lr {res.winner.lr:.3g}) vs grid best {best:.4f}; compute {res.steps_run} vs {grid_steps} steps")
    assert res.winner.mean <= 1.05 * best
    assert res.steps_run < grid_steps / 3


def test_resume_after_a_kill_does_not_redo_finished_runs(tmp_path):
    storage = tmp_path / "resume.db"
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_trial import _data
        from advisor import advise, profile_data, trial
        model_fn, train, val = _data("diabetes")
        calls = [0]
        def dying_model_fn():
            calls[0] += 1
            if calls[0] == 6:   # range test 1, two lr runs, seed 1, range test 2, then killed mid-run
                os._exit(9)
            return model_fn()
        rec = advise(profile_data(*train, model=model_fn()))
        trial(dying_model_fn, train, val, rec, top_k=2, budget_steps=50, seeds=(0, 1),
              storage={str(storage)!r}, study_name="resume", progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{storage}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3
    model_fn, train, val = _data("diabetes")
    rec = advise(profile_data(*train, model=model_fn()))
    res = trial(model_fn, train, val, rec, top_k=2, budget_steps=50, seeds=(0, 1), storage=str(storage),
                study_name="resume", progress=False)
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{storage}")
    keys = [t.user_attrs["key"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(keys) == len(set(keys)) == 6  # 2 candidates x (2 lr probes + 1 more seed), none redone
    again = trial(model_fn, train, val, rec, top_k=2, budget_steps=50, seeds=(0, 1), storage=str(storage),
                  study_name="resume", progress=False)
    range_test_steps = again.steps_run  # a third call trains nothing: only the range tests run again
    assert 0 < range_test_steps <= 2 * 60
    assert res.steps_run - range_test_steps == 3 * 50  # only the 3 unfinished runs trained
    assert again.winner.mean == res.winner.mean


def test_bad_input(tmp_path):
    model_fn, train, val = _data("diabetes")
    rec = advise(profile_data(*train))
    with pytest.raises(ValueError, match="cannot open the Optuna storage"):
        trial(model_fn, train, val, rec, storage="postgresql://nobody@127.0.0.1:1/none", progress=False)
    with pytest.raises(ValueError, match="metric"):
        trial(model_fn, train, val, rec, metric="accuracy", storage=str(tmp_path / "a.db"), progress=False)
    with pytest.raises(ValueError, match="val_error"):
        trial(model_fn, train, val, rec, metric="val_error", storage=str(tmp_path / "a.db"), progress=False)
    with pytest.raises(ValueError, match="need equal, > 0"):
        trial(model_fn, (train[0][:0], train[1][:0]), val, rec, storage=str(tmp_path / "b.db"), progress=False)


def test_plots(tmp_path):
    model_fn, train, val = _data("diabetes")
    rec = advise(profile_data(*train))
    res = trial(model_fn, train, val, rec, top_k=1, budget_steps=20, seeds=(0,), storage=str(tmp_path / "p.db"),
                progress=False)
    assert os.path.getsize(res.plot(str(tmp_path / "curves.png"))) > 1000
    assert "| 1 |" in res.table()

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

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ._engine import Recommendation
from ._trial_result import CandidateResult, TrialResult  # noqa: F401 - re-exported (advisor/__init__.py)
from ._trial_runs import _Search


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

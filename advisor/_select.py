"""How the trial chooses, from the finalists' runs on seeds that did not select them: where each should stop,
and whether a challenger beats the incumbent (the rules' advice) by more than the noise.

Why not the lowest mean: the search ranks 60 configurations by the best point of noisy curves, so its top few
are the luckiest as much as the best (the winner's curse). Their runs on *fresh* seeds are unbiased; but with
three fresh seeds each, the lowest of several fresh means is again an optimistic pick. So:

- **The stopping step** (``robust_step``): on the fresh seeds' mean curve, the latest evaluated step whose
  mean is within one standard error (across the seeds, at the best step) of the best mean — the one-standard-
  error rule of cross-validation (Hastie, Tibshirani & Friedman, "The Elements of Statistical Learning",
  §7.10): a later step that is as good within the noise is the one that reproduces; an early minimum of three
  noisy curves often does not.
- **The winner** (``choose``): Dunnett's many-to-one comparison, one-sided (Dunnett 1955, "A multiple
  comparison procedure for comparing several treatments with a control"). Each challenger's fresh mean is
  compared with the incumbent's; the noise is the seed-to-seed standard deviation pooled over every
  finalist (with three fresh seeds one pair's own estimate has 4 degrees of freedom and varies ~10x between
  draws; pooled over 5-7 finalists it has 10-14); the critical value accounts for the several challengers
  compared at once, so when no challenger is truly better, one wins in at most ``alpha`` (5%) of draws.
  The challenger with the largest significant margin replaces the incumbent; otherwise the incumbent stays.
  Its critical value is computed by a seeded Monte Carlo of the same statistic under the null (20,000 draws;
  deterministic), not read from a table.

Pooling assumes the finalists' seed noise is alike; a noisier challenger inflates it for all, which makes the
test more cautious, never less.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05
_DRAWS = 20_000


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' mean at each step every seed evaluated."""
    steps = sorted(set.intersection(*({s for s, _ in c} for c in curves)))
    return [(s, statistics.fmean(dict(c)[s] for c in curves)) for s in steps]


def robust_step(curves: list[list[tuple[int, float]]]) -> tuple[int, list[float]]:
    """(step, the seeds' values there): the latest step whose mean is within one standard error of the best
    mean (with one seed, or no spread: the latest of the steps that equal the best)."""
    means = mean_curve(curves)
    if not means:
        raise ValueError("robust_step: the curves share no evaluated step")
    best_step, best = min(means, key=lambda sv: (sv[1], sv[0]))
    at_best = [dict(c)[best_step] for c in curves]
    se = statistics.stdev(at_best) / math.sqrt(len(at_best)) if len(at_best) > 1 else 0.0
    step = max(s for s, m in means if m <= best + se)
    return step, [dict(c)[step] for c in curves]


@functools.lru_cache(maxsize=64)
def critical_value(challengers: int, seeds: int, alpha: float = ALPHA) -> float:
    """Dunnett's one-sided critical value for ``challengers`` compared with one incumbent, ``seeds`` values
    each, the standard deviation pooled over all of them: the (1 - alpha) quantile of the largest statistic
    under the null (every configuration equal), by a seeded Monte Carlo."""
    import numpy as np

    if challengers < 1 or seeds < 2:
        raise ValueError(f"critical_value: needs >= 1 challenger and >= 2 seeds (got {challengers}, {seeds})")
    rng = np.random.default_rng(12345)
    z = rng.standard_normal((_DRAWS, challengers + 1, seeds))
    means = z.mean(axis=2)
    pooled = np.sqrt(((z - means[..., None]) ** 2).sum(axis=(1, 2)) / ((challengers + 1) * (seeds - 1)))
    stat = (means[:, :1] - means[:, 1:]) / (pooled[:, None] * math.sqrt(2 / seeds))
    return float(np.quantile(stat.max(axis=1), 1 - alpha))


@dataclass(frozen=True)
class Decision:
    """Which finalist wins and how surely. ``winner``: the index into the values given (0: the incumbent).
    ``statistic``/``critical``: the best challenger's and the test's (None when there was nothing to test);
    ``gain``: incumbent's mean - winner's (or the best challenger's, when it lost) mean; ``noise``: the pooled
    seed standard deviation; ``needed``: the gain the test required (critical x noise x sqrt(2/n));
    ``verified``: a test was possible (>= 2 seeds)."""

    winner: int
    best_challenger: int | None
    statistic: float | None
    critical: float | None
    gain: float
    noise: float
    needed: float | None
    verified: bool

    def text(self, names: list[str]) -> str:
        if self.best_challenger is None:
            return f"{names[0]} stands alone (no challenger finished)"
        c = names[self.best_challenger]
        if not self.verified:
            return (f"chosen by the lowest mean without a test (fewer than 2 fresh seeds): {names[self.winner]}; "
                    "pass seeds=(s0, s1, s2, s3) or more for a verified choice")
        if self.winner == 0:
            return (f"no challenger beat {names[0]} by more than the noise: the best, {c}, was better by "
                    f"{self.gain:.4g} where Dunnett's one-sided test (alpha {ALPHA}) needed "
                    f"{self.needed:.4g} (statistic {self.statistic:.2f} < "
                    f"{self.critical:.2f}); the incumbent stays")
        return (f"{c} beat {names[0]} by {self.gain:.4g} (seed noise {self.noise:.3g}; Dunnett's one-sided "
                f"statistic {self.statistic:.2f} > critical {self.critical:.2f} at alpha {ALPHA}: a challenger as "
                "good as the incumbent would pass in fewer than 5% of draws)")


def choose(values: list[list[float]]) -> Decision:
    """``values[0]``: the incumbent's per-seed values, ``values[1:]``: the challengers' (lower is better; the
    same seeds for all). Dunnett's test when there are >= 2 seeds; with one, the lowest mean, unverified."""
    means = [statistics.fmean(v) for v in values]
    if len(values) < 2:
        return Decision(0, None, None, None, 0.0, 0.0, None, False)
    best_c = min(range(1, len(values)), key=lambda i: (means[i], i))
    n = min(len(v) for v in values)
    if n < 2 or any(len(v) != n for v in values):
        winner = best_c if means[best_c] < means[0] else 0
        return Decision(winner, best_c, None, None, means[0] - means[best_c], 0.0, None, False)
    dof = len(values) * (n - 1)
    noise = math.sqrt(sum((x - m) ** 2 for v, m in zip(values, means) for x in v) / dof)
    unit = math.sqrt(2 / n)
    crit = critical_value(len(values) - 1, n)
    if noise == 0.0:  # identical seeds' values (a deterministic model): any strict improvement is real
        stats = [math.inf if means[0] > means[i] else -math.inf if means[0] < means[i] else 0.0
                 for i in range(len(values))]
    else:
        stats = [(means[0] - means[i]) / (noise * unit) for i in range(len(values))]
    passing = [i for i in range(1, len(values)) if stats[i] > crit]
    winner = max(passing, key=lambda i: (stats[i], -i)) if passing else 0
    shown = winner if winner else best_c
    return Decision(winner, shown, stats[shown], crit, means[0] - means[shown], noise, crit * noise * unit, True)

"""The choices the trial and the range test make from curves, on synthetic curves whose answer is known:
where to stop (the trial's robust step), which finalist wins (the many-to-one test against the incumbent: a pure-
noise challenger must not win more often than its error rate, a real 10% improvement must win), and which
learning rate to suggest (steepest, valley, min/10, cap).
An audit planted "the last common step instead of the best" and "max for min in the cap" and "steepest
ascent": nothing failed; these do."""

from __future__ import annotations

import math

import pytest

from optadvisor.advisor._lr import _suggest
import torch

from optadvisor.advisor._select import choose, critical_value, robust_step


def test_the_stop_is_the_latest_step_within_one_standard_error_of_the_best_mean():
    # three seeds; the mean is lowest at step 30 (0.5, standard error 0.1 / sqrt(3) = 0.058); step 40's mean
    # 0.55 is within it, step 50's 0.56 is not: stop at 40, not at the noisy minimum
    a = [(10, 1.0), (20, 0.7), (30, 0.4), (40, 0.54), (50, 0.56)]
    b = [(10, 1.2), (20, 0.8), (30, 0.5), (40, 0.56), (50, 0.56)]
    c = [(10, 1.1), (20, 0.9), (30, 0.6), (40, 0.55), (50, 0.56)]
    assert robust_step([a, b, c]) == (40, [0.54, 0.56, 0.55])
    # tighter seeds (standard error 0.01): the best step itself
    a2, b2, c2 = ([(s, v + d) if s == 30 else (s, v) for s, v in x] for x, d in ((b, -0.01), (b, 0.0), (b, 0.01)))
    assert robust_step([a2, b2, c2])[0] == 30


def test_the_stop_counts_only_steps_every_seed_evaluated_and_without_spread_takes_the_latest_best():
    a = [(10, 0.3), (20, 0.5), (30, 0.5)]
    b = [(20, 0.5), (30, 0.5), (40, 0.1)]  # step 10 and 40: one seed only
    assert robust_step([a, b]) == (30, [0.5, 0.5])  # equal means, no spread: the latest within it
    assert robust_step([[(10, 0.2), (20, 0.1), (30, 0.1), (40, 0.11)]]) == (30, [0.1])


def test_the_critical_value_matches_the_t_quantile_for_one_challenger():
    # one challenger, two groups of 3: (m0 - m1) / sqrt((s0^2 + s1^2) / 3) is a t statistic with 4 degrees of
    # freedom; t_0.90(4) = 1.533
    assert critical_value(1, 3) == pytest.approx(1.533, abs=0.03)
    assert critical_value(1, 3, alpha=0.05) == pytest.approx(2.132, abs=0.04)
    # more challengers need a larger margin; more seeds a smaller one
    assert critical_value(1, 3) < critical_value(4, 3) < critical_value(8, 3)
    assert critical_value(4, 10) < critical_value(4, 3)
    with pytest.raises(ValueError, match="needs >= 1 challenger and >= 2 seeds"):
        critical_value(3, 1)


def _draw(gen, means, noise, seeds=3):
    return [[m + noise * float(torch.randn((), generator=gen)) for _ in range(seeds)] for m in means]


def test_a_pure_noise_challenger_wins_no_more_often_than_the_tests_error_rate():
    """1,000 draws of an incumbent and six challengers that are all equally good (noise 5% of the value):
    a challenger replaces the incumbent in at most alpha = 10% of them (plus the sampling's slack)."""
    gen = torch.Generator().manual_seed(0)
    wins = sum(choose(_draw(gen, [1.0] * 7, 0.05)).winner != 0 for _ in range(1000))
    assert wins <= 120, wins  # 10% of 1,000 is 100; 120 is two binomial standard deviations above
    assert wins >= 60, wins  # and the test is not vacuous: it does switch under the null, about alpha of the time


def test_a_ten_percent_better_challenger_wins():
    """The same six challengers, one of them 10% better (noise 3% of the value, three fresh seeds): it wins in
    at least 85% of 500 draws (a simulation of the statistic gives 87%); an equal one wins in a few."""
    gen = torch.Generator().manual_seed(1)
    winners = [choose(_draw(gen, [1.0, 1.0, 1.0, 0.9, 1.0, 1.0, 1.0], 0.03)).winner for _ in range(500)]
    assert winners.count(3) >= 425, winners.count(3)
    assert sum(w not in (0, 3) for w in winners) < 25


def test_a_noisy_finalist_does_not_hide_a_clean_improvement():
    """Each pair is judged by its own variance: a challenger 2x better with 5% seed noise wins even when another
    finalist's values scatter over a decade (the pooled variance hid it: gen_reg_clean_1k)."""
    clean = [[0.0100, 0.0104, 0.0097], [0.0050, 0.0052, 0.0049], [0.02, 0.2, 0.05]]
    assert choose(clean, log=True).winner == 1
    assert "b beat a by 49.8%" in choose(clean, log=True).text(["a", "b", "c"])


def test_a_five_percent_worse_challenger_almost_never_wins():
    """The danger the issue measured: a worse configuration winning. One challenger 5% worse, five equal ones
    (noise 3%): a worse one wins in under 1% of 1,000 draws."""
    gen = torch.Generator().manual_seed(2)
    winners = [choose(_draw(gen, [1.0, 1.05, 1.0, 1.0, 1.0, 1.0, 1.0], 0.03)).winner for _ in range(1000)]
    assert winners.count(1) < 10, winners.count(1)


def test_a_worse_challenger_that_looked_better_in_the_search_does_not_win():
    """The issue's case: the trial's pick, 0.234 / 0.214 / 0.266 on fresh seeds, against the rules' advice,
    0.216 / 0.191 / 0.193: the incumbent stays, and the verdict says by how much the challenger was behind."""
    d = choose([[0.216, 0.191, 0.193], [0.234, 0.214, 0.266]])
    assert d.winner == 0 and d.verified and d.gain < 0
    assert "no challenger beat rules by more than the noise" in d.text(["rules", "pick"])


def test_choices_without_a_test():
    assert choose([[0.5, 0.6]]).winner == 0  # the incumbent alone
    one_seed = choose([[0.5], [0.4]])
    assert one_seed.winner == 1 and not one_seed.verified and "without a test" in one_seed.text(["a", "b"])
    exact = choose([[0.5, 0.5], [0.4, 0.4]])  # no seed noise at all: a strict improvement is real
    assert exact.winner == 1 and exact.verified and "beat a by 0.1" in exact.text(["a", "b"])


def _curve(n: int, log_step: float, steep_at: int = 15, lowest: int = 25):
    """Flat to index 8, falling 0.05 a point to ``lowest`` with an extra 0.3 drop between steep_at and
    steep_at + 1, then rising: steepest at ``steep_at`` (its central difference holds the drop first), the
    deepest descent 8..lowest, so the valley is 8 + 2/3 of it, the minimum at ``lowest``."""
    lrs = [1e-5 * 10 ** (i * log_step) for i in range(n)]
    smooth = []
    for i in range(n):
        if i <= 8:
            v = 2.0
        elif i <= lowest:
            v = 2.0 - 0.05 * (i - 8) - (0.3 if i > steep_at else 0.0)
        else:
            v = 2.0 - 0.05 * (lowest - 8) - 0.3 + 0.1 * (i - lowest)
        smooth.append(v)
    return lrs, smooth


def test_the_suggestions_on_a_curve_with_a_known_shape():
    lrs, smooth = _curve(40, 0.1)
    suggestions, recommended, reasoning = _suggest(lrs, smooth, stopped=False)
    valley = 8 + (2 * (25 - 8)) // 3
    assert suggestions == {"steepest": lrs[15], "valley": lrs[valley], "min_div_10": lrs[25] / 10}
    assert lrs[valley] < 3 * lrs[25] / 10  # the cap does not bind: the valley is recommended
    assert recommended == lrs[valley]
    assert "capped" not in reasoning


def test_the_cap_binds_when_the_valley_is_close_to_the_minimum():
    lrs, smooth = _curve(40, 0.05)  # 6 points apart: 10 ** 0.3 = 2x, above the cap's 3/10
    suggestions, recommended, reasoning = _suggest(lrs, smooth, stopped=False)
    cap = 3 * lrs[25] / 10
    assert suggestions["valley"] > cap
    assert recommended == pytest.approx(cap) and recommended < suggestions["valley"]
    assert f"capped at 3 x (min/10) = {cap:.3g}" in reasoning


def test_too_few_points_suggest_nothing_and_say_why():
    lrs, smooth = _curve(11, 0.1, steep_at=5, lowest=7)
    assert _suggest(lrs, smooth, stopped=True) == ({}, None, (
        "only 11 points before divergence (9 after trimming the first and last 10%): too few to suggest a "
        "learning rate; sweep more steps or start lower"))
    assert _suggest(*_curve(12, 0.1, steep_at=5, lowest=7), stopped=True)[1] is not None  # 10 are enough
    assert all(math.isfinite(v) for v in smooth)


def test_robust_step_with_two_seeds_and_without_a_common_step():
    # two seeds: the standard error at the best step (values 0.4, 0.6) is 0.1; step 30's mean 0.525 is within
    a = [(10, 1.0), (20, 0.4), (30, 0.5)]
    b = [(10, 1.0), (20, 0.6), (30, 0.55)]
    assert robust_step([a, b]) == (30, [0.5, 0.55])
    with pytest.raises(ValueError, match="robust_step: the curves share no evaluated step"):
        robust_step([[(10, 1.0)], [(20, 1.0)]])


def test_every_field_of_the_decision():
    import math

    from optadvisor.advisor._select import Decision

    assert choose([[0.5, 0.6]]) == Decision(0, None, None, None, 0.0, 0.0, None, False, False)
    assert choose([[0.5, 0.6]]).text(["a"]) == "a stands alone (no challenger finished)"
    # one seed each: the lowest mean, unverified, both ways
    one = choose([[0.5], [0.4]], log=True)
    assert (one.winner, one.best_challenger, one.statistic, one.critical, one.noise, one.needed, one.verified,
            one.log) == (1, 1, None, None, 0.0, None, False, True)
    assert one.gain == pytest.approx(math.log(0.5 / 0.4))
    assert choose([[0.4], [0.5]]).winner == 0
    # the log scale needs positive values: a zero falls back to differences
    zero = choose([[0.0, 0.1], [0.05, 0.06]], log=True)
    assert not zero.log and zero.gain == pytest.approx(0.05 - 0.055)
    # no spread at all: a worse challenger loses outright, an equal one ties
    assert choose([[0.4, 0.4], [0.5, 0.5]]).statistic == -math.inf
    assert choose([[0.4, 0.4], [0.4, 0.4]]) == Decision(0, 1, 0.0, critical_value(1, 2), 0.0, 0.0, 0.0, True, False)
    # a verified win: each number is the pair's own
    inc, ch, other = [1.0, 1.1, 1.2], [0.5, 0.6, 0.7], [0.2, 3.0, 9.0]
    d = choose([inc, ch, other])
    var = 0.01  # both pairs' members have variance 0.01
    assert d.winner == 1 and d.best_challenger == 1 and d.verified and not d.log
    assert d.gain == pytest.approx(0.5) and d.noise == pytest.approx(math.sqrt(var))
    assert d.statistic == pytest.approx(0.5 / math.sqrt(2 * var / 3))
    assert d.critical == critical_value(2, 3) and d.needed == pytest.approx(d.critical * math.sqrt(2 * var / 3))
    assert d.text(["i", "c", "o"]).startswith("c beat i by 0.5 (seed noise 0.1; one-sided many-to-one statistic")
    # a loss states what the test needed
    lost = choose([inc, [0.95, 1.05, 1.15]])
    assert lost.winner == 0 and lost.needed == pytest.approx(critical_value(1, 3) * math.sqrt(2 * var / 3))
    assert f"needed {lost.needed:.4g} (statistic {lost.statistic:.2f} < {lost.critical:.2f})" in lost.text(
        ["i", "c"])


def test_the_reported_challenger_is_the_winner_or_else_the_lowest_mean():
    import math

    inc = [1.00, 1.02, 0.98]             # variance 0.0004
    noisy_low = [0.2, 1.4, 0.5]          # the lowest mean, but its spread hides it
    tight = [0.90, 0.905, 0.895]         # 10% better with variance 0.000025: the significant one
    d = choose([inc, [1.1, 1.1, 1.1], noisy_low, tight])
    assert d.winner == 3 and d.best_challenger == 3 and d.gain == pytest.approx(0.1)
    assert d.noise == pytest.approx(math.sqrt((0.0004 + 0.000025) / 2))
    assert d.needed == pytest.approx(d.critical * math.sqrt((0.0004 + 0.000025) / 3))
    # nobody passes: the verdict names the lowest mean, wherever it sits
    lost = choose([inc, [1.1, 1.1, 1.1], noisy_low])
    assert lost.winner == 0 and lost.best_challenger == 2 and lost.gain == pytest.approx(1.0 - 0.7)
    # one seed: a tie keeps the incumbent
    assert choose([[0.5], [0.5]]).winner == 0
    # the log scale without a test keeps its flag
    assert choose([[0.5, 0.6]], log=True).log and choose([[0.5, 0.6]], log=True).verified is False

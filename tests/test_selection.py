"""The choices the trial and the range test make from curves, on synthetic curves whose answer is known:
where to stop (the trial's best step) and which learning rate to suggest (steepest, valley, min/10, cap).
An audit planted "the last common step instead of the best" and "max for min in the cap" and "steepest
ascent": nothing failed; these do."""

from __future__ import annotations

import math

import pytest

from optadvisor.advisor._lr import _suggest
from optadvisor.advisor._trial import best_point


def test_the_best_step_is_where_the_mean_curve_is_lowest_mid_run():
    # two seeds; the mean is lowest at step 30 (0.5), not at the end (0.9) nor at either seed's own minimum
    a = [(10, 1.0), (20, 0.7), (30, 0.5), (40, 0.6), (50, 0.9)]
    b = [(10, 1.2), (20, 0.4), (30, 0.5), (40, 0.7), (50, 0.9)]
    assert best_point([a, b]) == (30, pytest.approx(0.5))


def test_the_best_step_counts_only_steps_every_seed_evaluated_and_takes_the_earliest_tie():
    a = [(10, 0.3), (20, 0.5), (30, 0.5)]
    b = [(20, 0.5), (30, 0.5), (40, 0.1)]  # step 10 and 40: one seed only
    assert best_point([a, b]) == (20, pytest.approx(0.5))


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

"""The LR range test's sweep, number for number: the learning rates, the trailing-median EMA, the stop, the
defaults and the refusals (mutation testing found each of these unchecked: a doubled exponent of the sweep, a
smoothing weight of (1 + s), a bias correction dropped all passed the curve-level tests)."""

from __future__ import annotations

import inspect
import math
import statistics

import pytest
import torch

from optadvisor import kernels
from optadvisor.advisor import lr_range_test


def _data(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=gen)


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.w(x).squeeze(-1)


def _reference_smoothing(losses, steps, smoothing):
    window = max(3, min(9, steps // 12) | 1)
    avg, out = 0.0, []
    for i in range(len(losses)):
        robust = statistics.median(losses[max(0, i + 1 - window):i + 1])
        avg = smoothing * avg + (1 - smoothing) * robust
        out.append(avg / (1 - smoothing ** (i + 1)))
    return out


@pytest.mark.parametrize("steps,smoothing", [(40, 0.9), (120, 0.5), (7, 0.0)])
def test_the_sweep_and_its_smoothing_number_for_number(steps, smoothing):
    torch.manual_seed(0)
    model = Lin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = lr_range_test(model, kernels.MSELoss(), lambda p, lr: kernels.SGD(p, lr=lr), _data(), start=1e-5,
                        end=1e-2, steps=steps, batch_size=16, smoothing=smoothing)
    assert not res.stopped_early and len(res.lrs) == len(res.losses) == len(res.smoothed) == steps
    ratio = (1e-2 / 1e-5) ** (1 / (steps - 1))
    assert res.lrs == [1e-5 * ratio ** i for i in range(steps)]
    assert res.lrs[-1] == pytest.approx(1e-2)
    assert res.smoothed == pytest.approx(_reference_smoothing(res.losses, steps, smoothing), rel=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored exactly


def test_divergence_stops_the_sweep_at_the_first_smoothed_loss_above_the_factor():
    torch.manual_seed(0)
    res = lr_range_test(Lin(), kernels.MSELoss(), lambda p, lr: kernels.SGD(p, lr=lr), _data(), start=1e-3,
                        end=1e3, steps=60, batch_size=16, smoothing=0.0, diverge_factor=4.0)
    assert res.stopped_early and len(res.lrs) < 60
    best = min(res.smoothed[:-1])
    assert res.smoothed[-1] > 4.0 * best  # the point that stopped it is recorded
    assert all(s <= 4.0 * min(res.smoothed[:i + 1]) for i, s in enumerate(res.smoothed[:-1]))
    # a first point can never stop the sweep on its own (nothing to compare with): i > 0
    one = lr_range_test(Lin(), kernels.MSELoss(), lambda p, lr: kernels.SGD(p, lr=lr), _data(), start=1e-5,
                        end=1e-4, steps=2, batch_size=16, diverge_factor=0.5, smoothing=0.0)
    assert len(one.lrs) == 2  # a factor below 1 would stop at the first point if it were compared with itself


def test_a_non_finite_loss_stops_and_is_not_recorded():
    class Explodes(Lin):
        def forward(self, x):
            out = super().forward(x)
            return out * (float("nan") if self.calls >= 5 else 1.0)

        calls = 0

    model = Explodes()

    def loss_fn(pred, y):
        model.calls += 1
        return torch.nn.functional.mse_loss(pred, y)
    res = lr_range_test(model, loss_fn, lambda p, lr: kernels.SGD(p, lr=lr), _data(), start=1e-5, end=1e-3,
                        steps=30, batch_size=16)
    assert res.stopped_early and len(res.losses) == 5 and all(math.isfinite(v) for v in res.losses)
    assert res.recommended is None and "only 5 points before divergence (3 after trimming" in res.reasoning


def test_defaults_and_refusals_word_for_word():
    sig = inspect.signature(lr_range_test).parameters
    assert {k: sig[k].default for k in ("start", "end", "steps", "batch_size", "smoothing", "diverge_factor")} == {
        "start": 1e-7, "end": 10.0, "steps": 100, "batch_size": 64, "smoothing": 0.9, "diverge_factor": 4.0}
    run = lambda **kw: lr_range_test(Lin(), kernels.MSELoss(), lambda p, lr: kernels.SGD(p, lr=lr), _data(),  # noqa: E731
                                     **kw)
    with pytest.raises(ValueError, match=r"^lr_range_test: need 0 < start < end \(got start=0, end=1\)$"):
        run(start=0, end=1)
    with pytest.raises(ValueError, match=r"^lr_range_test: need 0 < start < end \(got start=1, end=1\)$"):
        run(start=1, end=1)
    with pytest.raises(ValueError, match=r"^lr_range_test: steps must be >= 2 \(got 1\)$"):
        run(steps=1)
    with pytest.raises(ValueError, match=r"^lr_range_test: smoothing must be in \[0, 1\) \(got 1\)$"):
        run(smoothing=1)
    with pytest.raises(ValueError, match=r"^lr_range_test: smoothing must be in \[0, 1\) \(got -0.1\)$"):
        run(smoothing=-0.1)
    with pytest.raises(ValueError, match=r"^lr_range_test: the model has no trainable parameters$"):
        lr_range_test(Lin().requires_grad_(False), kernels.MSELoss(), lambda p, lr: kernels.SGD(p, lr=lr), _data())
    assert len(run(steps=2, start=1e-5, end=1e-4, smoothing=0.0).lrs) == 2  # both bounds allowed


# ---- crafted losses: the loss function returns the batch's y mean, so the test writes the curve -------------
def _scripted(values):
    """An iterable of batches whose loss (with ``_scripted_loss``) is exactly each value in turn."""
    return [(torch.zeros(2, 4), torch.full((2,), float(v))) for v in values]


def _scripted_loss(pred, y):
    return y.mean() + 0.0 * pred.sum()


def _run_scripted(values, **kw):
    return lr_range_test(Lin(), _scripted_loss, lambda p, lr: kernels.SGD(p, lr=lr), _scripted(values), **kw)


def test_defaults_by_behaviour():
    # a flat curve never stops: the default sweep is 100 points from 1e-7 to 10
    res = _run_scripted([1.0] * 100)
    assert len(res.lrs) == 100 and res.lrs[0] == 1e-7 and res.lrs[-1] == pytest.approx(10.0)
    assert not res.stopped_early
    # default batch of 64 rows: the first loss is the mean of the first 64 targets
    x = torch.zeros(130, 4)
    y = torch.arange(130, dtype=torch.float32)
    first = lr_range_test(Lin(), _scripted_loss, lambda p, lr: kernels.SGD(p, lr=lr), (x, y), steps=2)
    assert first.losses[0] == pytest.approx(float(y[:64].mean()))
    # default diverge_factor 4: a smoothed loss of 4.5x the best stops the sweep (smoothing 0: the median of 3)
    stop = _run_scripted([1.0, 1.0, 1.0, 4.5, 4.5, 4.5, 4.5, 4.5], steps=8, smoothing=0.0)
    assert stop.stopped_early and len(stop.lrs) == 5 and stop.smoothed[-1] == 4.5
    # exactly 4x is not above 4x
    flat4 = _run_scripted([1.0, 1.0, 1.0, 4.0, 4.0, 4.0], steps=6, smoothing=0.0)
    assert not flat4.stopped_early and len(flat4.lrs) == 6


def test_the_second_point_can_stop_the_sweep():
    res = _run_scripted([1.0, 3.0, 3.0], steps=3, smoothing=0.0, diverge_factor=1.5)
    # i=1: median(1, 3) = 2 > 1.5 x 1
    assert res.stopped_early and len(res.lrs) == 2 and res.smoothed == [1.0, 2.0]


@pytest.mark.parametrize("steps,window", [(48, 5), (60, 5), (36, 3), (240, 9)])
def test_the_median_window_grows_with_the_sweep(steps, window):
    # one outlier among ones: a window of w ignores it only if there are (w+1)//2 ones around it
    values = [1.0] * steps
    values[steps // 2] = values[steps // 2 + 1] = 50.0  # two outliers in a row: a window of 3 follows them
    res = _run_scripted(values, steps=steps, smoothing=0.0, diverge_factor=1e9)
    assert max(res.smoothed) == (50.0 if window == 3 else 1.0)


def test_the_model_is_restored_with_any_optimizer():
    torch.manual_seed(0)
    model = Lin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_range_test(model, kernels.MSELoss(), lambda p, lr: torch.optim.SGD(p, lr=lr), _data(), start=1e-4, end=1e-1,
                  steps=20, batch_size=16)  # torch's SGD updates the parameters' own storage
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_empty_data_source_is_named():
    with pytest.raises(ValueError, match=r"^lr_range_test yielded no batches$"):
        lr_range_test(Lin(), _scripted_loss, lambda p, lr: kernels.SGD(p, lr=lr), [])


# ---- the suggestions on a curve whose answers are known ------------------------------------------------------
def _curve():
    """110 points: flat at 1 (with a dip at 10 that the 10% trim removes), one descent from 40 to 70 whose
    steepest symmetric slope is at 51, the minimum at 70, then a rise. Drops are multiples of 1/64: exact."""
    d = 1 / 64
    s = [1.0] * 41
    s[10] = 0.1
    for i in range(40, 70):
        s.append(s[-1] - {50: 4 * d, 51: 2 * d}.get(i, d))
    for _ in range(70, 109):
        s.append(s[-1] + d)
    return s


@pytest.mark.parametrize("per_step,capped", [(0.05, True), (0.1, False)])
@pytest.mark.parametrize("stopped", [False, True])
def test_suggestions_on_a_known_curve(per_step, capped, stopped):
    from optadvisor.advisor._lr import _suggest

    smooth = _curve()
    lrs = [10 ** (-8 + per_step * i) for i in range(len(smooth))]
    suggestions, recommended, reasoning = _suggest(lrs, smooth, stopped)
    assert suggestions == {"steepest": lrs[51], "valley": lrs[60], "min_div_10": lrs[70] / 10}
    cap = 3 * lrs[70] / 10
    assert recommended == (cap if capped else lrs[60])
    assert reasoning == (
        f"the smoothed loss is lowest at lr={lrs[70]:.3g}{' before it diverged' if stopped else ''}; it falls "
        f"fastest at {lrs[51]:.3g}; the deepest descent runs from {lrs[40]:.3g} to {lrs[70]:.3g}. Recommended: the "
        f"valley point 2/3 along that descent ({lrs[60]:.3g})" + (f", capped at 3 x (min/10) = {cap:.3g}" if capped
                                                                  else ""))


@pytest.mark.parametrize("stopped,word", [(False, "the end"), (True, "divergence")])
def test_too_few_points_say_why(stopped, word):
    from optadvisor.advisor._lr import _suggest

    assert _suggest([1e-3 * 2 ** i for i in range(11)], [1.0] * 11, stopped) == (
        {}, None, f"only 11 points before {word} (9 after trimming the first and last 10%): too few to suggest a "
                  "learning rate; sweep more steps or start lower")
    assert _suggest([1e-3 * 2 ** i for i in range(15)], [1.0 - 0.01 * i for i in range(15)], stopped)[1] is not None


def test_the_deepest_descent_wins_over_a_later_shallower_one():
    from optadvisor.advisor._lr import _suggest

    d = 1 / 64
    smooth = _curve()
    for i in range(86, 96):  # a second, shallower descent after the minimum: 10 steps of d/2
        smooth[i] = smooth[85] - (i - 85) * d / 2
    for i in range(96, 110):
        smooth[i] = smooth[95] + (i - 95) * d
    lrs = [10 ** (-8 + 0.1 * i) for i in range(len(smooth))]
    suggestions, _, reasoning = _suggest(lrs, smooth, False)
    assert suggestions["valley"] == lrs[60] and f"runs from {lrs[40]:.3g} to {lrs[70]:.3g}" in reasoning

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

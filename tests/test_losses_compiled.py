"""The compiled loss cores (used for large inputs) against torch, on small inputs by lowering the threshold.

Each (function, flags, dtype) is one compile, paid once per CI run, so the configurations are a fixed set
covering every flag; hypothesis varies shapes, values and hyperparameters within them.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import examples
import test_losses
from test_losses import compare

from optadvisor import kernels
from optadvisor.kernels._runtime import compile as _compile
from optadvisor.kernels.losses import base as _loss_base

SETTINGS = settings(max_examples=examples(8), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def always_compile(monkeypatch):
    monkeypatch.setattr(_loss_base, "_COMPILE_MIN_NUMEL", 1)
    monkeypatch.setenv(_compile.ENV_VAR, "sync")  # compiled at the first call (the default: in the background)
    yield
    assert not _compile._broken, _compile._broken  # it really ran compiled, never fell back


@pytest.fixture
def ran(monkeypatch):
    """The compiled cores called (and completed) since the last ``ran.clear()``: recorded per call, so a
    test sees what *its* example ran, not what any earlier test compiled."""
    calls: list[str] = []
    real = _loss_base.run_fused

    def recording(fn, flags, tensors, hp, *, strict, **kw):
        ok, out = real(fn, flags, tensors, hp, strict=strict, **kw)
        if ok:
            calls.append(fn.__name__)
        return ok, out
    monkeypatch.setattr(_loss_base, "run_fused", recording)
    return calls


@SETTINGS
@given(n=st.integers(1, 300), cols=st.integers(1, 4), reduction=st.sampled_from(["mean", "sum", "none"]),
       target_grad=st.booleans(), delta=st.sampled_from([0.1, 1.0]), scale=st.sampled_from([1.0, 50.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_mse_huber_compiled(ran, n, cols, reduction, target_grad, delta, scale, dtype):
    ran.clear()
    x = (torch.randn(n, cols, dtype=dtype) * scale).requires_grad_()
    y = (torch.randn(n, cols, dtype=dtype) * scale).requires_grad_(target_grad)
    compare(lambda a, b: kernels.mse_loss(a, b, reduction), lambda a, b: F.mse_loss(a, b, reduction=reduction),
            [x, y], dtype, scale * scale)
    compare(lambda a, b: kernels.huber_loss(a, b, reduction, delta),
            lambda a, b: F.huber_loss(a, b, reduction=reduction, delta=delta), [x, y], dtype, scale)
    assert "mse_fused" in ran and "huber_fused" in ran


@SETTINGS
@given(shape=st.sampled_from([(1,), (7,), (300,), (5, 3), (40, 7), (3, 1, 4)]), margin=st.sampled_from([0.5, 1.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), target_grad=st.booleans())
def test_hinge_compiled(ran, shape, margin, reduction, target_grad):
    """2-D and 3-D inputs too: a gradient scaled by the number of rows instead of elements passes 1-D ones."""
    ran.clear()
    x = torch.randn(shape, requires_grad=True)
    y = (torch.randint(0, 2, shape) * 2 - 1).float().requires_grad_(target_grad)

    def ref(a, b):
        per = torch.clamp(margin - b * a, min=0)
        return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per
    compare(lambda a, b: kernels.hinge_loss(a, b, margin, reduction), ref, [x, y], torch.float32)
    assert "hinge_fused" in ran


@pytest.mark.parametrize("input_grad,target_grad", [(False, True), (True, True), (False, False)])
def test_hinge_compiled_float64_for_each_gradient_wanted(ran, input_grad, target_grad):
    """float64 end to end (a margin, a 1/n or a gradient buffer held in float32 shows at 1e-12), with a
    gradient for the target alone, for both, and for neither (the no-grad path)."""
    ran.clear()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 7, generator=gen, dtype=torch.float64).requires_grad_(input_grad)
    y = (torch.randint(0, 2, (9, 7), generator=gen) * 2 - 1).double().requires_grad_(target_grad)
    got = kernels.hinge_loss(x, y, margin=0.3)
    assert "hinge_fused" in ran
    xr, yr = x.detach().requires_grad_(input_grad), y.detach().requires_grad_(target_grad)
    ref = torch.clamp(0.3 - yr * xr, min=0).mean()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    wanted = [t for t in (x, y) if t.requires_grad]
    if wanted:
        grads = torch.autograd.grad(got, wanted)
        refs = torch.autograd.grad(ref, [t for t in (xr, yr) if t.requires_grad])
        for g, r in zip(grads, refs):
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(n=st.integers(0, 40), n_classes=st.integers(1, 50), use_weight=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignore=st.booleans(), scale=st.sampled_from([1.0, 100.0]))
def test_cross_entropy_compiled(ran, n, n_classes, use_weight, smoothing, reduction, ignore, scale):
    ran.clear()
    x = (torch.randn(n, n_classes) * scale).requires_grad_()
    t = torch.randint(0, n_classes, (n,))
    if ignore and n:
        t[: max(1, n // 3)] = -100
    w = torch.rand(n_classes) + 0.1 if use_weight else None
    compare(lambda a: kernels.cross_entropy(a, t, w, reduction=reduction, label_smoothing=smoothing),
            lambda a: F.cross_entropy(a, t, w, reduction=reduction, label_smoothing=smoothing), [x],
            torch.float32, scale)
    if n:
        assert "cross_entropy_rows_fused" in ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_compiled_mean_divides_by_the_valid_weights(ran, dtype, smoothing):
    """Class weights and ignored targets under 'mean': the denominator is the sum of the weights of the
    targets that count, far from the number of samples here (weights 0.1..10, a third ignored)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=gen, dtype=dtype).requires_grad_()
    t = torch.randint(0, 6, (30,), generator=gen)
    t[:10] = -100
    w = torch.tensor([0.1, 10.0, 3.0, 0.5, 7.0, 1.0], dtype=dtype)
    denom = float(w[t[10:]].sum())
    assert abs(denom - 30) > 10 and abs(denom - 20) > 10  # far from the sample and the valid-sample counts
    compare(lambda a: kernels.cross_entropy(a, t, w, label_smoothing=smoothing),
            lambda a: F.cross_entropy(a, t, w, label_smoothing=smoothing), [x], dtype)
    assert "cross_entropy_rows_fused" in ran


def test_cross_entropy_compiled_bf16_and_all_ignored():
    x = (torch.randn(64, 10) * 5).bfloat16().requires_grad_()
    t = torch.randint(0, 10, (64,))
    compare(lambda a: kernels.cross_entropy(a, t), lambda a: F.cross_entropy(a, t), [x], torch.bfloat16)
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.full((8,), -100)
    compare(lambda a: kernels.cross_entropy(a, t), lambda a: F.cross_entropy(a, t), [x], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["hinge", "cross_entropy"])
def test_low_precision_compiled_losses_are_the_float32_loss_rounded_once(ran, dtype, name):
    """The eager test's bit-for-bit contract, through the compiled cores."""
    ran.clear()
    test_losses.test_low_precision_losses_are_the_float32_loss_rounded_once(dtype, name, "mean")
    assert {"hinge": "hinge_fused", "cross_entropy": "cross_entropy_rows_fused"}[name] in ran


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_compiled_with_masked_logits(ran, smoothing):
    """-inf-masked logits through the compiled core: finite without label smoothing, as torch's."""
    ran.clear()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, generator=gen)
    x[:, 3] = float("-inf")
    x[2, 0] = float("-inf")
    t = torch.tensor([0, 1, 2, 4, 1, 0])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = (kernels.cross_entropy(a, t, label_smoothing=smoothing),
                F.cross_entropy(b, t, label_smoothing=smoothing))
    assert "cross_entropy_rows_fused" in ran
    torch.testing.assert_close(got, ref)
    if smoothing == 0:
        got.backward()
        ref.backward()
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad)

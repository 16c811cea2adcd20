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
from test_losses import compare

import kernels
from kernels import _compile, _losses

SETTINGS = settings(max_examples=examples(8), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def always_compile(monkeypatch):
    monkeypatch.setattr(_losses, "_COMPILE_MIN_NUMEL", 1)
    monkeypatch.setenv(_compile.ENV_VAR, "1")
    yield
    assert not _compile._broken, _compile._broken  # it really ran compiled, never fell back


def _compiled_ran(name):
    return any(key[0] == name for key in _compile._compiled)


@SETTINGS
@given(n=st.integers(1, 300), reduction=st.sampled_from(["mean", "none"]), target_grad=st.booleans(),
       delta=st.sampled_from([0.1, 1.0]), scale=st.sampled_from([1.0, 50.0]))
def test_mse_huber_compiled(n, reduction, target_grad, delta, scale):
    x = (torch.randn(n, 3) * scale).requires_grad_()
    y = (torch.randn(n, 3) * scale).requires_grad_(target_grad)
    compare(lambda a, b: kernels.mse_loss(a, b, reduction), lambda a, b: F.mse_loss(a, b, reduction=reduction),
            [x, y], torch.float32, scale * scale)
    compare(lambda a, b: kernels.huber_loss(a, b, reduction, delta),
            lambda a, b: F.huber_loss(a, b, reduction=reduction, delta=delta), [x, y], torch.float32, scale)
    assert _compiled_ran("mse_fused") and _compiled_ran("huber_fused")


@SETTINGS
@given(n=st.integers(1, 300), margin=st.sampled_from([0.5, 1.0]), reduction=st.sampled_from(["mean", "sum"]))
def test_hinge_compiled(n, margin, reduction):
    x = torch.randn(n, requires_grad=True)
    y = (torch.randint(0, 2, (n,)) * 2 - 1).float()
    ref = torch.clamp(margin - y * x, min=0)
    compare(lambda a: kernels.hinge_loss(a, y, margin, reduction),
            lambda a: torch.clamp(margin - y * a, min=0).mean() if reduction == "mean"
            else torch.clamp(margin - y * a, min=0).sum(), [x], torch.float32)
    assert ref.numel() and _compiled_ran("hinge_fused")


@SETTINGS
@given(n=st.integers(0, 40), n_classes=st.integers(1, 50), use_weight=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.1, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignore=st.booleans(), scale=st.sampled_from([1.0, 100.0]))
def test_cross_entropy_compiled(n, n_classes, use_weight, smoothing, reduction, ignore, scale):
    x = (torch.randn(n, n_classes) * scale).requires_grad_()
    t = torch.randint(0, n_classes, (n,))
    if ignore and n:
        t[: max(1, n // 3)] = -100
    w = torch.rand(n_classes) + 0.1 if use_weight else None
    compare(lambda a: kernels.cross_entropy(a, t, w, reduction=reduction, label_smoothing=smoothing),
            lambda a: F.cross_entropy(a, t, w, reduction=reduction, label_smoothing=smoothing), [x],
            torch.float32, scale)
    if n:
        assert _compiled_ran("cross_entropy_rows_fused")


def test_cross_entropy_compiled_bf16_and_all_ignored():
    x = (torch.randn(64, 10) * 5).bfloat16().requires_grad_()
    t = torch.randint(0, 10, (64,))
    compare(lambda a: kernels.cross_entropy(a, t), lambda a: F.cross_entropy(a, t), [x], torch.bfloat16)
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.full((8,), -100)
    compare(lambda a: kernels.cross_entropy(a, t), lambda a: F.cross_entropy(a, t), [x], torch.float32)

"""kernels' losses against torch.nn.functional: values and gradients (random upstream gradient), bad input."""

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import LOSS_CASES, UNDER_MUTMUT, examples

from optadvisor import kernels

SETTINGS = settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def tol(dtype, scale=1.0):
    """Stated tolerances: float32 rtol 1e-5 (atol scaled to the inputs' magnitude), float64 1e-10,
    bfloat16 rtol 1.6e-2 (we compute in float32 and round once, torch rounds per op)."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * scale)
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=2e-2 * scale)
    return dict(rtol=1e-5, atol=1e-6 * scale)


def compare(ours_fn, ref_fn, inputs, dtype, scale=1.0, seed=0):
    """Values and gradients of every input that requires grad, with a random non-unit upstream grad."""
    ours_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in inputs]
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    ours, ref = ours_fn(*ours_in), ref_fn(*ref_in)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, equal_nan=True, **tol(dtype, scale))
    diff = [i for i, t in enumerate(ref_in) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not diff:
        return
    gen = torch.Generator().manual_seed(seed)
    up = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(ref.dtype)
    g_ours = torch.autograd.grad(ours, [ours_in[i] for i in diff], up)
    g_ref = torch.autograd.grad(ref, [ref_in[i] for i in diff], up)
    for i, a, b in zip(diff, g_ours, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"grad of input {i}: {m}",
                                   **tol(dtype, scale))


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@SETTINGS
@given(shape=shapes, dtype=DTYPES, reduction=REDUCTIONS, target_grad=st.booleans(), scale=st.sampled_from([1, 100]),
       delta=st.sampled_from([0.1, 1.0, 3.0]), which=st.sampled_from(["mse", "huber"]), nan=st.booleans())
def test_mse_and_huber(shape, dtype, reduction, target_grad, scale, delta, which, nan):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    y = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_(target_grad)
    if nan and x.numel():
        x.data.view(-1)[0] = float("nan")
    if which == "mse":
        compare(lambda a, b: kernels.mse_loss(a, b, reduction), lambda a, b: F.mse_loss(a, b, reduction=reduction),
                [x, y], dtype, scale * scale)
    else:
        compare(lambda a, b: kernels.huber_loss(a, b, reduction, delta),
                lambda a, b: F.huber_loss(a, b, reduction=reduction, delta=delta), [x, y], dtype, scale)


@st.composite
def ce_case(draw):
    n_classes = draw(st.integers(1, 7))
    layout = draw(st.sampled_from(["unbatched", "batched", "kdim"]))
    n = draw(st.integers(0, 6)) if layout != "unbatched" else None
    extra = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)) if layout == "kdim" else []
    shape = (n_classes,) if layout == "unbatched" else (n, n_classes, *extra)
    return shape


@SETTINGS
@given(shape=ce_case(), dtype=DTYPES, reduction=REDUCTIONS, use_weight=st.booleans(),
       smoothing=st.sampled_from([0.0, 0.0, 0.1, 0.7, 1.0]), ignore=st.booleans(), probs=st.booleans(),
       scale=st.sampled_from([1.0, 30.0]), data=st.data())
def test_cross_entropy(shape, dtype, reduction, use_weight, smoothing, ignore, probs, scale, data):
    cdim = 0 if len(shape) == 1 else 1
    n_classes = shape[cdim]
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.rand(n_classes, dtype=torch.float64) + 0.1).to(dtype) if use_weight else None
    sample_shape = tuple(s for i, s in enumerate(shape) if i != cdim)
    ref_dtype = dtype
    if probs:
        target = torch.softmax(torch.randn(shape, dtype=torch.float64), cdim).to(dtype)
        ignore_index = -100
        if dtype == torch.bfloat16:  # torch rounds per op in bf16 here; the reference is float32 rounded once
            ref_dtype = torch.float32
    else:
        target = torch.randint(0, n_classes, sample_shape)
        ignore_index = data.draw(st.sampled_from([-100, 0])) if ignore else -100
        if ignore and target.numel():
            target.view(-1)[0] = ignore_index if ignore_index >= 0 else -100
    def cast(t):
        return None if t is None else t.to(ref_dtype) if t.is_floating_point() else t
    compare(lambda a: kernels.cross_entropy(a, target, weight, ignore_index, reduction, smoothing),
            lambda a: F.cross_entropy(cast(a), cast(target), cast(weight), ignore_index=ignore_index,
                                      reduction=reduction, label_smoothing=smoothing).to(dtype), [x], dtype, scale)


@pytest.mark.parametrize("shape", [(30, 6), (10, 6, 3), (5, 6, 2, 3)])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_mean_divides_by_the_weights_of_counted_targets(shape, smoothing, dtype):
    """Eager path (2-D below the compile threshold and K-dim): with class weights and a third of the targets
    ignored, the mean's denominator (the counted targets' weights) differs from every count."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    t = torch.randint(0, 6, (shape[0], *shape[2:]), generator=gen)
    t.view(-1)[: t.numel() // 3] = -100
    w = torch.tensor([0.1, 10.0, 3.0, 0.5, 7.0, 1.0], dtype=dtype)
    counted = t[t != -100]
    denom = float(w[counted].sum())
    assert min(abs(denom - t.numel()), abs(denom - counted.numel())) > 5
    compare(lambda a: kernels.cross_entropy(a, t, w, label_smoothing=smoothing),
            lambda a: F.cross_entropy(a, t, w, label_smoothing=smoothing), [x], dtype)
    compare(lambda a: kernels.cross_entropy(a, t, label_smoothing=smoothing),  # no weights: the count of
            lambda a: F.cross_entropy(a, t, label_smoothing=smoothing), [x], dtype)  # counted targets


def test_cross_entropy_all_ignored_and_extreme_logits():
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.full((4,), -100)
    compare(lambda a: kernels.cross_entropy(a, t), lambda a: F.cross_entropy(a, t), [x], torch.float32)
    big = (torch.randn(6, 5) * 1e4).requires_grad_()
    t = torch.randint(0, 5, (6,))
    out = kernels.cross_entropy(big, t, label_smoothing=0.1)
    assert torch.isfinite(out)
    compare(lambda a: kernels.cross_entropy(a, t, label_smoothing=0.1),
            lambda a: F.cross_entropy(a, t, label_smoothing=0.1), [big], torch.float32, 1e4)
    for dtype in (torch.float16, torch.bfloat16):
        h = (torch.randn(6, 5) * 1e3).to(dtype).requires_grad_()
        assert torch.isfinite(kernels.cross_entropy(h, t))


@SETTINGS
@given(n=st.integers(0, 6), n_classes=st.integers(1, 6), p=st.sampled_from([1, 2]), margin=st.sampled_from([0.5, 1.0, 2.0]),
       use_weight=st.booleans(), reduction=REDUCTIONS, dtype=st.sampled_from([torch.float32, torch.float64]),
       unbatched=st.booleans())
def test_multi_margin(n, n_classes, p, margin, use_weight, reduction, dtype, unbatched):
    x = torch.randn((n_classes,) if unbatched else (n, n_classes), dtype=dtype, requires_grad=True)
    t = torch.randint(0, n_classes, () if unbatched else (n,))
    w = torch.rand(n_classes, dtype=dtype) + 0.1 if use_weight else None
    if n == 0 and not unbatched and reduction == "mean":
        # torch 2.13 returns uninitialized memory here (e.g. 7.7e31); the mean of nothing is NaN, as in mse_loss
        assert torch.isnan(kernels.multi_margin_loss(x, t, p, margin, w))
        return
    compare(lambda a: kernels.multi_margin_loss(a, t, p, margin, w, reduction),
            lambda a: F.multi_margin_loss(a, t, p, margin, w, reduction=reduction), [x], dtype)


def _hinge_ref(x, y, margin, reduction):
    loss = torch.clamp(margin - y * x, min=0)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


@SETTINGS
@given(shape=shapes, margin=st.sampled_from([0.5, 1.0, 2.0]), reduction=REDUCTIONS,
       dtype=st.sampled_from([torch.float32, torch.float64]), target_grad=st.booleans())
def test_hinge_against_its_formula(shape, margin, reduction, dtype, target_grad):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = (torch.randint(0, 2, shape) * 2 - 1).to(dtype).requires_grad_(target_grad)
    compare(lambda a, b: kernels.hinge_loss(a, b, margin, reduction), lambda a, b: _hinge_ref(a, b, margin, reduction),
            [x, y], dtype)


@settings(max_examples=examples(20), deadline=None)
@given(n=st.integers(0, 9), dim=st.integers(1, 5), vocab=st.integers(1, 13), use_bias=st.booleans(),
       chunk=st.sampled_from([None, 1, 3]), reduction=REDUCTIONS, smoothing=st.sampled_from([0.0, 0.2]),
       ignore=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_linear_cross_entropy(n, dim, vocab, use_bias, chunk, reduction, smoothing, ignore, dtype):
    h = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, dtype=dtype, requires_grad=True) if use_bias else None
    t = torch.randint(0, vocab, (n,))
    if ignore and n:
        t[0] = -100
    inputs = [h, w] + ([b] if use_bias else [])

    def ours(hh, ww, bb=None):
        return kernels.linear_cross_entropy(hh, ww, t, bb, reduction=reduction, label_smoothing=smoothing,
                                            chunk_size=chunk)

    def ref(hh, ww, bb=None):
        return F.cross_entropy(F.linear(hh, ww, bb), t, reduction=reduction, label_smoothing=smoothing)

    compare(ours, ref, inputs, dtype, scale=10.0)


@pytest.mark.parametrize("case", ["mse", "huber", "ce", "ce_probs", "mm", "hinge", "lce"])
def test_gradient_against_finite_differences_float64(case):
    d = torch.float64
    x = torch.randn(4, 5, dtype=d, requires_grad=True)
    y = torch.randn(4, 5, dtype=d, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    cw = torch.rand(5, dtype=d)
    fns = {
        "mse": (lambda a, b: kernels.mse_loss(a, b), (x, y)),
        "huber": (lambda a, b: kernels.huber_loss(a, b, delta=0.5), (x, y)),
        "ce": (lambda a: kernels.cross_entropy(a, t, weight=cw, label_smoothing=0.1), (x,)),
        "ce_probs": (lambda a: kernels.cross_entropy(a, torch.softmax(y.detach(), 1)), (x,)),
        "mm": (lambda a: kernels.multi_margin_loss(a, t, p=2), (x,)),
        "hinge": (lambda a: kernels.hinge_loss(a, torch.sign(y.detach()) + (y.detach() == 0)), (x,)),
        "lce": (lambda a, w: kernels.linear_cross_entropy(a, w, torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(0)),
                                                          chunk_size=2),
                (x, torch.randn(3, 5, dtype=d, requires_grad=True))),
    }
    fn, inputs = fns[case]
    # torch.autograd.gradcheck runs two backwards through one graph to check re-entrancy, which the
    # one-pass design refuses by construction (the buffer is handed to the first backward), so the same
    # check is done here directly: analytical gradient vs central finite differences, float64.
    analytical = torch.autograd.grad(fn(*inputs), inputs)
    eps = 1e-6
    for inp, ana in zip(inputs, analytical):
        numerical = torch.zeros_like(inp)
        flat = inp.detach().view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + eps
                hi = fn(*inputs).item()
                flat[i] = orig - eps
                lo = fn(*inputs).item()
                flat[i] = orig
            numerical.view(-1)[i] = (hi - lo) / (2 * eps)
        torch.testing.assert_close(ana, numerical, rtol=1e-5, atol=1e-6)


def test_second_backward_and_double_backward_are_refused_clearly():
    """Word for word: what is refused, why, and what to do instead."""
    x = torch.randn(3, 4, requires_grad=True)
    loss = kernels.cross_entropy(x, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    assert str(info.value) == (
        "kernels.cross_entropy: backward ran twice through the same graph (retain_graph=True). The one-pass "
        "loss hands its gradient buffer to the first backward; compute the loss again for a second backward.")
    loss = kernels.mse_loss(x, torch.zeros(3, 4))
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad(loss, x, create_graph=True)
    assert str(info.value) == (
        "kernels.mse_loss: double backward (create_graph=True: gradient penalties, MAML, Hessian-vector "
        "products) is not supported: the loss computes its gradient in the forward pass and keeps no input to "
        "differentiate it again, so the result would silently lack the loss's curvature. Use "
        "torch.nn.functional's loss where second derivatives are needed.")


@pytest.mark.parametrize("scale", [1.0, 2.0, -1.0, 0.5, 0.0])
def test_a_scaled_scalar_loss_scales_the_gradient(scale):
    """``(scale * loss).backward()``: the gradient computed in the forward pass is multiplied by the upstream
    scalar, whatever it is (1 skips the multiply; 2, 0 and -1 are exact scales a test with random ones misses)."""
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 1, 0])
    for ours, ref in ((kernels.cross_entropy, F.cross_entropy), (kernels.mse_loss, F.mse_loss)):
        y = t if ours is kernels.cross_entropy else torch.randn(5, 3, dtype=torch.float64)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (scale * ours(a, y)).backward()
        (scale * ref(b, y)).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


LOSS_CALLS = {case.functional.__name__: (lambda out, y, c=case: c.call(out, y, c.functional, **c.kwargs))
              for case in LOSS_CASES.values() if case.name != "LinearCrossEntropyLoss"}


def test_every_catalog_loss_has_a_case():
    """The loss test table is the catalog: a registered loss without a case would escape the generic tests."""
    assert list(LOSS_CASES) == [e.name for e in kernels.catalog.losses()]


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_module_and_functional_equal_the_reference(name):
    """Each catalog loss: its nn.Module (built from the catalog's class with the case's arguments) and its
    functional give torch's value and gradient on the same output."""
    case = LOSS_CASES[name]
    torch.manual_seed(3)
    out, y = torch.randn(9, 5), torch.randint(0, 5, (9,))
    a, b, r = (out.clone().requires_grad_() for _ in range(3))
    module = case.module(**case.kwargs)
    got_m = case.call(a, y, lambda *xs, **kw: module(*xs))
    got_f = case.call(b, y, case.functional, **case.kwargs)
    ref = case.reference(r, y)
    for got, x in ((got_m, a), (got_f, b)):
        torch.testing.assert_close(got, ref)
        got.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, r.grad)
    torch.testing.assert_close(b.grad, r.grad)


@pytest.mark.parametrize("name", [*LOSS_CALLS, "linear_cross_entropy"])
def test_double_backward_is_refused_every_time(name):
    """A gradient penalty (MAML, WGAN-GP style) through a loss: the first-order gradients are taken with
    create_graph=True and a penalty on them is backpropagated. This once ran without error and silently
    dropped the loss's curvature (0.37 off on gradients of 0.54); now it is refused at the first grad call,
    whether or not anything downstream requires grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    x, y = torch.randn(16, 4), torch.randint(0, 5, (16,))
    if name == "linear_cross_entropy":
        loss = kernels.linear_cross_entropy(model[:2](x), model[2].weight, y, model[2].bias)
    else:
        loss = LOSS_CALLS[name](model(x), y)
    with pytest.raises(RuntimeError, match=rf"kernels.{name}: double backward"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    leaf = torch.randn(3, 5, requires_grad=True)  # nothing downstream requires grad: refused too
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(kernels.cross_entropy(leaf, torch.tensor([0, 1, 2])), leaf, create_graph=True)


@pytest.mark.parametrize("name", list(LOSS_CALLS))
def test_torch_func_transforms_are_refused_by_name(name):
    out, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss = LOSS_CALLS[name]
    calls = [lambda: torch.func.grad(lambda o: loss(o, y))(out),
             lambda: torch.func.vmap(lambda o, t: loss(o.unsqueeze(0), t.unsqueeze(0)))(out, y),
             lambda: torch.func.jacrev(lambda o: loss(o, y))(out)]
    for call in calls:
        with pytest.raises(NotImplementedError) as info:
            call()
        assert str(info.value) == (
            f"kernels.{name} does not support torch.func transforms (grad, vmap, jacrev, jvp, ...): it is a "
            "torch.autograd.Function whose forward computes the gradient, with no vmap or jvp rule. Use "
            "torch.nn.functional's loss inside torch.func, and kernels' outside it.")
    assert torch.isfinite(loss(out, y))  # and outside a transform it works


def test_no_grad_and_modules():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(kernels.MSELoss()(x, y), F.mse_loss(x, y))
    t = torch.tensor([0, 1, 3])
    assert torch.allclose(kernels.CrossEntropyLoss(label_smoothing=0.1)(x, t), F.cross_entropy(x, t, label_smoothing=0.1))
    assert torch.allclose(kernels.HuberLoss(delta=0.5)(x, y), F.huber_loss(x, y, delta=0.5))
    assert torch.allclose(kernels.MultiMarginLoss(p=2)(x, t), F.multi_margin_loss(x, t, p=2))
    assert torch.allclose(kernels.HingeLoss()(x, torch.ones(3, 4)), torch.clamp(1 - x, min=0).mean())
    w = torch.randn(6, 4)
    assert torch.allclose(kernels.LinearCrossEntropyLoss()(x, w, t), F.cross_entropy(x @ w.T, t))
    assert torch.allclose(kernels.MSELoss(size_average=False)(x, y), F.mse_loss(x, y, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1000, 1 << 17])  # the eager path, and the compiled one (64k+ elements)
@pytest.mark.parametrize("which", ["mse", "huber"])
def test_low_precision_regression_losses_compute_in_float32(which, n, dtype):
    """bfloat16/float16 inputs: each element is computed in float32 and rounded once (torch rounds after each
    op, so it can differ from both by an ulp or more), and the reductions sum in float32."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=gen) * 3).to(dtype)
    y = torch.randn(n, generator=gen).to(dtype)
    d = x.float() - y.float()
    if which == "mse":
        per, fn = d * d, lambda r: kernels.mse_loss(x, y, reduction=r)
    else:
        c = d.clamp(-0.7, 0.7)
        per, fn = (d - 0.5 * c) * c, lambda r: kernels.huber_loss(x, y, reduction=r, delta=0.7)
    assert fn("none").dtype == dtype and torch.equal(fn("none"), per.to(dtype))  # (equal ignores dtypes)
    assert fn("sum").dtype == fn("mean").dtype == dtype
    torch.testing.assert_close(fn("sum"), per.sum().to(dtype), rtol=2 ** -7, atol=0)
    torch.testing.assert_close(fn("mean"), (per.sum() / n).to(dtype), rtol=2 ** -7, atol=0)


BAD = [
    (lambda: kernels.mse_loss(torch.randn(3), torch.randn(3), reduction="avg"), ValueError, "reduction"),
    (lambda: kernels.mse_loss(torch.randn(3, 1), torch.randn(3)), ValueError,
     r"^mse_loss: input shape \(3, 1\) and target shape \(3,\) differ; broadcasting them is almost always a bug"),
    (lambda: kernels.huber_loss(torch.randn(3), torch.randn(1)), ValueError,
     r"^huber_loss: input shape \(3,\) and target shape \(1,\) differ; broadcasting them is almost always a bug"),
    (lambda: kernels.huber_loss(torch.randn(3), torch.randn(3), delta=0), ValueError, "delta"),
    (lambda: kernels.huber_loss(torch.randn(3), torch.randn(3), delta=-1.0), ValueError, "delta"),
    (lambda: kernels.HuberLoss(delta=0.0), ValueError, r"^HuberLoss: 'delta' must be > 0 \(got 0\.0\)$"),
    (lambda: kernels.hinge_loss(torch.randn(3), torch.tensor([1.0, 0.0, -1.0])), ValueError, "-1 or \\+1"),
    (lambda: kernels.hinge_loss(torch.randn(3), torch.ones(3, 1)), ValueError, "shape"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, 4, 1])), IndexError, "target 4 is out of bounds"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, -2, 1])), IndexError, "out of bounds"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.rand(3, 5)), ValueError, "probability targets"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=torch.ones(5)), ValueError,
     "one entry per class"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=1.5), ValueError,
     "label_smoothing"),
    (lambda: kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1])), ValueError, "target of shape"),
    (lambda: kernels.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), p=3), ValueError, "'p'"),
    (lambda: kernels.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1, 9])), IndexError, "out of bounds"),
    (lambda: kernels.multi_margin_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=torch.ones(3)), ValueError,
     "weight"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([0, 1, 2])), ValueError,
     "same D"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 7])), IndexError,
     "out of bounds"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                          chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD)
def test_bad_input_gets_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_nan_logits_behave_as_in_torch():
    x = torch.randn(6, 5, requires_grad=True)
    with torch.no_grad():
        x[2, 3] = float("nan")
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    for kw in ({}, {"reduction": "none"}, {"label_smoothing": 0.2, "reduction": "sum"}):
        compare(lambda a: kernels.cross_entropy(a, t, **kw), lambda a: F.cross_entropy(a, t, **kw), [x], torch.float32)
    compare(lambda a: kernels.multi_margin_loss(a, t, reduction="none"),
            lambda a: F.multi_margin_loss(a, t, reduction="none"), [x], torch.float32)


@pytest.mark.parametrize("n,c", [(1024, 8000), (64, 50)])  # the compiled core and the eager path
def test_float16_loss_gradient_survives_loss_scaling(n, c):
    """GradScaler multiplies the loss by a scale in backward; the loss gradient must be scaled before it is
    rounded to float16. Rounded first, 61.6% of the nonzero entries at (1024, 8000) came back as 0."""
    torch.manual_seed(0)
    x = (torch.randn(n, c) * 3).half().requires_grad_()
    t = torch.randint(0, c, (n,))
    scale = 1024.0  # the loss is float16: a larger scale overflows it (GradScaler then halves its scale)
    (kernels.cross_entropy(x, t) * scale).backward()
    assert x.grad.dtype == torch.float16  # kept in float32 through the scale, then rounded (by autograd)
    ours = x.grad.float() / scale
    x16 = x.detach().clone().requires_grad_()
    (F.cross_entropy(x16, t) * scale).backward()  # torch's own float16 path under the same scale
    xr = x.detach().float().requires_grad_()
    F.cross_entropy(xr, t).backward()
    ref = xr.grad
    nonzero = ref != 0

    def lost(g):
        return ((g == 0) & nonzero).sum().item() / nonzero.sum().item()
    assert lost(ours) <= lost(x16.grad.float() / scale) + 2e-3, (lost(ours), lost(x16.grad.float() / scale))
    representable = ref.abs() * scale > 1e-4  # normal float16 once scaled
    torch.testing.assert_close(ours[representable], ref[representable], rtol=2e-3, atol=0)
    # the other losses keep their float16 gradients through the scale too
    y = torch.randn(n, c).half()
    for fn, fref in ((kernels.mse_loss, F.mse_loss), (kernels.huber_loss, F.huber_loss)):
        x.grad = None
        (fn(x, y) * scale).backward()
        assert x.grad.dtype == torch.float16
        xr.grad = None
        fref(xr, y.float()).backward()
        torch.testing.assert_close(x.grad.float() / scale, xr.grad, rtol=2e-3, atol=1e-7)


def test_float16_linear_cross_entropy_under_loss_scaling():
    torch.manual_seed(0)
    h = torch.randn(256, 64).half().requires_grad_()
    w = (torch.randn(3000, 64) * 0.3).half().requires_grad_()
    t = torch.randint(0, 3000, (256,))
    scale = 1024.0  # the loss is float16: a larger scale overflows it (GradScaler then halves its scale)
    (kernels.linear_cross_entropy(h, w, t, chunk_size=100) * scale).backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.cross_entropy(hr @ wr.T, t).backward()
    h16, w16 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (F.cross_entropy(h16 @ w16.T, t) * scale).backward()  # torch in float16, the same scale
    for ours, torch16, ref in ((h.grad, h16.grad, hr.grad), (w.grad, w16.grad, wr.grad)):
        ours, torch16 = ours.float() / scale, torch16.float() / scale
        nonzero = ref.abs() > 1e-7
        assert ((ours == 0) & nonzero).sum() <= ((torch16 == 0) & nonzero).sum()
        assert (ours - ref).abs().max() <= 2 * (torch16 - ref).abs().max() + 1e-8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_under_autocast_return_float32_as_torch(dtype):
    """Under torch.autocast torch runs its losses in float32 and returns float32; ours once returned the
    input's dtype (a summed cross-entropy of 19595.5 came back as 19584)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 10)
    ref_lin = torch.nn.Linear(32, 10)
    ref_lin.load_state_dict(lin.state_dict())
    x, t = torch.randn(8192, 32), torch.randint(0, 10, (8192,))
    y = torch.randn(8192, 10)
    cases = [
        (lambda o: kernels.cross_entropy(o, t, reduction="sum"), lambda o: F.cross_entropy(o, t, reduction="sum")),
        (lambda o: kernels.cross_entropy(o, t, label_smoothing=0.1), lambda o: F.cross_entropy(o, t, label_smoothing=0.1)),
        (lambda o: kernels.mse_loss(o, y), lambda o: F.mse_loss(o, y)),
        (lambda o: kernels.huber_loss(o, y), lambda o: F.huber_loss(o, y)),
        (lambda o: kernels.multi_margin_loss(o, t), lambda o: F.multi_margin_loss(o, t)),
    ]
    for ours_fn, ref_fn in cases:
        lin.zero_grad()
        ref_lin.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            ours = ours_fn(lin(x))
            ref = ref_fn(ref_lin(x))
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        ours.backward()
        ref.backward()
        for a, b in ((lin.weight.grad, ref_lin.weight.grad), (lin.bias.grad, ref_lin.bias.grad)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with torch.autocast("cpu", dtype=dtype):
        out = kernels.linear_cross_entropy(x.to(dtype), lin.weight, t)
    assert out.dtype == torch.float32


_I = torch.ones(3, 4, dtype=torch.long)
_X, _T = torch.randn(3, 4), torch.tensor([0, 1, 2])
# (call, exception, the whole message): each names the function or class and the argument at fault
WHOLE_MESSAGES = [
    (lambda: kernels.mse_loss([1.0], _X), TypeError, "mse_loss: 'input' must be a Tensor (got list)"),
    (lambda: kernels.mse_loss(_I, _X), TypeError, "mse_loss: 'input' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.mse_loss(_X, _I), TypeError, "mse_loss: 'target' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.huber_loss(_I, _X), TypeError,
     "huber_loss: 'input' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.cross_entropy(_I, _T), TypeError,
     "cross_entropy: 'input' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.cross_entropy(_X, [0, 1, 2]), TypeError, "cross_entropy: 'target' must be a Tensor (got list)"),
    (lambda: kernels.cross_entropy(_X, torch.tensor([0, 1])), ValueError,
     "cross_entropy: expected target of shape (3,) (got (2,))"),
    (lambda: kernels.cross_entropy(_X, _T, weight=torch.ones(4, dtype=torch.long)), TypeError,
     "cross_entropy: 'weight' must be a floating-point Tensor (got torch.int64)"),
    (lambda: kernels.cross_entropy(_X, _T, weight=[1.0] * 4), TypeError,
     "cross_entropy: 'weight' must be a floating-point Tensor (got list)"),
    (lambda: kernels.cross_entropy(_X, _T, weight=torch.ones(3)), ValueError,
     "cross_entropy: 'weight' must have one entry per class, 4 (got shape (3,))"),
    (lambda: kernels.cross_entropy(_X, torch.tensor([0, 4, 1])), IndexError,
     "cross_entropy: target 4 is out of bounds for 4 classes"),
    (lambda: kernels.cross_entropy(_X, torch.tensor([0, -2, 1])), IndexError,
     "cross_entropy: target -2 is out of bounds for 4 classes"),
    (lambda: kernels.cross_entropy(_X, torch.tensor([9, -2, 1])), IndexError,
     "cross_entropy: target -2 is out of bounds for 4 classes"),
    (lambda: kernels.multi_margin_loss(_I, _T), TypeError,
     "multi_margin_loss: 'input' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.multi_margin_loss("a", _T), TypeError, "multi_margin_loss: 'input' must be a Tensor (got str)"),
    (lambda: kernels.multi_margin_loss(torch.randn(2, 3, 4), _T), ValueError,
     "multi_margin_loss: input must be (C,) or (N, C) with C > 0 (got shape (2, 3, 4))"),
    (lambda: kernels.multi_margin_loss(torch.randn(3, 0), _T), ValueError,
     "multi_margin_loss: input must be (C,) or (N, C) with C > 0 (got shape (3, 0))"),
    (lambda: kernels.multi_margin_loss(_X, _T.float()), TypeError,
     "multi_margin_loss: class-index targets must be an integer tensor (got torch.float32)"),
    (lambda: kernels.multi_margin_loss(_X, torch.tensor([0, 1])), ValueError,
     "multi_margin_loss: expected target of shape (3,) (got (2,))"),
    (lambda: kernels.multi_margin_loss(torch.randn(4), torch.tensor([0])), ValueError,
     "multi_margin_loss: expected target of shape () (got (1,))"),
    (lambda: kernels.multi_margin_loss(_X, torch.tensor([0, 1, 4])), IndexError,
     "multi_margin_loss: target 4 is out of bounds for 4 classes"),
    (lambda: kernels.multi_margin_loss(_X, _T, weight=torch.ones(4, dtype=torch.long)), TypeError,
     "multi_margin_loss: 'weight' must be a floating-point Tensor (got torch.int64)"),
    (lambda: kernels.multi_margin_loss(_X, _T, weight=torch.ones(2)), ValueError,
     "multi_margin_loss: 'weight' must have one entry per class, 4 (got shape (2,))"),
    (lambda: kernels.multi_margin_loss(_X, _T, p=3), ValueError, "multi_margin_loss: 'p' must be 1 or 2 (got 3)"),
    (lambda: kernels.MultiMarginLoss(p=3), ValueError, "MultiMarginLoss: 'p' must be 1 or 2 (got 3)"),
    (lambda: kernels.hinge_loss(_I, _X), TypeError, "hinge_loss: 'input' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.hinge_loss(_X, _I), TypeError,
     "hinge_loss: 'target' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.hinge_loss(_X, torch.zeros(3, 4)), ValueError, "hinge_loss: targets must be -1 or +1; found 0.0"),
    (lambda: kernels.hinge_loss(_X, torch.ones(3, 1)), ValueError,
     "hinge_loss: input shape (3, 4) and target shape (3, 1) differ; broadcasting them is almost always a bug, "
     "so it is refused"),
    (lambda: kernels.hinge_loss(_X, torch.ones(3, 4), margin="1"), TypeError,
     "hinge_loss: 'margin' must be a number (got str)"),
    (lambda: kernels.multi_margin_loss(_X, _T, margin="1"), TypeError,
     "multi_margin_loss: 'margin' must be a number (got str)"),
    (lambda: kernels.multi_margin_loss(_X, _T, margin=None), TypeError,
     "multi_margin_loss: 'margin' must be a number (got NoneType)"),
    (lambda: kernels.multi_margin_loss(_X, _T, margin=torch.ones(1)), TypeError,
     "multi_margin_loss: 'margin' must be a number (got Tensor)"),
    (lambda: kernels.linear_cross_entropy(_I, torch.randn(5, 4), _T), TypeError,
     "linear_cross_entropy: 'hidden' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.linear_cross_entropy(_X, torch.ones(5, 4, dtype=torch.long), _T), TypeError,
     "linear_cross_entropy: 'weight' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4, 2), _T), ValueError,
     "linear_cross_entropy: need hidden (..., D) and weight (V, D) with the same D (got (3, 4) and (5, 4, 2))"),
    (lambda: kernels.linear_cross_entropy(torch.tensor(1.0), torch.randn(5, 1), torch.tensor(0)), ValueError,
     "linear_cross_entropy: need hidden (..., D) and weight (V, D) with the same D (got () and (5, 1))"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), _T, torch.ones(5, dtype=torch.long)), TypeError,
     "linear_cross_entropy: 'bias' must be a floating-point tensor (got torch.int64)"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), _T, torch.randn(4)), ValueError,
     "linear_cross_entropy: bias must have shape (5,) (got (4,))"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), torch.tensor([0, 1])), ValueError,
     "linear_cross_entropy: expected target of shape (3,) (got (2,))"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), torch.tensor([0, 1, 7])), IndexError,
     "linear_cross_entropy: target 7 is out of bounds for 5 classes"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), _T, chunk_size=True), ValueError,
     "linear_cross_entropy: 'chunk_size' must be a positive int (got True)"),
    (lambda: kernels.linear_cross_entropy(_X, torch.randn(5, 4), _T, label_smoothing=-0.1), ValueError,
     "linear_cross_entropy: 'label_smoothing' must be in [0, 1] (got -0.1)"),
    (lambda: kernels.LinearCrossEntropyLoss(chunk_size=0), ValueError,
     "LinearCrossEntropyLoss: 'chunk_size' must be a positive int (got 0)"),
    (lambda: kernels.LinearCrossEntropyLoss(label_smoothing=1.5), ValueError,
     "LinearCrossEntropyLoss: 'label_smoothing' must be in [0, 1] (got 1.5)"),
]

# a reduction torch does not know, refused by every function and module class under its own name
_REDUCTION_CALLS = {"mse_loss": (_X, _X), "huber_loss": (_X, _X), "cross_entropy": (_X, _T),
                    "multi_margin_loss": (_X, _T), "hinge_loss": (_X, torch.ones(3, 4)),
                    "linear_cross_entropy": (_X, torch.randn(5, 4), _T)}
WHOLE_MESSAGES += [(lambda f=f, a=a: getattr(kernels, f)(*a, reduction="avg"), ValueError,
                    f"{f}: 'reduction' must be one of ('mean', 'sum', 'none') (got 'avg')")
                   for f, a in _REDUCTION_CALLS.items()]
WHOLE_MESSAGES += [(lambda c=c: getattr(kernels, c)(reduction="avg"), ValueError,
                    f"{c}: 'reduction' must be one of ('mean', 'sum', 'none') (got 'avg')")
                   for c in ("MSELoss", "HuberLoss", "CrossEntropyLoss", "MultiMarginLoss", "HingeLoss",
                             "LinearCrossEntropyLoss")]


@pytest.mark.parametrize("call,exc,message", WHOLE_MESSAGES)
def test_bad_input_messages_name_the_function_and_the_argument(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def _module_cases():
    """(class name, constructor arguments, inputs, reference): one argument away from the defaults each, on
    inputs where that argument changes the loss."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 2
    y = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 1, 1])
    w = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    pm = torch.where(torch.rand(6, 4, generator=gen) > 0.5, 1.0, -1.0).double()
    h, lw = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    lb = torch.randn(4, generator=gen, dtype=torch.float64)
    cases = []
    for kw in (dict(reduction="sum"), dict(reduction="none"), dict(size_average=False), dict(reduce=False)):
        cases.append(("MSELoss", kw, (x, y), torch.nn.MSELoss(**kw)(x, y)))
    for kw in (dict(delta=0.5), dict(reduction="sum"), dict(reduction="none")):
        cases.append(("HuberLoss", kw, (x, y), torch.nn.HuberLoss(**kw)(x, y)))
    for kw in (dict(weight=w), dict(ignore_index=1), dict(reduction="sum"), dict(reduction="none"),
               dict(label_smoothing=0.2), dict(size_average=False), dict(reduce=False)):
        cases.append(("CrossEntropyLoss", kw, (x, t), torch.nn.CrossEntropyLoss(**kw)(x, t)))
    for kw in (dict(p=2), dict(margin=0.5), dict(weight=w), dict(reduction="sum"), dict(reduction="none"),
               dict(size_average=False), dict(reduce=False)):
        cases.append(("MultiMarginLoss", kw, (x, t), torch.nn.MultiMarginLoss(**kw)(x, t)))
    per = lambda m: torch.clamp(m - x * pm, min=0)  # noqa: E731
    for kw, ref in ((dict(margin=0.5), per(0.5).mean()), (dict(reduction="sum"), per(1.0).sum()),
                    (dict(reduction="none"), per(1.0))):
        cases.append(("HingeLoss", kw, (x, pm), ref))
    for kw in (dict(ignore_index=1), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2)):
        cases.append(("LinearCrossEntropyLoss", kw, (h, lw, t, lb), F.cross_entropy(h @ lw.T + lb, t, **kw)))
    cases.append(("LinearCrossEntropyLoss", {}, (h, lw, t, lb), F.cross_entropy(h @ lw.T + lb, t)))
    return cases


# the cases are computed in the test, not at collection: torch work at collection starts its thread pool in
# the collecting process, and mutmut forks its test processes from one that collected (they then hang)
_MODULE_CASE_IDS = ["MSELoss-reduction-sum", "MSELoss-reduction-none", "MSELoss-size_average", "MSELoss-reduce",
                    "HuberLoss-delta", "HuberLoss-reduction-sum", "HuberLoss-reduction-none",
                    "CrossEntropyLoss-weight", "CrossEntropyLoss-ignore_index", "CrossEntropyLoss-reduction-sum",
                    "CrossEntropyLoss-reduction-none", "CrossEntropyLoss-label_smoothing",
                    "CrossEntropyLoss-size_average", "CrossEntropyLoss-reduce", "MultiMarginLoss-p",
                    "MultiMarginLoss-margin", "MultiMarginLoss-weight", "MultiMarginLoss-reduction-sum",
                    "MultiMarginLoss-reduction-none", "MultiMarginLoss-size_average", "MultiMarginLoss-reduce",
                    "HingeLoss-margin", "HingeLoss-reduction-sum", "HingeLoss-reduction-none",
                    "LinearCrossEntropyLoss-ignore_index", "LinearCrossEntropyLoss-reduction-sum",
                    "LinearCrossEntropyLoss-reduction-none", "LinearCrossEntropyLoss-label_smoothing",
                    "LinearCrossEntropyLoss-bias"]


def _case_id(case):
    name, kwargs = case[0], case[1]
    if not kwargs:
        return f"{name}-bias"
    (key, value), = kwargs.items()
    return f"{name}-{key}-{value}" if key == "reduction" else f"{name}-{key}"


def test_module_case_ids_are_the_cases():
    assert [_case_id(c) for c in _module_cases()] == _MODULE_CASE_IDS
    assert list(_low_precision_cases()) == _LOW_PRECISION_NAMES


@pytest.mark.parametrize("case_id", _MODULE_CASE_IDS)
def test_each_module_argument_reaches_the_loss(case_id):
    """A loss module computes with every argument it was built with (and LinearCrossEntropyLoss with the
    bias it is called with): its value equals torch's (or the formula's) with that argument, which differs
    on these inputs from the value without it."""
    name, kwargs, inputs, ref = next(c for c in _module_cases() if _case_id(c) == case_id)
    cls = getattr(kernels, name)
    got = cls(**kwargs)(*inputs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    without = cls()(*inputs) if kwargs else cls()(*inputs[:3])
    assert without.shape != ref.shape or not torch.allclose(without, ref), "the argument changes nothing here"


def test_linear_cross_entropy_module_passes_every_option(monkeypatch):
    """chunk_size changes how the rows are split, not the value: the module is seen handing every option
    (and the bias) to the function."""
    import optadvisor.kernels.losses.linear_cross_entropy as lce_module
    seen = []
    real = lce_module.linear_cross_entropy
    monkeypatch.setattr(lce_module, "linear_cross_entropy",
                        lambda *args, **kw: seen.append((args, kw)) or real(*args, **kw))
    h, w, t, b = torch.randn(5, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 3, 1]), torch.randn(4)
    options = dict(ignore_index=1, reduction="sum", label_smoothing=0.25, chunk_size=2)
    kernels.LinearCrossEntropyLoss(**options)(h, w, t, b)
    (args, kw), = seen
    assert args[3] is b and kw == options


def _low_precision_cases():
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 5, (7,), generator=gen)
    w = torch.rand(5, generator=gen) + 0.3
    pm = torch.where(torch.rand(7, 5, generator=gen) > 0.5, 1.0, -1.0)
    y = torch.randn(7, 5, generator=gen)
    probs = torch.softmax(torch.randn(7, 5, generator=gen), 1)
    # each: (x, the other tensors already in the input's dtype or float32, reduction) -> loss
    return {
        "mse": lambda x, c, r: kernels.mse_loss(x, c(y), reduction=r),
        "huber": lambda x, c, r: kernels.huber_loss(x, c(y), reduction=r, delta=0.7),
        "cross_entropy": lambda x, c, r: kernels.cross_entropy(x, t, weight=c(w), reduction=r, label_smoothing=0.1),
        "cross_entropy_probs": lambda x, c, r: kernels.cross_entropy(x, c(probs), reduction=r),
        "multi_margin_p1_weight": lambda x, c, r: kernels.multi_margin_loss(x, t, weight=c(w), reduction=r),
        "multi_margin_p2": lambda x, c, r: kernels.multi_margin_loss(x, t, p=2, margin=0.3, reduction=r),
        "multi_margin_unbatched": lambda x, c, r: kernels.multi_margin_loss(x[2], t[2], p=2, reduction=r),
        "hinge": lambda x, c, r: kernels.hinge_loss(x, c(pm), margin=0.3, reduction=r),
    }


_LOW_PRECISION_NAMES = ["mse", "huber", "cross_entropy", "cross_entropy_probs", "multi_margin_p1_weight",
                        "multi_margin_p2", "multi_margin_unbatched", "hinge"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", _LOW_PRECISION_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_losses_are_the_float32_loss_rounded_once(dtype, name, reduction):
    """bfloat16/float16 inputs are computed in float32: the value and the gradient are, bit for bit, the
    float32 computation on the same (rounded) numbers, rounded once to the input's dtype. The upstream
    gradient is made of powers of two, so multiplying by it rounds nothing (a bfloat16 gradient is kept in
    bfloat16 until backward scales it); per-row upstream values check which row each one scales."""
    fn = _low_precision_cases()[name]
    x32 = torch.randn(7, 5, generator=torch.Generator().manual_seed(2)) * 3
    low = x32.to(dtype).requires_grad_()
    high = x32.to(dtype).float().requires_grad_()
    got = fn(low, lambda u: u.to(dtype), reduction)
    ref = fn(high, lambda u: u.to(dtype).float(), reduction)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got, ref.to(dtype)), (got, ref)
    up = 2.0 ** torch.randint(-1, 3, ref.shape, generator=torch.Generator().manual_seed(3)).float()
    g_low, = torch.autograd.grad(got, low, up.to(dtype))
    g_ref, = torch.autograd.grad(ref, high, up)
    assert g_low.dtype == dtype and torch.equal(g_low, g_ref.to(dtype)), (g_low, g_ref)
    if reduction == "none":
        return
    # Where the gradient waits for backward: bfloat16 keeps it in bfloat16 (half the memory; its range is
    # float32's), float16 in float32 (its range is too small for an unscaled gradient). A scalar upstream
    # gradient that is not a power of two shows it: bfloat16 rounds the gradient, then the product.
    got, ref = fn(low, lambda u: u.to(dtype), reduction), fn(high, lambda u: u.to(dtype).float(), reduction)
    s = torch.tensor(1.0703125, dtype=dtype)  # exact in both; the hinge's one gradient value, 1/35, shows it too
    g_low, = torch.autograd.grad(got, low, s)
    g_unit, = torch.autograd.grad(ref, high)
    kept = g_unit.to(dtype).float() if dtype == torch.bfloat16 else g_unit
    assert torch.equal(g_low, (kept * s.float()).to(dtype))


def test_margins_torch_accepts_are_accepted():
    """torch's multi_margin_loss takes any number (a bool, an int) or a 0-dim tensor as the margin."""
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])
    for margin in (True, 2, 0.25, torch.tensor(0.5)):
        torch.testing.assert_close(kernels.multi_margin_loss(x, t, margin=margin),
                                   F.multi_margin_loss(x, t, margin=margin), rtol=1e-12, atol=1e-12)
    pm = torch.where(x > 0, 1.0, -1.0).double()
    torch.testing.assert_close(kernels.hinge_loss(x, pm, margin=torch.tensor(0.5)),
                               torch.clamp(0.5 - x * pm, min=0).mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)], ids=["unbatched", "3-d"])
def test_linear_cross_entropy_hidden_of_any_rank(shape):
    """hidden (D,) with a 0-dim target, and (B, T, D) with a (B, T) target: cross-entropy of the logits."""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, shape[:-1], generator=gen)
    compare(lambda a, b: kernels.linear_cross_entropy(a, b, t, chunk_size=2),
            lambda a, b: F.cross_entropy((a @ b.T).reshape(-1, 5), t.reshape(-1)), [h, w], torch.float64)


def test_linear_cross_entropy_refuses_torch_func_by_name():
    w, t = torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(NotImplementedError, match=r"^kernels.linear_cross_entropy does not support torch.func"):
        torch.func.grad(lambda h: kernels.linear_cross_entropy(h, w, t))(torch.randn(3, 4))


def test_hinge_gradient_at_the_kink_is_zero():
    """Where margin - y x is exactly 0 the hinge is not differentiable: its gradient there is 0 (only a
    positive margin violation counts), as in torch's multi-margin loss, not the 1 torch.clamp's gives."""
    x = torch.tensor([1.0, 0.5, -1.0, -2.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0, -1.0], requires_grad=True)
    kernels.hinge_loss(x, y, reduction="sum").backward()
    assert x.grad.tolist() == [0.0, -1.0, -1.0, 0.0] and y.grad.tolist() == [0.0, -0.5, 1.0, 0.0]
    mm = torch.tensor([[1.0, 0.0]], requires_grad=True)
    F.multi_margin_loss(mm, torch.tensor([0]), reduction="sum").backward()
    assert mm.grad.tolist() == [[0.0, 0.0]]  # torch's convention for the multi-class hinge


@pytest.mark.parametrize("name", ["mse", "huber", "hinge"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_target_gradient_is_the_float32_one_rounded(dtype, name):
    """The gradient for a target that requires grad: float32 arithmetic, kept as the input's one is."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 5, generator=gen) * 3).to(dtype)
    y = (torch.where(torch.rand(6, 5, generator=gen) > 0.5, 1.0, -1.0) if name == "hinge"
         else torch.randn(6, 5, generator=gen)).to(dtype)
    fn = {"mse": kernels.mse_loss, "huber": lambda a, b: kernels.huber_loss(a, b, delta=0.7),
          "hinge": lambda a, b: kernels.hinge_loss(a, b, margin=0.3)}[name]
    y_low, y_high = y.clone().requires_grad_(), y.float().requires_grad_()
    s = torch.tensor(1.0703125, dtype=dtype)
    g_low, = torch.autograd.grad(fn(x, y_low), y_low, s)
    g_unit, = torch.autograd.grad(fn(x.float(), y_high), y_high)
    kept = g_unit.to(dtype).float() if dtype == torch.bfloat16 else g_unit
    assert g_low.dtype == dtype and torch.equal(g_low, (kept * s.float()).to(dtype))


def test_linear_cross_entropy_default_chunk_holds_about_8m_logits():
    from optadvisor.kernels.losses.linear_cross_entropy import default_chunk_rows
    assert [default_chunk_rows(v) for v in (0, 1, 2, 32000, 128256, 1 << 23, 1 << 24)] == \
        [1 << 23, 1 << 23, 1 << 22, 262, 65, 1, 1]


def test_linear_cross_entropy_label_smoothing_bounds_are_torchs():
    """0 and 1 are accepted (torch's cross_entropy takes the closed interval), beyond them refused."""
    h, w, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 4, 2])
    for smoothing in (0.0, 1.0, 1):
        torch.testing.assert_close(kernels.linear_cross_entropy(h, w, t, label_smoothing=smoothing),
                                   F.cross_entropy(h @ w.T, t, label_smoothing=smoothing), rtol=1e-12, atol=1e-12)
        kernels.LinearCrossEntropyLoss(label_smoothing=smoothing)
    for smoothing in (1.0000001, -1e-9, "0.1", None, True):
        with pytest.raises(ValueError, match=r"^linear_cross_entropy: 'label_smoothing' must be in \[0, 1\]"):
            kernels.linear_cross_entropy(h, w, t, label_smoothing=smoothing)
        with pytest.raises(ValueError, match=r"^LinearCrossEntropyLoss: 'label_smoothing' must be in \[0, 1\]"):
            kernels.LinearCrossEntropyLoss(label_smoothing=smoothing)


def test_cross_entropy_label_smoothing_takes_what_torchs_takes():
    """torch's cross_entropy takes a bool (True smooths fully) and the closed interval [0, 1]; ours the same,
    and refuses what torch refuses with the function's name (linear_cross_entropy, our own, refuses bools)."""
    x, t = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 4, 2])
    for smoothing in (True, False, 0, 1, 0.0, 1.0, 0.3):
        torch.testing.assert_close(kernels.cross_entropy(x, t, label_smoothing=smoothing),
                                   F.cross_entropy(x, t, label_smoothing=smoothing), rtol=1e-12, atol=1e-12)
    for smoothing in (1.0000001, -1e-9, "0.1", None):
        with pytest.raises(ValueError, match=r"^cross_entropy: 'label_smoothing' must be in \[0, 1\] \(got "):
            kernels.cross_entropy(x, t, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_low_precision_against_torch(dtype, reduction):
    """bfloat16/float16 hidden, weight and bias of a (2, 3, D) batch: the loss and every gradient in the
    input's dtype, near torch's in that dtype (float16 takes the deferred path, bfloat16 the one-pass one)."""
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(2, 3, 8, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(11, 8, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(11, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, 11, (2, 3), generator=gen)
    t[0, 1] = -100
    got = kernels.linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_size=4)
    hr, wr, br = (x.detach().clone().requires_grad_() for x in (h, w, b))
    ref = F.cross_entropy(F.linear(hr, wr, br).reshape(6, 11), t.reshape(6), reduction=reduction)
    ref = ref.reshape(2, 3) if reduction == "none" else ref
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    close = dict(rtol=1.6e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, ref, **close)
    up = (torch.rand(ref.shape, generator=gen) + 0.5).to(dtype)
    for a, r in zip(torch.autograd.grad(got, (h, w, b), up), torch.autograd.grad(ref, (hr, wr, br), up)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, r, **close)


@pytest.mark.parametrize("dtype,reduction,deferred", [(torch.float32, "mean", False), (torch.float32, "sum", False),
                                                      (torch.float32, "none", True), (torch.float16, "mean", True),
                                                      (torch.float64, "mean", False)])
def test_linear_cross_entropy_passes_over_the_logits(monkeypatch, dtype, reduction, deferred):
    """One pass over the logits computes the loss and the gradients; only float16 (the gradient must be
    scaled by the upstream one before it is rounded) and reduction='none' defer the gradient to a second
    pass in backward. Without grad: one pass, no gradient."""
    import optadvisor.kernels.losses.linear_cross_entropy as lce_module
    flags = []
    real = lce_module._ce_index_core
    monkeypatch.setattr(lce_module, "_ce_index_core", lambda *a: flags.append(a[-1]) or real(*a))
    h = torch.randn(5, 3).to(dtype).requires_grad_()
    w, t = torch.randn(4, 3).to(dtype), torch.tensor([0, 1, 2, 3, 1])
    loss = kernels.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=2)
    assert flags == ([False] * 3 if deferred else [True] * 3)
    loss.sum().backward()
    assert flags == ([False] * 3 + [True] * 3 if deferred else [True] * 3)
    flags.clear()
    with torch.no_grad():
        kernels.linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=2)
    assert flags == [False] * 3


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_with_masked_logits_is_torchs(reduction, smoothing, weighted):
    """Logits masked with -inf (a class not allowed for a row, as in constrained decoding): without label
    smoothing the loss and gradient stay finite, as torch's; with it, infinite as torch's."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    x[:, 3] = float("-inf")
    x[1, 0] = float("-inf")
    t = torch.tensor([0, 1, 2, 4])
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = kernels.cross_entropy(a, t, weight=w, label_smoothing=smoothing, reduction=reduction)
    ref = F.cross_entropy(b, t, weight=w, label_smoothing=smoothing, reduction=reduction)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if smoothing == 0:
        assert torch.isfinite(got).all()
        up = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
        torch.testing.assert_close(torch.autograd.grad(got, a, up)[0], torch.autograd.grad(ref, b, up)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,probs", [((3, 0), True), ((3, 0), False), ((0, 0), True), ((2, 0, 3), True)])
def test_cross_entropy_with_no_classes_is_torchs(shape, probs, reduction, dtype):
    """An input with zero classes (probability targets, or only ignored class indices): torch's zeros per
    sample and its 0/0 mean, with an empty gradient, in the input's dtype; it once failed inside amax."""
    x = torch.randn(shape, dtype=dtype)
    t = torch.rand(shape, dtype=dtype) if probs else torch.full(shape[:1] + shape[2:], -100)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = kernels.cross_entropy(a, t, reduction=reduction), F.cross_entropy(b, t, reduction=reduction)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, equal_nan=True)
    g, = torch.autograd.grad(got.sum(), a)
    assert g.shape == a.shape


def test_cross_entropy_refusals_word_for_word():
    with pytest.raises(ValueError) as info:
        kernels.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    assert str(info.value) == "cross_entropy: input must have a class dimension (got a 0-dim tensor)"
    with pytest.raises(NotImplementedError) as info:
        kernels.cross_entropy(torch.randn(3, 4), torch.rand(3, 4, requires_grad=True))
    assert str(info.value) == ("cross_entropy: gradients with respect to probability targets are not supported; "
                               "pass target.detach()")
    with pytest.raises(ValueError) as info:
        kernels.cross_entropy(torch.randn(3, 4), torch.rand(3, 5))
    assert str(info.value) == "cross_entropy: probability targets must have the input's shape (3, 4) (got (3, 5))"
    with pytest.raises(ValueError) as info:
        kernels.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=-0.5)
    assert str(info.value) == "cross_entropy: 'label_smoothing' must be in [0, 1] (got -0.5)"


def test_which_inputs_take_the_compiled_cores(monkeypatch):
    """Below 64k elements every loss computes eagerly (a first-call compile costs seconds); from 64k the
    2-D cross-entropy, MSE, Huber and hinge take their compiled cores; an N-d cross-entropy stays eager."""
    from optadvisor.kernels._runtime import compile as _compile
    from optadvisor.kernels.losses import base as _loss_base
    monkeypatch.setenv(_compile.ENV_VAR, "1")
    calls = []
    monkeypatch.setattr(_loss_base, "run_fused", lambda fn, *a, **k: calls.append(fn.__name__) or (False, None))
    small, big = torch.randn(100, 10), torch.randn(4096, 16)
    for x in (small, big):
        calls.clear()
        kernels.cross_entropy(x, torch.randint(0, x.shape[1], (x.shape[0],)))
        kernels.mse_loss(x, x.flip(0))
        kernels.huber_loss(x, x.flip(0))
        kernels.hinge_loss(x, torch.ones_like(x))
        kernels.multi_margin_loss(x, torch.zeros(x.shape[0], dtype=torch.long))
        assert calls == ([] if x is small else ["cross_entropy_rows_fused", "mse_fused", "huber_fused", "hinge_fused"])
    calls.clear()
    x3, t3 = torch.randn(64, 16, 64, dtype=torch.float64), torch.randint(0, 16, (64, 64))
    got = kernels.cross_entropy(x3, t3, label_smoothing=0.1)
    assert calls == []
    torch.testing.assert_close(got, F.cross_entropy(x3, t3, label_smoothing=0.1), rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_chunk_of_one_row_and_more_rows_than_exist():
    h, w, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])
    ref = F.cross_entropy(h @ w.T, t)
    for chunk in (1, 2, 5, 6, 1000):
        torch.testing.assert_close(kernels.linear_cross_entropy(h, w, t, chunk_size=chunk), ref, rtol=1e-12, atol=1e-12)
        assert kernels.LinearCrossEntropyLoss(chunk_size=chunk).chunk_size == chunk


@pytest.mark.parametrize("cls", [kernels.MSELoss, kernels.CrossEntropyLoss, kernels.MultiMarginLoss],
                         ids=lambda c: c.__name__)
def test_deprecated_reduction_arguments_warn_at_the_users_line(cls):
    """``size_average``/``reduce`` warn as torch.nn does (a UserWarning, torch's words), pointing at the line
    that built the module, not at ours."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        cls(size_average=False)
    assert len(caught) == 1
    w = caught[0]
    assert w.category is UserWarning
    assert str(w.message) == ("size_average and reduce args will be deprecated, please use reduction='sum' "
                              "instead.")
    if not UNDER_MUTMUT:
        assert (w.filename, w.lineno) == (__file__, line)

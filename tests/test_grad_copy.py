"""Separate gradients (after torch's default zero_grad()) copied into the gradient buffer by the C kernel's
``gather_copy``: the same bits as torch's copy, taken for plain gradients, and torch's copy wherever a
gradient is not a contiguous CPU tensor of the buffer's dtype outside the buffer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_same, examples, with_threshold

from optadvisor import kernels
from optadvisor.kernels._runtime import grads as _grads, native as _native

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C compiler: the copy is torch's")


@pytest.fixture
def native_calls(monkeypatch):
    """What each step's gradient copy did: True (the C kernel copied), False (torch's copy did). The tests'
    buckets are small: the C copy is asked for from one parameter on (32 by default)."""
    monkeypatch.setattr(_grads, "NATIVE_COPY_MIN_PARAMS", 1)
    calls = []
    real = _grads._native_copy

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]
    monkeypatch.setattr(_grads, "_native_copy", spy)
    return calls


def _twins(cls, shapes, dtype, direct=None, **kw):
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ours_p = [torch.nn.Parameter(v.clone()) for v in values]
    ref_p = [torch.nn.Parameter(v.clone()) for v in values]
    ours = with_threshold(cls, direct)(ours_p, fused=False, **kw)
    ref = getattr(torch.optim, cls.__name__)(ref_p, foreach=False, **kw)
    return ours, ref, ours_p, ref_p


def _grad(shape, dtype, gen, kind):
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "strided":  # the same values, every other element of a wider tensor
        wide = torch.zeros((*shape, 2), dtype=dtype)
        wide[..., 0] = g
        g = wide[..., 0]
    return g


GRAD_KINDS = ["plain", "strided", "none"]


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.lists(st.integers(0, 6), max_size=3).map(tuple), min_size=1, max_size=7),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       name=st.sampled_from(["Adam", "SGD", "RMSprop"]), direct=st.sampled_from([None, 8]),
       kinds=st.lists(st.lists(st.sampled_from(GRAD_KINDS), min_size=7, max_size=7), min_size=1, max_size=4))
def test_gradients_copied_as_torch_would(shapes, dtype, name, direct, kinds):
    """Each step, each parameter's gradient is a plain tensor, a strided view or missing (``direct``: the
    gradients of 8+ elements read where they lie, the rest copied, by index); the result equals torch's
    for-loop optimizer bit for bit (float32/float64; bf16/fp16 within torch's tolerances), and the C copy is
    taken exactly when every gradient copied is a contiguous tensor."""
    kw = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": {}, "RMSprop": dict(momentum=0.5)}[name]
    ours, ref, op, rp = _twins(getattr(kernels, name), shapes, dtype, direct, **kw)
    gen = torch.Generator().manual_seed(1)
    real, min_params = _grads._native_copy, _grads.NATIVE_COPY_MIN_PARAMS
    calls = []
    _grads._native_copy = lambda *a: calls.append(real(*a)) or calls[-1]
    _grads.NATIVE_COPY_MIN_PARAMS = 1  # these buckets are small: the C copy from one parameter on
    try:
        for row in kinds:
            copied_plain = []
            for p, q, kind in zip(op, rp, row):
                g = None if kind == "none" else _grad(p.shape, dtype, gen, kind)
                p.grad, q.grad = g, None if g is None else g.clone()
                if g is not None and not (direct is not None and g.numel() >= direct and g.is_contiguous()):
                    copied_plain.append(g.is_contiguous())
            calls.clear()
            ours.step()
            ref.step()
            if copied_plain and not all(p.grad is None for p in op):
                assert calls == [all(copied_plain)]
    finally:
        _grads._native_copy, _grads.NATIVE_COPY_MIN_PARAMS = real, min_params
    assert_same(ref, ours, rp, op, dtype, exact=dtype in (torch.float32, torch.float64))


def test_plain_gradients_take_the_c_copy_and_equal_torchs(native_calls):
    ours, ref, op, rp = _twins(kernels.Adam, [(40, 25)] * 50 + [(7,), ()], torch.float32)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(op, rp):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert native_calls == [True, True, True]
    assert_same(ref, ours, rp, op, torch.float32, exact=True)


def test_disabled_native_code_copies_with_torch(monkeypatch, native_calls):
    monkeypatch.setenv("OPTADVISOR_NATIVE", "0")
    ours, ref, op, rp = _twins(kernels.SGD, [(3, 4), (5,)], torch.float32, lr=0.1, momentum=0.9)
    for _ in range(2):
        for p, q in zip(op, rp):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert native_calls == [False, False]
    assert_same(ref, ours, rp, op, torch.float32, exact=True)


def test_gradients_that_view_the_buffer_are_copied_by_torch(native_calls):
    """After zero_grad(set_to_none=False) the gradients are the buffer's views; a gradient reassigned to
    another view of the same memory (here parameter 1's) must not reach memcpy (overlap): torch copies it."""
    ours, ref, op, rp = _twins(kernels.Adam, [(4, 3), (4, 3), (6,)], torch.float32)
    for p in op:
        p.grad = torch.zeros(p.shape)
    ours.zero_grad(set_to_none=False)
    for p, q in zip(op, rp):
        p.grad.copy_(torch.randn(p.shape))
        q.grad = p.grad.clone()
    op[0].grad = op[1].grad.view(4, 3)  # a new tensor object over parameter 1's gradient
    rp[0].grad = rp[1].grad.clone()
    ours.step()
    ref.step()
    assert native_calls == [False]
    assert_same(ref, ours, rp, op, torch.float32, exact=True)


def test_gradients_of_another_dtype_are_cast_by_torchs_copy(native_calls):
    """A parameter's ``grad_dtype`` may differ from its dtype; such a gradient is cast (torch's copy), never
    memcpy'd: the step equals the one with the gradient cast to float32 first."""
    ours, ref, op, rp = _twins(kernels.Adam, [(5, 2), (3,)], torch.float32)
    op[0].grad_dtype = torch.float64
    for _ in range(2):
        grads = [torch.randn(p.shape, dtype=torch.float64) for p in op]
        op[0].grad, op[1].grad = grads[0], grads[1].float()
        rp[0].grad, rp[1].grad = grads[0].float(), grads[1].float()
        ours.step()
        ref.step()
    assert native_calls == [False, False]
    assert_same(ref, ours, rp, op, torch.float32, exact=True)


def test_empty_and_zero_dim_gradients(native_calls):
    ours, ref, op, rp = _twins(kernels.Adam, [(0,), (), (3, 0), (2,)], torch.float32)
    for p, q in zip(op, rp):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    ours.step()
    ref.step()
    assert native_calls == [True]
    assert_same(ref, ours, rp, op, torch.float32, exact=True)


def test_the_copy_plan_is_made_once_per_bucket(monkeypatch, native_calls):
    """The plan (the library, byte offsets and sizes) is made at the first step and kept: looking the library
    up (a compiler search) every step would cost more than the copy saves."""
    looked_up = []
    real = _native.available  # what a step asks (it never builds in the caller's thread)
    monkeypatch.setattr(_native, "available", lambda: looked_up.append(1) or real())
    ours, _, op, _ = _twins(kernels.SGD, [(3, 4), (5,)], torch.float32, lr=0.1)
    for _ in range(3):
        for p in op:
            p.grad = torch.randn(p.shape)
        ours.step()
    assert len(looked_up) == 1


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_gradients_with_the_conjugate_bit_are_resolved(dtype, native_calls):
    """A complex gradient may be a lazy conjugate (``g.conj()``: the bit says "conjugate on read", the memory
    is not): complex buffers never take the byte copy, and torch's copy resolves the bit."""
    ours, ref, op, rp = _twins(kernels.Adam, [(3, 2), (4,)], dtype, lr=0.1)
    for _ in range(2):
        for p, q in zip(op, rp):
            g = torch.randn(p.shape, dtype=dtype)
            p.grad, q.grad = g.conj(), g.conj().resolve_conj()
            assert p.grad.is_conj()
        ours.step()
        ref.step()
    assert native_calls == [False, False]
    assert_same(ref, ours, rp, op, torch.float64 if dtype == torch.complex128 else dtype, exact=True)


@pytest.mark.parametrize("name, kw", [("Adam", {}), ("Adam8bit", {}), ("SGD8bit", {"momentum": 0.9}),
                                      ("RMSprop8bit", {}), ("AdamW", {"kahan_sum": True}),
                                      ("SGD", {"momentum": 0.9, "state_dtype": torch.bfloat16})])
@pytest.mark.parametrize("fused", [False, True])
def test_a_large_gradient_of_another_dtype_is_cast_never_read_as_the_parameters(name, kw, fused):
    """A bfloat16 parameter of 70,000 elements (its gradient read in place when of its dtype) keeping a
    float32 gradient (``grad_dtype``: fp32 accumulation): the step equals the one given the gradient cast to
    bfloat16 first, as a small parameter's is, and is finite (float32 bytes read as bfloat16 left 140
    non-finite elements)."""
    cls = getattr(kernels, name)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(70_000, generator=gen).to(torch.bfloat16)
    ours, twin = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours.grad_dtype = torch.float32
    opt_ours, opt_twin = cls([ours], lr=1e-2, fused=fused, **kw), cls([twin], lr=1e-2, fused=fused, **kw)
    for _ in range(3):
        g = torch.randn(70_000, generator=gen)
        ours.grad = g
        twin.grad = g.to(torch.bfloat16)
        opt_ours.step()
        opt_twin.step()
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, twin)



def test_a_small_bucket_never_asks_for_the_c_library(monkeypatch):
    """Fewer than NATIVE_COPY_MIN_PARAMS parameters: torch's multi-tensor copy, and the C library is not asked
    for (a small model starts no compiler in the background)."""
    asked = []
    monkeypatch.setattr(_native, "available", lambda: asked.append(1))
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(_grads.NATIVE_COPY_MIN_PARAMS - 1)]
    opt = kernels.Adam(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(5)
        opt.step()
    assert asked == []
    big = [torch.nn.Parameter(torch.randn(5)) for _ in range(_grads.NATIVE_COPY_MIN_PARAMS)]
    opt = kernels.Adam(big)
    for p in big:
        p.grad = torch.randn(5)
    opt.step()
    assert asked == [1]

"""The default compile mode: no call waits for a compiler.

A configuration without a ready kernel is compiled by one background thread while its calls run eagerly
(the same math); calls under ``COMPILE_MIN_NUMEL`` elements never ask; a failure there is warned about
once, from the caller's thread, and the eager path goes on; ``kernels.warmup`` compiles before the first
step. Each decision is driven with small update functions compiled under code names of their own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import warnings

import pytest
from strategies import UNDER_MUTMUT, reset_compile_state
import torch

from optadvisor import kernels
from optadvisor.kernels._runtime import compile as _compile

_names = itertools.count()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged():
    """The records of the logger ``optadvisor.kernels`` at INFO (not pytest's log-capture fixture: mutmut runs
    the tests with pytest's logging plugin off)."""
    logger, handler = logging.getLogger("optadvisor.kernels"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def background(monkeypatch, request):
    reset_compile_state(monkeypatch, "1")
    monkeypatch.setattr(_compile, "COMPILE_AFTER_ELEMENTS", 0)  # compile at the first call (its own test below)
    unique = f"{request.node.name}_{next(_names)}".replace("[", "_").replace("]", "").replace("-", "_")
    fresh_copy = _compile._fresh_copy
    monkeypatch.setattr(_compile, "_fresh_copy", lambda fn, tag: fresh_copy(fn, f"{tag}_{unique}"))
    yield
    assert _compile.wait_for_background(120), "a background compile outlived its test"


def _axpy(scalars, p, g):
    p.add_(g * scalars[0])


def _breaks(scalars, p):
    print("not traceable under fullgraph")
    p.add_(scalars[0])


def _raises(scalars, p):
    torch._check(p.shape[0] < 0, lambda: "refused by the update itself")
    p.add_(scalars[0])


def _call(fn, tensors, min_numel=None, scalars=(0.5,)):
    return _compile.run_fused(fn, (), tensors, torch.tensor(scalars), strict=False, min_numel=min_numel)


def test_a_first_call_runs_eagerly_and_the_next_after_the_compile_is_compiled(background):
    p, g = torch.zeros(6), torch.arange(6.0)
    with logged() as records:
        assert _call(_axpy, (p, g), min_numel=0) == (False, None)  # nothing written: the caller runs eagerly
        assert torch.equal(p, torch.zeros(6))
        assert _call(_axpy, (p, g), min_numel=0) == (False, None)  # asked once: no second job
        assert _compile.wait_for_background(120)
        assert _call(_axpy, (p, g), min_numel=0) == (True, None)
    assert torch.equal(p, g * 0.5)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 2
    assert messages[0].startswith("optadvisor: compiling _axpy (torch.float32, cpu) in the background")
    assert messages[1].startswith("optadvisor: compiled _axpy (torch.float32, cpu) is ready after ")
    assert len(_compile._ready) == 1 and not _compile._scheduled


def test_the_kernel_compiled_on_scratch_inputs_serves_other_sizes_and_views(background):
    """Compiled on scratch tensors of another size (a 10,000-element call compiles on 4097), the kernel
    serves the real call, a smaller one and slices of a larger buffer, with the eager path's values."""
    big = torch.zeros(10_000)
    assert _call(_axpy, (big, torch.ones(10_000)), min_numel=0) == (False, None)
    assert _compile.wait_for_background(120)
    (kernel,) = _compile._ready.values()
    for n in (10_000, 7, 3000):
        p, g = torch.zeros(n), torch.randn(n)
        assert _call(_axpy, (p, g)) == (True, None)  # ready: any size, whatever min_numel says
        assert torch.equal(p, g * 0.5)
    flat = torch.zeros(100)
    assert _call(_axpy, (flat[10:60], torch.ones(50))) == (True, None)
    assert torch.equal(flat[10:60], torch.full((50,), 0.5)) and not flat[:10].any() and not flat[60:].any()
    assert list(_compile._ready.values()) == [kernel]


def test_small_calls_never_start_a_compile(background):
    with logged() as records:
        for _ in range(3):
            assert _call(_axpy, (torch.zeros(100), torch.ones(100)), min_numel=101) == (False, None)
    assert not _compile._scheduled and not _compile._ready and not records
    assert _compile.COMPILE_MIN_NUMEL == 1 << 16  # the measured crossover (kernels/_runtime/compile.py)


def test_a_compile_starts_once_the_eager_work_would_pay_for_it(background, monkeypatch):
    """Ski rental: a configuration runs eagerly until it has updated COMPILE_AFTER_ELEMENTS elements (here
    100, in calls of 30), then its compile starts; a short run never starts one."""
    monkeypatch.setattr(_compile, "COMPILE_AFTER_ELEMENTS", 100)
    p, g = torch.zeros(30), torch.ones(30)
    with logged() as records:
        for _ in range(3):
            assert _call(_axpy, (p, g), min_numel=0) == (False, None)
        assert not _compile._scheduled and not records
        assert _call(_axpy, (p, g), min_numel=0) == (False, None)  # 120 >= 100
    assert len(records) == 1 and "in the background" in records[0].getMessage()
    assert _compile.wait_for_background(120)
    assert _call(_axpy, (p, g), min_numel=0) == (True, None)


def test_another_signature_is_compiled_apart(background):
    """A 1-element call (dynamo specializes sizes 0 and 1) or an absent optional tensor is another graph:
    it gets a background compile of its own and runs eagerly meanwhile."""
    assert _call(_axpy, (torch.zeros(8), torch.ones(8)), min_numel=0) == (False, None)
    assert _compile.wait_for_background(120)
    assert _call(_axpy, (torch.zeros(1), torch.ones(1)), min_numel=0) == (False, None)
    assert _compile.wait_for_background(120)
    assert _call(_axpy, (torch.zeros(1), torch.ones(1)), min_numel=0) == (True, None)
    assert len(_compile._ready) == 2


def test_a_background_compile_failure_is_warned_once_and_the_eager_path_goes_on(background):
    p = torch.zeros(4)
    assert _call(_breaks, (p,), min_numel=0) == (False, None)
    assert _compile.wait_for_background(120)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _call(_breaks, (p,), min_numel=0) == (False, None)
    assert torch.equal(p, torch.zeros(4)) and not _compile._scheduled
    key = ("_breaks", (), p.device, p.dtype)
    assert list(_compile._broken) == [key] and _compile._broken[key].startswith("Unsupported: ")
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, (
        f"optadvisor: compiling _breaks failed ({_compile._broken[key]}); using the eager path for this "
        "configuration. Set OPTADVISOR_COMPILE=0 to silence this."))]
    if not UNDER_MUTMUT:  # mutmut's trampolines add frames: the warning's stack level points elsewhere
        assert caught[0].filename == __file__  # the caller's line, not the worker's


def test_an_error_of_another_kind_in_the_background_is_reported_too(background):
    p = torch.zeros(4)
    assert _call(_raises, (p,), min_numel=0) == (False, None)
    assert _compile.wait_for_background(120)
    with pytest.warns(RuntimeWarning, match="compiling _raises failed"):
        assert _call(_raises, (p,), min_numel=0) == (False, None)
    assert torch.equal(p, torch.zeros(4))


@pytest.mark.parametrize("how", ["env", "deterministic", "strict"])
def test_sync_deterministic_and_strict_compile_at_the_first_call(background, monkeypatch, how):
    p, g = torch.zeros(5), torch.ones(5)
    strict = how == "strict"
    if how == "env":
        monkeypatch.setenv(_compile.ENV_VAR, "sync")
    if how == "deterministic":
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        monkeypatch.setattr(torch, "use_deterministic_algorithms", torch.use_deterministic_algorithms)
    try:
        assert _compile.run_fused(_axpy, (), (p, g), torch.tensor([2.0]), strict=strict) == (True, None)
    finally:
        if how == "deterministic":
            torch.use_deterministic_algorithms(before)
    assert torch.equal(p, torch.full((5,), 2.0)) and not _compile._scheduled


def test_no_call_waits_while_a_compile_is_running(background, monkeypatch):
    """A compile that takes long (held here by an event, released only after the calls) never holds a call:
    the calls run eagerly while it is still pending."""
    release = threading.Event()
    real = _compile._compile_job

    def held(*args):
        release.wait(60)
        real(*args)

    monkeypatch.setattr(_compile, "_compile_job", held)
    p, g = torch.zeros(8), torch.ones(8)
    for _ in range(20):
        assert _call(_axpy, (p, g), min_numel=0) == (False, None)
    assert _compile._scheduled and not _compile._ready
    release.set()
    assert _compile.wait_for_background(120)
    assert _call(_axpy, (p, g), min_numel=0) == (True, None)


# -- the optimizers ----------------------------------------------------------------------------------------

def _pairs(cls, kwargs, sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return params, twins, cls(params, **kwargs), getattr(torch.optim, cls.__name__)(twins, **kwargs,
                                                                                      foreach=False)


CASES = [(kernels.Adam, dict(lr=0.01)), (kernels.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
         (kernels.SGD, dict(lr=0.01, momentum=0.9, nesterov=True)),
         (kernels.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)), (kernels.Adagrad, dict(lr=0.1))]


@pytest.mark.parametrize("cls, kwargs", CASES, ids=[c.__name__ for c, _ in CASES])
def test_an_optimizer_runs_eagerly_then_compiled_and_stays_torchs(background, monkeypatch, cls, kwargs):
    """Steps before the kernel is ready are torch's for-loop bit for bit (the eager path), the switch happens
    between steps, and 30 steps in all stay within torch's tolerances."""
    monkeypatch.setattr(_compile, "COMPILE_MIN_NUMEL", 64)
    sizes = [100, 3, 70_000, 50]  # 70,000: a gradient read where it lies, a call of its own
    params, twins, ours, ref = _pairs(cls, kwargs, sizes)
    gen = torch.Generator().manual_seed(1)
    calls = []
    real_call = _compile._Kernel.__call__
    main = threading.current_thread()
    monkeypatch.setattr(_compile._Kernel, "__call__", lambda self, *a: (
        threading.current_thread() is main and calls.append(1)) or real_call(self, *a))  # not the worker's
    for step in range(30):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        if step == 0:
            # torch 2.13's torch.compiler.is_compiling() is one flag for the whole process: torch.optim run
            # while the background thread compiles takes its compile-time branches (other rounding)
            assert _compile.wait_for_background(300)
        ref.step()
        if step == 0:
            assert not calls
            for p, q in zip(params, twins):
                assert torch.equal(p, q)
    assert calls  # compiled steps after the first
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1.3e-6, atol=1e-5)
    for a, b in zip(ours.state.values(), ref.state.values()):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1.3e-6, atol=1e-5)


WARMUP_CASES = [(kernels.Adam, dict(lr=0.01), torch.float32),
                (kernels.AdamW8bit, dict(lr=0.01), torch.float32),
                (kernels.SGD, dict(lr=0.01, momentum=0.9, state_dtype=torch.bfloat16), torch.float32),
                (kernels.AdamW, dict(lr=0.01, kahan_sum=True), torch.bfloat16)]


@pytest.mark.parametrize("cls, kwargs, dtype", WARMUP_CASES, ids=["Adam", "AdamW8bit", "SGD-bf16-state",
                                                                   "AdamW-kahan"])
def test_warmup_compiles_what_the_first_step_uses_and_changes_nothing(background, monkeypatch, cls, kwargs,
                                                                      dtype):
    from optadvisor.kernels._runtime import native as _native

    if cls is kernels.AdamW8bit or "state_dtype" in kwargs:
        monkeypatch.setenv(_native.ENV_VAR, "0")  # their torch-op form is the one compiled (else C)
    sizes = [5000, 3, 70_000]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]
    before = [p.detach().clone() for p in params]
    opt = cls(params, **kwargs)
    kernels.warmup(opt)
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(params, before))
    assert _compile._ready
    ready = dict(_compile._ready)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()
    assert not _compile._scheduled and _compile._ready == ready  # nothing new was needed


def test_warmup_refuses_what_is_not_ours(background):
    with pytest.raises(TypeError, match=r"warmup: argument 1 must be an optadvisor optimizer .* got SGD"):
        kernels.warmup(kernels.Adam([torch.nn.Parameter(torch.ones(3))]),
                       torch.optim.SGD([torch.nn.Parameter(torch.ones(3))]))


def test_fused_false_and_compile_off_never_start_a_compile(background, monkeypatch):
    monkeypatch.setattr(_compile, "COMPILE_MIN_NUMEL", 1)
    for setup in ("fused=False", "env-off"):
        if setup == "env-off":
            monkeypatch.setenv(_compile.ENV_VAR, "0")
        p = torch.nn.Parameter(torch.randn(100))
        opt = kernels.Adam([p], fused=False) if setup == "fused=False" else kernels.Adam([p])
        p.grad = torch.randn(100)
        opt.step()
        kernels.warmup(opt)
    assert not _compile._scheduled and not _compile._ready and not _compile._compiled


def test_warmup_loads_the_c_kernels(background, monkeypatch):
    from optadvisor.kernels._runtime import native as _native

    monkeypatch.setenv(_native.ENV_VAR, "1")
    if _native.library() is None:
        pytest.skip("no C compiler: the torch ops serve")
    monkeypatch.setattr(_native, "_loaded", {})
    opt = kernels.SGD([torch.nn.Parameter(torch.randn(100))], lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    assert _native.available() is None or _native._loaded  # not loaded yet, or loaded by now in the background
    kernels.warmup(opt)
    assert _native.available() is not None


@pytest.mark.parametrize("cls, kwargs, dtype", [(kernels.Lion8bit, dict(lr=1e-3), torch.float32),
                                                (kernels.Adagrad8bit, dict(lr=1e-2), torch.float32),
                                                (kernels.AdamW8bit, dict(lr=1e-2), torch.float16)],
                         ids=["Lion8bit", "Adagrad8bit", "AdamW8bit-fp16"])
def test_a_blockwise_update_compiles_in_the_background(background, monkeypatch, cls, kwargs, dtype):
    """A block-wise (8-bit) update views its buffers as (blocks, block): compiled on shrunken scratch sizes
    (70,144 -> 4097) its trace failed and the run stayed eager for good, with a warning (seen on the character
    LM). It compiles on the real sizes, without a warning, and the compiled steps run."""
    monkeypatch.setattr(_compile, "COMPILE_MIN_NUMEL", 64)
    monkeypatch.setattr(_compile, "COMPILE_AFTER_ELEMENTS", 0)
    params = [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in (70_000, 5000)]
    opt = cls(params, min_8bit_size=0, **kwargs)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            assert _compile.wait_for_background(300)
    assert not [w for w in seen if "optadvisor" in str(w.message)], [str(w.message) for w in seen]
    assert _compile._ready and not _compile._broken
    assert all(torch.isfinite(p).all() for p in params)


def test_an_update_that_is_costly_eagerly_starts_its_compile_sooner(background, monkeypatch):
    """Ski rental counts eager *work*: an update marked ``eager_cost = k`` (the 8-bit ones: 6) counts k per
    element, so its compile starts after COMPILE_AFTER_ELEMENTS / k elements (here 100 / 4: the first call
    of 30)."""
    monkeypatch.setattr(_compile, "COMPILE_AFTER_ELEMENTS", 100)

    def _costly(scalars, p, g):
        p.add_(g * scalars[0])

    _costly.eager_cost = 4
    p, g = torch.zeros(30), torch.ones(30)
    with logged() as records:
        assert _call(_costly, (p, g), min_numel=0) == (False, None)  # 120 >= 100: scheduled now
    assert len(records) == 1 and "in the background" in records[0].getMessage()
    assert _compile.wait_for_background(120)
    assert _call(_costly, (p, g), min_numel=0) == (True, None)
    assert kernels.Lion8bit._q8_update.eager_cost == 6 and kernels.AdamW8bit._q8_update.eager_cost == 6

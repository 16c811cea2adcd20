"""kernels/_runtime/compile.py and kernels/_runtime/private.py on their own: the switch between compiled and eager, compile
failures, user modes, the guard-skipping direct call and what it checks before skipping the guards.

The optimizer and loss tests run these paths end to end; here each decision is driven on purpose, with small
update functions of the tests' own. Every compile runs under a code name of its own (dynamo keeps state per
code name, and mutation testing learns which tests cover a function from the tests that really compile)."""

from __future__ import annotations

import itertools
import types
import warnings

import pytest
from strategies import reset_compile_state
import torch
from strategies import UNDER_MUTMUT
from torch.utils._python_dispatch import TorchDispatchMode

from optadvisor.kernels._runtime import compile as _compile, kernel as _kernel_module, private as _private

_names = itertools.count()


@pytest.fixture
def fresh(monkeypatch, request):
    """Empty kernel caches, and every code object compiled in this test named after it. Yields the tags
    ``_fresh_copy`` was given (one per configuration compiled) and the options each ``_Kernel`` was built
    with."""
    # compiled at the first call, in this thread (the background mode: tests/test_background_compile.py)
    reset_compile_state(monkeypatch, "sync")
    tags, options = [], []
    fresh_copy = _compile._fresh_copy
    unique = f"{request.node.name}_{next(_names)}".replace("[", "_").replace("]", "").replace("-", "_")

    def tagged(fn, tag):
        tags.append(tag)
        return fresh_copy(fn, f"{tag}_{unique}")

    class Recording(_compile._Kernel):
        def __init__(self, fn, opts):
            options.append(opts)
            super().__init__(fn, opts)

    monkeypatch.setattr(_compile, "_fresh_copy", tagged)
    monkeypatch.setattr(_compile, "_Kernel", Recording)
    return types.SimpleNamespace(tags=tags, options=options)


def _axpy(scalars, add, p, g):
    if add:
        p.add_(g * scalars[0])
    else:
        p.sub_(g * scalars[1])


def _scaled(scalars, p):
    return p * scalars[0]


def _breaks(scalars, p):
    print("not traceable under fullgraph")
    p.add_(scalars[0])


def _kernel(fn, flags, ref):
    return _compile._compiled[(fn.__qualname__, flags, ref.device, ref.dtype)]


def _exact(n, dtype=torch.float32):
    """Small integers: every product and sum below is exact, compiled or not."""
    return torch.arange(n, dtype=dtype) % 7 - 3


# -- the switch ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("no", False), ("off", False),
                                       (" OFF ", False), ("False", False), ("No\n", False),
                                       ("1", True), ("yes", True), ("on", True), ("", True), ("2", True),
                                       (None, True)])
def test_environment_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(_compile.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_compile.ENV_VAR, value)
    assert _compile.ENV_VAR == "OPTADVISOR_COMPILE"
    assert _compile.compile_enabled_by_env() is on
    assert _compile.resolve_fused(None) is on
    assert _compile.resolve_fused(True) is True and _compile.resolve_fused(False) is False


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0, torch.tensor(True)])
def test_fused_must_be_a_bool_or_none(bad):
    with pytest.raises(TypeError) as info:
        _compile.resolve_fused(bad)
    assert str(info.value) == f"'fused' must be a bool or None (got {bad!r})"


def test_fresh_copy_is_the_same_function_under_a_new_code_name():
    k = 100

    def fn(a, b=20, *, c=3):
        return a + b + c + k

    copy = _compile._fresh_copy(fn, "1_0_cpu_float32")
    assert copy.__name__ == copy.__code__.co_name == "fn__1_0_cpu_float32"
    assert copy is not fn and copy.__code__ is not fn.__code__ and fn.__code__.co_name == "fn"
    assert copy.__globals__ is fn.__globals__ and copy.__closure__ == fn.__closure__
    assert copy.__defaults__ == (20,) and copy.__kwdefaults__ == {"c": 3}
    assert copy(1) == 124 and copy(1, 2) == 106 and copy(1, c=0) == 121


# -- compiled calls -----------------------------------------------------------------------------------------

def test_a_configuration_is_compiled_once_then_called_directly(fresh):
    """The first call compiles (through dynamo's guards) and records a direct-call plan; later calls of
    any length >= 2 with the same kinds of arguments skip the guards; lengths 0 and 1, another number of
    scalars, a non-contiguous tensor or another grad mode go through the guards. Results are exact
    throughout; each configuration (flags, dtype) is its own kernel under its own code name."""
    scalars = torch.tensor([2.0, 3.0])
    p, g = _exact(7), _exact(7).flip(0)
    expected = p + g * 2
    assert _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True) == (True, None)
    assert torch.equal(p, expected)
    kernel = _kernel(_axpy, (True,), p)
    assert kernel.argnames == ("scalars", "add", "p", "g") and kernel.varargs is None
    assert kernel.direct is not None
    _call, plan, hp_len, state_guard, present = kernel.direct
    assert plan is not None and hp_len == 2 and present == (True, True) and state_guard.check()
    assert fresh.tags == ["1_cpu_float32"]
    assert fresh.options == [{"emulate_precision_casts": True, "cpp.dynamic_threads": True}]

    guarded = []
    inner = kernel.guarded
    kernel.guarded = lambda *a: guarded.append(a[-1].shape) or inner(*a)

    def check(n, scalars=scalars, through_guards=False, **kw):
        p, g = _exact(n, **kw), _exact(n, **kw).flip(0)
        expected = p + g * scalars[0]
        del guarded[:]
        assert _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True) == (True, None)
        assert torch.equal(p, expected), n
        assert guarded == ([g.shape] if through_guards else []), n

    for n in (2, 5, 300, 7):
        check(n)
    for n in (0, 1):
        check(n, through_guards=True)
    check(5, scalars=torch.tensor([2.0, 3.0, 4.0]), through_guards=True)
    with torch.no_grad():
        check(5, through_guards=True)
    p, g = _exact(10)[::2], _exact(5)
    expected = p + g * 2
    del guarded[:]
    _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True)
    assert torch.equal(p, expected) and guarded == [g.shape]
    assert len(fresh.tags) == 1  # no other kernel was built for these calls

    p, g = _exact(6), _exact(6).flip(0)
    expected = p - g * 3
    assert _compile.run_fused(_axpy, (False,), (p, g), scalars, strict=True) == (True, None)
    assert torch.equal(p, expected)
    p64, g64 = _exact(6, dtype=torch.float64), _exact(6, dtype=torch.float64)
    assert _compile.run_fused(_axpy, (True,), (p64, g64), scalars, strict=True) == (True, None)
    pbf, gbf = _exact(6, dtype=torch.bfloat16), _exact(6, dtype=torch.bfloat16)
    assert _compile.run_fused(_axpy, (True,), (pbf, gbf), scalars, strict=True) == (True, None)
    assert torch.equal(p64, _exact(6, dtype=torch.float64) * 3) and torch.equal(pbf, p64.bfloat16())
    assert fresh.tags == ["1_cpu_float32", "0_cpu_float32", "1_cpu_float64", "1_cpu_bfloat16"]
    assert len({id(k) for k in _compile._compiled.values()}) == 4
    for k in _compile._compiled.values():  # each dtype's graph was checked on inputs of its own dtype
        assert k.direct is not None and k.direct[0].__name__ != "<lambda>", "inductor's entry point not found"


def test_tags_name_every_flag_and_no_flags(fresh):
    def _noflags(scalars, p):
        p.add_(scalars[0])

    def _mixed(scalars, a, b, c, p):
        p.add_(scalars[0] * c if a and not b else scalars[0])

    def _named(scalars, mode, p):
        p.add_(scalars[0] if mode == "add" else -scalars[0])

    p = _exact(4)
    _compile.run_fused(_noflags, (), (p,), torch.tensor([1.0]), strict=True)
    _compile.run_fused(_mixed, (True, False, 3), (p,), torch.tensor([1.0]), strict=True)
    _compile.run_fused(_named, ("add",), (p,), torch.tensor([1.0]), strict=True)
    assert torch.equal(p, _exact(4) + 5)
    assert fresh.tags == ["plain_cpu_float32", "1_0_3_cpu_float32", "add_cpu_float32"]


def test_a_graph_that_returns_something_is_never_called_directly(fresh):
    p = _exact(9)
    ok, out = _compile.run_fused(_scaled, (), (p,), torch.tensor([2.0]), strict=True)
    assert ok and torch.equal(out, p * 2)
    ok, out = _compile.run_fused(_scaled, (), (p,), torch.tensor([3.0]), strict=True)
    assert ok and torch.equal(out, p * 3)
    assert _kernel(_scaled, (), p).direct is None


def test_absent_optional_tensors_are_part_of_the_plan(fresh):
    def _maybe(scalars, p, g, buf):
        if buf is not None:
            buf.mul_(scalars[1]).add_(g)
            p.add_(buf * scalars[0])
        else:
            p.add_(g * scalars[0])

    scalars = torch.tensor([2.0, 0.5])
    p, g = _exact(8), _exact(8).flip(0)
    _compile.run_fused(_maybe, (), (p, g, None), scalars, strict=True)
    assert torch.equal(p, _exact(8) + _exact(8).flip(0) * 2)
    kernel = _kernel(_maybe, (), p)
    assert kernel.direct is not None and kernel.direct[4] == (True, True, False)
    assert kernel.direct[0].__name__ != "<lambda>"  # inductor's entry point, checked with the None in place
    guarded = []
    inner = kernel.guarded
    kernel.guarded = lambda *a: guarded.append(1) or inner(*a)
    p, g = _exact(5), _exact(5)
    _compile.run_fused(_maybe, (), (p, g, None), scalars, strict=True)
    assert torch.equal(p, _exact(5) * 3) and guarded == []
    p, g, buf = _exact(5), _exact(5), torch.ones(5)  # a tensor where the plan had None: through the guards
    _compile.run_fused(_maybe, (), (p, g, buf), scalars, strict=True)
    assert torch.equal(p, _exact(5) + (0.5 + _exact(5)) * 2) and guarded == [1]


def _square_add(scalars, p, g):
    p.add_(g * g * scalars[0])


def _bf16_case(n):
    gen = torch.Generator().manual_seed(n)
    p, g = (torch.randn(n, generator=gen).bfloat16() for _ in range(2))
    scalars = torch.tensor([1.0, 0.0])  # two: dynamo specializes a length of 1 (such a graph stays guarded)
    expected = p.clone().add_(g * g * scalars[0])  # eager rounds each product to bfloat16, then adds
    return p, g, scalars, expected


@pytest.mark.parametrize("capturing", [True, False])
def test_bfloat16_gives_eagers_bits_and_one_graph_serves_every_size(fresh, monkeypatch, capturing):
    """Whether or not the capturing backend is there (a torch without it compiles with plain options):
    inductor emulates eager's bfloat16 rounding of each op (a fused multiply-add rounded once differs), and
    the graph has dynamic sizes (a graph per size would exceed dynamo's recompile limit and fail)."""
    if not capturing:
        monkeypatch.setattr(_kernel_module, "capturing_backend", lambda kernel, options: None)
    for n in (1000, 7, 5, 9, 11, 13, 17, 19, 23, 29, 31, 37, 1000):
        p, g, scalars, expected = _bf16_case(n)
        assert _compile.run_fused(_square_add, (), (p, g), scalars, strict=True) == (True, None)
        assert torch.equal(p, expected), n
    assert len(fresh.tags) == 1
    assert (_kernel(_square_add, (), p).direct is not None) is capturing


def test_without_the_capturing_backend_every_call_is_guarded_and_the_same(fresh, monkeypatch):
    monkeypatch.setattr(_kernel_module, "capturing_backend", lambda kernel, options: None)
    scalars = torch.tensor([2.0, 3.0])
    for n in (7, 5, 7):
        p, g = _exact(n), _exact(n).flip(0)
        expected = p + g * 2
        assert _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True) == (True, None)
        assert torch.equal(p, expected)
    assert _kernel(_axpy, (True,), p).direct is None
    with pytest.raises(RuntimeError, match="^fused=True but compiling the update failed: Unsupported: "):
        _compile.run_fused(_breaks, (), (p,), scalars, strict=True)  # still one whole graph or nothing
    assert torch.equal(p, _exact(7) + _exact(7).flip(0) * 2)


def test_without_inductors_entry_point_the_wrapped_graph_is_called_directly(fresh, monkeypatch):
    monkeypatch.setattr(_kernel_module, "innermost", lambda *args: None)
    scalars = torch.tensor([2.0, 3.0])
    kernel = None
    for n in (7, 5, 300):
        p, g = _exact(n), _exact(n).flip(0)
        expected = p + g * 2
        assert _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True) == (True, None)
        assert torch.equal(p, expected), n
        if kernel is None:
            kernel = _kernel(_axpy, (True,), p)
            assert kernel.direct is not None and kernel.direct[0].__name__ == "<lambda>"
            kernel.guarded = None  # from here on only the direct call can do the update


def test_a_graph_whose_plan_cannot_be_read_stays_guarded(fresh, monkeypatch):
    def unreadable(*args, **kwargs):
        raise KeyError("placeholder")

    monkeypatch.setattr(_private, "call_plan", unreadable)
    scalars = torch.tensor([2.0, 3.0])
    for n in (7, 5):
        p, g = _exact(n), _exact(n).flip(0)
        expected = p + g * 2
        assert _compile.run_fused(_axpy, (True,), (p, g), scalars, strict=True) == (True, None)
        assert torch.equal(p, expected)
    assert _kernel(_axpy, (True,), p).direct is None


# -- what a direct call is checked against -----------------------------------------------------------------

def _serves(call, guarded, tensors, plan=((1, 0), (1, 1))):
    kernel = types.SimpleNamespace(guarded=guarded, _pending=("saved",))
    ok = _compile._Kernel._serves_other_sizes(kernel, call, plan, torch.tensor([2.0]), (), tensors)
    assert kernel._pending == ("saved",)  # restored after each guarded call
    return ok


def _add(args):
    args[1].add_(args[0][0])


def test_a_direct_call_is_recorded_only_if_it_gives_the_guarded_bits_at_two_other_lengths():
    lengths = []

    def guarded(scalars, p):
        lengths.append(p.shape[0])
        p.add_(scalars[0])

    for n in (7, 37, 41, 43):
        del lengths[:]
        assert _serves(_add, guarded, (torch.zeros(n),))
        assert len(lengths) == 2 and n not in lengths and min(lengths) >= 2 and len(set(lengths)) == 2
    assert _serves(_add, lambda s, p: p.add_(float("nan")), (torch.zeros(3),), plan=((1, 0), (1, 1))) is False
    assert _serves(lambda a: a[1].fill_(float("nan")), lambda s, p: p.fill_(float("nan")), (torch.zeros(3),))
    assert not _serves(lambda a: a[1].add_(1.0), guarded, (torch.zeros(3),))  # other bits
    assert not _serves(lambda a: None, guarded, (torch.zeros(3),))  # writes nothing
    assert not _serves(lambda a: a[1].view(2, -1), guarded, (torch.zeros(3),))  # fails at another length

    def specialized(args):  # right at one of the lengths only
        if args[1].shape[0] == lengths[0]:
            _add(args)

    del lengths[:]
    guarded(torch.tensor([0.0]), torch.zeros(37))
    assert not _serves(specialized, guarded, (torch.zeros(3),))

    def with_none(args):
        args[1].add_(args[0][0])
        assert args[2] is None

    assert _serves(with_none, lambda s, p, absent: p.add_(s[0]), (torch.zeros(3), None),
                   plan=((1, 0), (1, 1), (1, 2)))
    sizes = []
    assert _serves(lambda a: sizes.append(a[1]) or a[2].add_(a[0][0]), lambda s, p: p.add_(s[0]),
                   (torch.zeros(3),), plan=((1, 0), (0, 1), (1, 1)))
    assert sizes == [37, 41]  # a (0, i) entry passes the i-th argument's length


def test_direct_ok_checks_the_scalars_presence_and_lengths():
    state = _private.global_state_guard()
    ok = _compile._Kernel._direct_ok
    s8, t4 = torch.zeros(8), torch.zeros(4)
    assert ok(s8, (t4,), 8, state, (True,))
    assert ok(s8, (t4, None, t4), 8, state, (True, False, True))
    assert ok(s8, (torch.zeros(2),), 8, state, (True,))
    assert not ok(torch.zeros(2, 4), (t4,), 8, state, (True,))
    assert not ok(torch.zeros(7), (t4,), 8, state, (True,))
    assert not ok(s8, (t4, t4), 8, state, (True,))
    assert not ok(s8, (t4,), 8, state, (True, True))
    assert not ok(s8, (t4, None), 8, state, (True, True))
    assert not ok(s8, (t4, t4), 8, state, (True, False))
    assert not ok(s8, (None,), 8, state, (False,))  # no tensor at all: nothing to size the call
    assert not ok(s8, (torch.zeros(2, 2),), 8, state, (True,))
    assert not ok(s8, (t4, torch.zeros(4, 1)), 8, state, (True, True))
    assert not ok(s8, (torch.zeros(2, 4).t()[0],), 8, state, (True,))
    assert not ok(s8, (t4, None, torch.zeros(5)), 8, state, (True, False, True))


# -- when compiling is impossible --------------------------------------------------------------------------

class _Watch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_under_a_user_mode_the_call_steps_aside(fresh):
    p = _exact(5)
    with _Watch():
        assert _compile.run_fused(_axpy, (True,), (p, p.clone()), torch.tensor([1.0, 1.0]), strict=False) \
            == (False, None)
        with pytest.raises(RuntimeError) as info:
            _compile.run_fused(_axpy, (True,), (p, p.clone()), torch.tensor([1.0, 1.0]), strict=True)
    assert str(info.value) == (
        "fused=True, but a TorchDispatchMode or TorchFunctionMode is active and torch.compile cannot run "
        "under it; use fused=None (the default: compiled outside the mode, eager inside it) or fused=False")
    assert torch.equal(p, _exact(5)) and not _compile._broken and not _compile._compiled
    assert _compile.run_fused(_axpy, (True,), (p, p.clone()), torch.tensor([1.0, 1.0]), strict=False) \
        == (True, None)
    assert torch.equal(p, _exact(5) * 2)


def test_a_configuration_that_cannot_compile_falls_back_once_with_a_warning(fresh):
    p = _exact(5)
    scalars = torch.tensor([1.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _compile.run_fused(_breaks, (), (p,), scalars, strict=False) == (False, None)
    assert torch.equal(p, _exact(5))  # nothing was written
    key = ("_breaks", (), p.device, p.dtype)
    assert list(_compile._broken) == [key] and key not in _compile._compiled
    reason = _compile._broken[key]
    assert reason.startswith("Unsupported: ") and "\n" not in reason
    assert [(w.category, str(w.message)) for w in caught] == [(RuntimeWarning, (
        f"optadvisor: compiling _breaks failed ({reason}); using the eager path for this configuration. "
        "Set OPTADVISOR_COMPILE=0 to silence this."))]
    if not UNDER_MUTMUT:  # mutmut's trampolines add frames: the warning's stack level points elsewhere
        assert caught[0].filename == __file__
        assert caught[0].lineno == test_a_configuration_that_cannot_compile_falls_back_once_with_a_warning \
            .__code__.co_firstlineno + 5

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known broken: no second warning, no second compile
        assert _compile.run_fused(_breaks, (), (p,), scalars, strict=False) == (False, None)
    assert len(fresh.tags) == 1
    with pytest.raises(RuntimeError) as info:
        _compile.run_fused(_breaks, (), (p,), scalars, strict=True)
    assert str(info.value) == f"fused=True but the compiled update is unavailable: {reason}"

    p64 = _exact(5, dtype=torch.float64)  # another configuration: tried on its own, strict raises
    with pytest.raises(RuntimeError) as info:
        _compile.run_fused(_breaks, (), (p64,), scalars, strict=True)
    assert str(info.value) == f"fused=True but compiling the update failed: {reason}"
    assert type(info.value.__cause__).__name__ == "Unsupported"
    assert list(_compile._broken) == [key, ("_breaks", (), p64.device, torch.float64)]
    assert torch.equal(p64, _exact(5, dtype=torch.float64)) and not _compile._compiled


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_the_fallback_warning_points_at_the_users_step(fresh, monkeypatch, name):
    """Steps reach the compiled call through torch's step hooks and our buckets, at depths that differ by
    optimizer: the warning names the user's ``opt.step()`` line, and the step still matches torch."""
    from optadvisor import kernels

    monkeypatch.setattr(_compile, "_Kernel", _failing_kernel(InductorError("no compiler")))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(p.detach().clone())
    ours, ref = getattr(kernels, name)([p], lr=0.1), getattr(torch.optim, name)([q], lr=0.1, foreach=False)
    p.grad, q.grad = torch.ones(10), torch.ones(10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.step()
    ref.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [str(w.message) for w in caught] == [(
        f"optadvisor: compiling _{name.lower()}_fused failed (InductorError: no compiler); using the eager "
        "path for this configuration. Set OPTADVISOR_COMPILE=0 to silence this.")]
    if not UNDER_MUTMUT:  # mutmut's trampolines are frames outside the package: the walk stops there
        line = _step_line(test_the_fallback_warning_points_at_the_users_step)
        assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def _step_line(fn):
    import inspect

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if line.strip() == "ours.step()")


def _failing_kernel(exc):
    class Failing:
        def __init__(self, fn, options):
            pass

        def __call__(self, scalars, flags, tensors):
            raise exc

    return Failing


class InductorError(Exception):
    pass


class CppCompileError(Exception):
    pass


@pytest.mark.parametrize("exc, reason", [
    (InductorError("line one\nline two"), "InductorError: line one"),
    (CppCompileError(), "CppCompileError: "),
])
def test_the_reason_is_the_failures_type_and_first_line(fresh, monkeypatch, exc, reason):
    monkeypatch.setattr(_compile, "_Kernel", _failing_kernel(exc))
    p = _exact(3)
    with pytest.warns(RuntimeWarning):
        done = _compile.run_fused(_axpy, (True,), (p, p), torch.tensor([1.0, 1.0]), strict=False)
    assert done == (False, None)
    assert list(_compile._broken.values()) == [reason]


def test_an_error_that_is_not_a_compile_failure_propagates(fresh, monkeypatch):
    monkeypatch.setattr(_compile, "_Kernel", _failing_kernel(ValueError("wrong size")))
    p = _exact(3)
    for strict in (False, True):
        with pytest.raises(ValueError, match="^wrong size$"):
            _compile.run_fused(_axpy, (True,), (p, p), torch.tensor([1.0, 1.0]), strict=strict)
    assert not _compile._broken


def _error(name, module="tests.elsewhere", message=""):
    return type(name, (Exception,), {"__module__": module})(message)


@pytest.mark.parametrize("name", ["BackendCompilerFailed", "InductorError", "CppCompileError", "Unsupported",
                                  "InvalidCxxCompiler", "CalledProcessError"])
def test_compile_failures_by_name(name):
    assert _compile._is_compile_failure(_error(name))
    outer = RuntimeError("outer")
    outer.__cause__ = _error(name)
    assert _compile._is_compile_failure(outer)
    outer = ValueError("outer")
    outer.__context__ = _error(name)
    assert _compile._is_compile_failure(outer)


@pytest.mark.parametrize("module, failure", [
    ("torch._dynamo", True), ("torch._dynamo.exc", True), ("torch._inductor.codecache", True),
    ("torch._subclasses", False), ("torch", False), ("builtins", False), ("mytorch._dynamo", False)])
def test_compile_failures_by_module(module, failure):
    assert _compile._is_compile_failure(_error("SomethingElse", module)) is failure
    outer = RuntimeError("outer")
    outer.__context__ = ValueError("middle")
    outer.__context__.__cause__ = _error("SomethingElse", module)
    assert _compile._is_compile_failure(outer) is failure


def test_the_cause_is_followed_before_the_context_and_cycles_end():
    assert not _compile._is_compile_failure(ValueError("plain"))
    assert not _compile._is_compile_failure(RuntimeError("plain"))
    outer = RuntimeError("outer")
    outer.__cause__, outer.__context__ = _error("Unsupported"), ValueError("handled")
    assert _compile._is_compile_failure(outer)
    outer = RuntimeError("outer")
    outer.__cause__, outer.__context__ = ValueError("cause"), _error("Unsupported")
    assert not _compile._is_compile_failure(outer)  # raise ... from cause: the context is not the chain
    a, b = ValueError("a"), KeyError("b")
    a.__context__, b.__context__ = b, a
    assert not _compile._is_compile_failure(a)
    assert [type(e) for e in _compile._chain(a)] == [ValueError, KeyError]
    b.__context__ = _error("Unsupported")
    b.__context__.__context__ = a
    assert _compile._is_compile_failure(a)


# -- kernels/_runtime/private.py ------------------------------------------------------------------------------------

def test_same_values_matches_nan_with_nan_only():
    nan = float("nan")
    assert _private.same_values(torch.tensor([1.0, nan, -0.0]), torch.tensor([1.0, nan, 0.0]))
    assert not _private.same_values(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0]))
    assert not _private.same_values(torch.tensor([1.0, 2.0]), torch.tensor([1.0, nan]))
    assert not _private.same_values(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    assert _private.same_values(torch.zeros(0), torch.zeros(0))
    assert _private.same_values(torch.tensor([1, 2]), torch.tensor([1, 2]))


class CompiledFxGraph:  # the name is what the search recognizes
    def __init__(self):
        self.current_callable = None


class _Layer:
    def __init__(self, attr, child):
        setattr(self, attr, child)

    def __call__(self):
        pass


def test_inductors_graph_is_found_under_wrappers_closures_and_attributes():
    find = _private._find_compiled_fx_graph
    target = CompiledFxGraph()
    assert find(target) is target
    for attr in ("__wrapped__", "compiled_fn", "_inner_compiled_fn", "fn"):
        assert find(_Layer(attr, target)) is target
        assert find(_Layer(attr, _Layer("fn", target))) is target

    def closing():
        return target

    assert find(closing) is target
    wrapped = target
    for _ in range(8):
        wrapped = _Layer("fn", wrapped)
    assert find(wrapped) is target  # eight wrappers deep
    assert find(_Layer("fn", wrapped)) is None  # nine: not searched

    def empty_cell_first():
        return later, target  # `later` is never bound: its cell stays empty

    if False:  # pragma: no cover
        later = None
    assert find(empty_cell_first) is target

    a, b = _Layer("fn", None), _Layer("fn", None)
    a.fn, b.fn = b, a
    assert find(a) is None  # a cycle ends
    a.compiled_fn = target
    assert find(b) is target
    visits = []

    class Counted(_Layer):
        def __getattribute__(self, name):
            if name == "__closure__":
                visits.append(id(self))
            return object.__getattribute__(self, name)

    hub = [Counted(attr, None) for attr in ("__wrapped__", "compiled_fn", "_inner_compiled_fn", "fn")]
    for layer in hub:  # every layer points at every layer: a search without memory would take 4**8 paths
        for attr in ("__wrapped__", "compiled_fn", "_inner_compiled_fn", "fn"):
            setattr(layer, attr, hub[("__wrapped__", "compiled_fn", "_inner_compiled_fn", "fn").index(attr)])
    assert find(hub[0]) is None
    assert sorted(visits) == sorted(map(id, hub))  # each searched once
    holder = type("Holder", (), {"fn": target})  # a class's attributes are not its wrapped function
    assert find(holder) is None
    assert find(_Layer("fn", "not callable")) is None
    assert find(_Layer("fn", 3)) is None


def _plan_inputs():
    return torch.tensor([2.0]), ((1, 0), (1, 1))


@pytest.mark.parametrize("runner, found", [
    (lambda args: args[1].add_(args[0][0]), True),  # the same bits: inductor's entry point is used
    (lambda args: args[1].add_(1.0), False),  # other bits
    (lambda args: None, False),  # writes nothing
    (lambda args: args[1].view(2, 2), False),  # fails
    (None, False),  # nothing callable found
])
def test_innermost_is_used_only_where_it_gives_the_wrapped_graphs_bits(monkeypatch, runner, found):
    graph = CompiledFxGraph()
    graph.current_callable = runner
    monkeypatch.setattr(_private, "_find_compiled_fx_graph", lambda fn: graph)
    calls = []

    def compiled(*args):
        calls.append(tuple(a.shape[0] for a in args))
        args[1].add_(args[0][0])

    scalars, plan = _plan_inputs()
    got = _private.innermost(compiled, plan, scalars, (), (torch.zeros(5),))
    assert got is (runner if found else None)
    assert calls == ([] if runner is None else [(1, 37)])


def test_innermost_needs_a_graph_that_writes(monkeypatch):
    scalars, plan = _plan_inputs()
    assert _private.innermost(lambda *a: None, plan, scalars, (), (torch.zeros(5),)) is None  # no graph found
    graph = CompiledFxGraph()
    graph.current_callable = lambda args: None
    monkeypatch.setattr(_private, "_find_compiled_fx_graph", lambda fn: graph)
    assert _private.innermost(lambda *a: None, plan, scalars, (), (torch.zeros(5),)) is None
    assert _private.innermost(lambda *a: None, plan, scalars, (), (None, torch.zeros(5))) is None


def test_capturing_backend_is_inductor_with_our_options():
    captured = []
    kernel = types.SimpleNamespace(argnames=("scalars", "p"), varargs=None,
                                   capture=lambda compiled, plan: captured.append(plan))
    backend = _private.capturing_backend(kernel, {"emulate_precision_casts": True})
    assert backend.compiler_name == "inductor"
    assert backend.config == {"emulate_precision_casts": True}
    assert backend.dynamic is True


# -- call plans from real dynamo graphs ---------------------------------------------------------------------

def _plan_of(fn, *args, argnames=None, varargs=None):
    """The plan call_plan reads from the graph dynamo builds for ``fn(*args)`` (dynamic shapes, fullgraph)."""
    code = fn.__code__
    argnames = argnames or code.co_varnames[:code.co_argcount]
    plans = []

    def backend(gm, example_inputs):
        plans.append(_private.call_plan(gm, argnames, varargs))
        plans.append(gm)
        return gm.forward

    fn = _compile._fresh_copy(fn, f"plan_{next(_names)}")
    torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)(*args)
    assert len(plans) == 2
    assert _private.call_plan(plans[1], argnames, varargs) is None  # outside dynamo's tracing: no shapes
    return plans[0]


def _f(scalars, flag, p, g):
    if flag:
        p.add_(g * scalars[0])


def _va(scalars, *ts):
    ts[0].add_(ts[1] * scalars[0])


def _digits(scalars, p_1, g_2):
    p_1.add_(g_2 * scalars[0])


def _caps(scalars, Grad, P):  # dynamo lowercases placeholder names
    P.add_(Grad * scalars[0])


def _size_guard(scalars, p):
    if p.shape[0] > 10:
        p.add_(scalars[0])


def _scalars_guard(scalars, p):
    if scalars.shape[0] > 2:  # a guard on the scalars' length (> 1 would be assumed: sizes are >= 2)
        p.add_(scalars[1])


def _two_d(scalars, p):
    p.add_(p[:, 0:1] * scalars[0])


def _float_arg(scalars, p, x):
    p.add_(x)


def _unused_scalars(scalars, p):
    p.add_(1.0)


def test_call_plans_read_from_dynamo_graphs():
    s, t, u = torch.ones(2), torch.zeros(7), torch.ones(7)
    assert _plan_of(_f, s, True, t, u) == ((0, 2), (1, 2), (0, 0), (1, 0), (1, 3))
    assert _plan_of(_digits, s, t, u) == ((0, 1), (1, 1), (0, 0), (1, 0), (1, 2))
    assert _plan_of(_va, s, t, u, argnames=("scalars",), varargs="ts") == ((0, 1), (1, 1), (0, 0), (1, 0),
                                                                            (1, 2))
    assert _plan_of(_scalars_guard, torch.ones(3), t) == ((0, 0), (1, 0), (0, 1), (1, 1))
    assert _plan_of(_unused_scalars, s, t) == ((0, 1), (1, 1))
    assert _plan_of(_scaled, s, t) is None  # returns a value
    assert _plan_of(_size_guard, s, torch.zeros(17)) is None  # a guard on a data length
    assert _plan_of(_f, s, True, torch.zeros(1), torch.ones(1)) is None  # length 1: specialized
    assert _plan_of(_two_d, s, torch.zeros(7, 3)) is None
    assert _plan_of(_float_arg, s, t, 2.5) is None  # a 0-dim tensor argument
    assert _plan_of(_caps, s, t, u) is None  # names it cannot map back
    assert _plan_of(_va, s, t, u, argnames=("scalars",), varargs=None) is None
    assert _plan_of(_f, s, True, t, u, argnames=("scalars", "flag", "q", "g")) is None

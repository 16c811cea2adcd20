"""Hypothesis strategies and comparison helpers shared by the test modules."""

from __future__ import annotations

import copy
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from optadvisor import kernels

EXAMPLES_SCALE = int(os.environ.get("EXAMPLES_SCALE", "1"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def examples(n: int) -> int:
    """Hypothesis example counts, bounded for CI; EXAMPLES_SCALE=10 for a deeper local search."""
    return n * EXAMPLES_SCALE


# torch's own tolerances (torch.testing.assert_close defaults) for float32/float64. For bf16/fp16 the atol
# is 2^-5 (bf16) / 2^-8 (fp16) of the gradients' unit scale: torch's own scalar and vectorized loops round
# differently (which one an element meets depends on the tensor's layout), and a one-ulp difference in a
# momentum buffer is carried for ~1/(1-momentum) steps, so after 20+ steps entries that pass near zero
# differ by a few low-precision ulps of the gradient scale while both sides are equally right.
TOLERANCES = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2 ** -5),
    torch.float16: dict(rtol=1e-3, atol=2 ** -8),
    torch.complex64: dict(rtol=1.3e-6, atol=1e-5),
}

def _sgd_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, momentum=st.sampled_from([0.0, 0.5, 0.9]), weight_decay=wd, maximize=st.booleans(),
        nesterov=st.booleans(), dampening=st.sampled_from([0.0, 0.0, 0.3]))).map(_legal_sgd)


def _adam_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99), (0.95, 0.5)]),
        eps=st.sampled_from([1e-8, 1e-3]), weight_decay=wd, amsgrad=st.booleans(), maximize=st.booleans()))


def _rmsprop_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, alpha=st.sampled_from([0.99, 0.9, 0.0]), eps=st.sampled_from([1e-8, 1e-2]), weight_decay=wd,
        momentum=st.sampled_from([0.0, 0.0, 0.5]), centered=st.booleans(), maximize=st.booleans()))


def _adagrad_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, lr_decay=st.sampled_from([0.0, 0.0, 0.01, 0.5]), weight_decay=wd,
        initial_accumulator_value=st.sampled_from([0.0, 0.0, 0.1, 1.0]), eps=st.sampled_from([1e-10, 1e-3]),
        maximize=st.booleans()))


def _nadam_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99), (0.95, 0.5)]),
        eps=st.sampled_from([1e-8, 1e-3]), weight_decay=wd, momentum_decay=st.sampled_from([4e-3, 0.0, 0.5]),
        decoupled_weight_decay=st.booleans(), maximize=st.booleans()))


def _radam_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99), (0.95, 0.5)]),
        eps=st.sampled_from([1e-8, 1e-3]), weight_decay=wd, decoupled_weight_decay=st.booleans(),
        maximize=st.booleans()))


def _schedulefree_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.95, 0.5)]), eps=st.sampled_from([1e-8, 1e-3]),
        weight_decay=wd, warmup_steps=st.sampled_from([0, 0, 3, 50]), r=st.sampled_from([0.0, 0.0, 0.5]),
        weight_lr_power=st.sampled_from([2.0, 2.0, 0.0, 1.0])))


def _lion_space(lr, wd):
    return st.fixed_dictionaries(dict(
        lr=lr, betas=st.sampled_from([(0.9, 0.99), (0.95, 0.98), (0.0, 0.5), (0.9, 0.0)]), weight_decay=wd,
        decoupled_weight_decay=st.booleans()))


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer as every generic test sees it: ours and torch's class (from the catalog), the space of
    valid hyperparameters the property tests draw from, and a configuration whose state is worth checking
    (momentum where the optimizer has it)."""

    name: str
    ours: type
    torch: type
    space: Callable[[Any, Any], Any]  # (lr strategy, weight-decay strategy) -> strategy of kwargs
    stateful: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)  # every state tensor and option in play (checkpoints)


# The hyperparameter space of each optimizer: the one thing a new optimizer's tests must add. Everything
# else (the classes, torch's counterpart) comes from the catalog, and a catalog optimizer without a case
# here fails test_every_catalog_optimizer_has_a_case.
_SPACES = {
    "SGD": (_sgd_space, {"momentum": 0.9}, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "Adam": (_adam_space, {}, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "AdamW": (_adam_space, {}, dict(lr=0.01)),
    "RMSprop": (_rmsprop_space, {"momentum": 0.9}, dict(lr=0.01, momentum=0.5, centered=True)),
    "Adagrad": (_adagrad_space, {"initial_accumulator_value": 0.1},
                dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    "Lion": (_lion_space, {}, dict(lr=0.01, betas=(0.95, 0.98), weight_decay=0.1)),
    "NAdam": (_nadam_space, {}, dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01, decoupled_weight_decay=True)),
    "RAdam": (_radam_space, {}, dict(lr=0.01, weight_decay=0.1)),
    "ScheduleFreeAdamW": (_schedulefree_space, {}, dict(lr=0.01, weight_decay=0.1, warmup_steps=3, r=0.5)),
}


def _reference(torch_cls: type) -> type:
    """The class the generic tests compare with: torch's, or a reference package's that lacks torch's
    implementation selector ``foreach`` (lion-pytorch's), which the tests pass to torch's for-loop path."""
    import inspect

    if "foreach" in inspect.signature(torch_cls).parameters:
        return torch_cls

    def __init__(self, params, *args, foreach=None, **kwargs):
        torch_cls.__init__(self, params, *args, **kwargs)

    return type(torch_cls.__name__, (torch_cls,), {"__init__": __init__, "__module__": torch_cls.__module__})


#: running under `mutmut run`: its trampolines add a frame to every call (warnings' stack levels point elsewhere)
#: and torch.compile cannot trace them (code they reach runs eager)
UNDER_MUTMUT = "MUTANT_UNDER_TEST" in os.environ

def _in_train_mode(cls: type) -> type:
    """``cls`` put in train mode at construction, for an optimizer with train()/eval() (schedule-free AdamW,
    ours and the reference) that refuses a step in eval mode, its state when built: the generic tests step
    right away, as for every other optimizer. tests/test_schedulefree.py tests the modes themselves."""
    if not hasattr(cls, "train"):
        return cls

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        self.train()

    # named as the class (messages name it), found by pickle under a name of its own in this module
    where = f"_in_train_mode_{cls.__module__.replace('.', '_')}_{cls.__name__}"
    wrapped = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": where})
    globals()[where] = wrapped
    return wrapped


def _grads_kept(cls: type) -> type:
    """A reference whose ``step()`` overwrites ``p.grad`` (schedulefree's divides it in place by its
    denominator) with the gradients put back afterwards: ours leaves them alone (tested), and the generic tests
    accumulate into gradients across steps. The parameters and state are the reference's own."""
    if "schedulefree" not in cls.__module__:
        return cls

    def step(self, closure=None):
        grads = [(p, p.grad.clone()) for g in self.param_groups for p in g["params"] if p.grad is not None]
        loss = cls.step(self, closure)
        for p, g in grads:
            p.grad.copy_(g)
        return loss

    return type(cls.__name__, (cls,), {"step": step, "__module__": cls.__module__})


OPTIMIZER_CASES = {e.name: OptimizerCase(e.name, _in_train_mode(e.cls),
                                         _in_train_mode(_grads_kept(_reference(e.torch_class()))),
                                         *_SPACES[e.name])
                   for e in kernels.catalog.optimizers() if e.name in _SPACES}
OPTIMIZERS = {name: (c.ours, c.torch) for name, c in OPTIMIZER_CASES.items()}


@functools.cache
def with_threshold(cls: type, numel: int | None) -> type:
    """``cls`` reading gradients of at least ``numel`` elements where they lie (rather than copying them into
    the flat buffer): with a small ``numel`` the tests' small shapes take that path too. None: ``cls``."""
    if numel is None:
        return cls
    return type(cls.__name__, (cls,), {"direct_grad_min_numel": numel, "__module__": cls.__module__})


def hyperparams(name: str):
    """Random valid hyperparameters for one optimizer (torch's argument names)."""
    lr = st.sampled_from([1e-3, 1e-2, 0.1, 0.5])
    wd = st.sampled_from([0.0, 0.0, 1e-2, 0.1])
    return OPTIMIZER_CASES[name].space(lr, wd)


def _legal_sgd(kw):
    if kw["nesterov"] and (kw["momentum"] == 0 or kw["dampening"] != 0):
        kw["nesterov"] = False
    return kw


shape = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
# (shape, non-contiguous?, frozen?)
param_spec = st.tuples(shape, st.booleans(), st.booleans())
param_specs = st.lists(param_spec, min_size=1, max_size=6)


def make_params(specs, dtype, seed, device="cpu"):
    """Parameters from specs, built the same way for every call with the same seed (drawn on the CPU, then
    moved: the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shp, noncontig, frozen in specs:
        wide = torch.complex128 if dtype.is_complex else torch.float64
        if noncontig:  # a strided view: every other element of a bigger tensor
            data = torch.randn((*shp, 2), generator=gen, dtype=wide).to(dtype)[..., 1]
        else:
            data = torch.randn(shp, generator=gen, dtype=wide).to(dtype)
        if device != "cpu":
            data = data.to(device) if not noncontig else torch.stack([torch.zeros_like(data), data], -1).to(device)[..., 1]
        p = torch.nn.Parameter(data, requires_grad=not frozen)
        params.append(p)
    return params


def make_grads(params, steps, seed, none_prob=0.2, scale=1.0):
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        row = []
        for p in params:
            drop = torch.rand((), generator=gen).item() < none_prob
            if not p.requires_grad or drop:
                row.append(None)
            else:
                wide = torch.complex128 if p.dtype.is_complex else torch.float64
                g = torch.randn(p.shape, generator=gen, dtype=wide) * scale
                row.append(g.to(p.dtype).to(p.device))
        out.append(row)
    return out


# thresholds the property tests draw from: every gradient read in place, some, or none (the default)
DIRECT_THRESHOLDS = st.sampled_from([1, 8, 1 << 16])


def groups_of(params, kwargs, split):
    if not split or len(params) < 2:
        return params
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": kwargs.get("lr", 1e-3) * 0.5}]


def run_both(name, kwargs, specs, dtype, steps, *, fused, seed=0, split=False, scheduler=False,
             none_prob=0.2, grad_scale=1.0, direct=None, device="cpu"):
    """Train the same params with torch.optim (for-loop path) and ours; return both optimizers/params.
    ``direct``: ours reads gradients of at least that many elements where they lie (None: the default)."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    ours_cls = with_threshold(ours_cls, direct)
    ref_params = make_params(specs, dtype, seed, device)
    our_params = make_params(specs, dtype, seed, device)
    ref = torch_cls(groups_of(ref_params, kwargs, split), foreach=False, **kwargs)
    ours = ours_cls(groups_of(our_params, kwargs, split), fused=fused, **kwargs)
    scheds = []
    if scheduler:
        scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (ref, ours)]
    for row in make_grads(ref_params, steps, seed, none_prob, grad_scale):
        for p, q, g in zip(ref_params, our_params, row):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ref.step()
        ours.step()
        for s in scheds:
            s.step()
    return ref, ours, ref_params, our_params


def assert_same(ref, ours, ref_params, our_params, dtype, exact=False):
    tol = dict(rtol=0, atol=0) if exact else TOLERANCES[dtype]
    for i, (p, q) in enumerate(zip(ref_params, our_params)):
        torch.testing.assert_close(q.detach(), p.detach(), equal_nan=True, msg=lambda m: f"param {i}: {m}",
                                   **tol)
    rs, os_ = ref.state_dict()["state"], ours.state_dict()["state"]
    assert list(rs) == list(os_), (list(rs), list(os_))  # torch's order: checkpoints are diffed and read in order
    for pid in rs:
        assert list(rs[pid]) == list(os_[pid]), (pid, list(rs[pid]), list(os_[pid]))
        for key in rs[pid]:
            a, b = rs[pid][key], os_[pid][key]
            if key == "step":
                assert float(a) == float(b), (pid, key)
                assert a.dtype == b.dtype and a.device == b.device
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, (pid, key)
            torch.testing.assert_close(b, a, equal_nan=True, msg=lambda m: f"state {pid}/{key}: {m}", **tol)


def detached_state_dict(opt):
    return copy.deepcopy(opt.state_dict())


def momentum_kwargs(name, lr):
    """A configuration with state worth checking: momentum where the optimizer has it."""
    return dict(lr=lr, **OPTIMIZER_CASES[name].stateful)


def twin_models(name, model, *, fused, **kwargs):
    """(model, ours, twin, ref): a deep copy of ``model`` trained by torch's for-loop path beside ours."""
    twin = copy.deepcopy(model)
    ours_cls, torch_cls = OPTIMIZERS[name]
    return (model, ours_cls(model.parameters(), fused=fused, **kwargs),
            twin, torch_cls(twin.parameters(), foreach=False, **kwargs))


def _onehot(y, c, lo=0.0):
    return torch.nn.functional.one_hot(y, c).float() * (1 - lo) + lo * (torch.nn.functional.one_hot(y, c) == 0)


@dataclass(frozen=True)
class LossCase:
    """One loss as the generic loss tests see it: its catalog entry's class and functional, and ``call`` /
    ``reference``: the loss and its torch (or formula) reference on a model's output ``out`` (batch, 5) and
    class labels ``y``, with ``kwargs`` for the class and the functional alike."""

    name: str
    module: type
    functional: Callable[..., Any]
    call: Callable[[Any, Any, Callable[..., Any]], Any]   # (out, y, fn) -> fn(inputs..., **kwargs)
    reference: Callable[[Any, Any], Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


_F = torch.nn.functional
_LOSS_SPECS = {
    "MSELoss": (lambda o, y, fn, **kw: fn(o, _onehot(y, 5), **kw), lambda o, y: _F.mse_loss(o, _onehot(y, 5)), {}),
    "HuberLoss": (lambda o, y, fn, **kw: fn(o, _onehot(y, 5), **kw),
                  lambda o, y: _F.huber_loss(o, _onehot(y, 5), delta=0.5), {"delta": 0.5}),
    "CrossEntropyLoss": (lambda o, y, fn, **kw: fn(o, y, **kw),
                         lambda o, y: _F.cross_entropy(o, y, label_smoothing=0.1), {"label_smoothing": 0.1}),
    "LinearCrossEntropyLoss": (lambda o, y, fn, **kw: fn(o[:, :4], _W, y, **kw),
                               lambda o, y: _F.cross_entropy(o[:, :4] @ _W.T, y), {}),
    "MultiMarginLoss": (lambda o, y, fn, **kw: fn(o, y, **kw),
                        lambda o, y: _F.multi_margin_loss(o, y, p=2), {"p": 2}),
    "HingeLoss": (lambda o, y, fn, **kw: fn(o, _onehot(y, 5) * 2 - 1, **kw),
                  lambda o, y: torch.clamp(1 - o * (_onehot(y, 5) * 2 - 1), min=0).mean(), {}),
}
_W = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))

LOSS_CASES = {e.name: LossCase(e.name, e.cls, e.functional, *_LOSS_SPECS[e.name])
              for e in kernels.catalog.losses() if e.name in _LOSS_SPECS}


def reset_compile_state(monkeypatch, mode: str) -> None:
    """Empty kernel caches of ``kernels._runtime.compile`` for one test, and OPTADVISOR_COMPILE set to ``mode``."""
    from optadvisor.kernels._runtime import compile as _compile

    for name, empty in (("_compiled", {}), ("_broken", {}), ("_ready", {}), ("_ready_keys", set()),
                        ("_scheduled", set()), ("_eager_work", {}), ("_unwarned", {})):
        monkeypatch.setattr(_compile, name, empty)
    monkeypatch.setenv(_compile.ENV_VAR, mode)

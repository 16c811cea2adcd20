"""kernels.Adafactor against torch.optim.Adafactor: values and state bit for bit over random shapes (scalars,
vectors, matrices, higher ranks), hyperparameters and steps; checkpoints both ways; many instances in one
process; refusals."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import examples, make_grads, make_params, param_specs

from optadvisor import kernels

adafactor_kwargs = st.fixed_dictionaries(dict(
    lr=st.sampled_from([1e-2, 1e-3, 0.5]), beta2_decay=st.sampled_from([-0.8, -0.5, 0.0]),
    eps=st.sampled_from([(None, 1e-3), (1e-30, 1e-3), (None, 0.0)]), d=st.sampled_from([1.0, 2.0]),
    weight_decay=st.sampled_from([0.0, 0.1]), maximize=st.booleans()))


def _run(specs, kw, dtype, steps, seed, none_prob=0.2):
    specs = [s for s in specs if 0 not in s[0]] or [((3,), False, False)]  # torch's divides by an empty one's size
    a, b = make_params(specs, dtype, seed), make_params(specs, dtype, seed)
    ours, ref = kernels.Adafactor(a, foreach=False, **kw), torch.optim.Adafactor(b, foreach=False, **kw)
    for row in make_grads(a, steps, seed, none_prob):
        for p, q, g in zip(a, b, row):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ours.step()
        ref.step()
    return a, b, ours, ref


def _same(a, b, ours, ref):
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    rs, os_ = ref.state_dict(), ours.state_dict()
    assert rs["param_groups"] == os_["param_groups"]
    assert list(rs["state"]) == list(os_["state"])
    for pid, entry in rs["state"].items():
        assert list(entry) == list(os_["state"][pid])
        for key, value in entry.items():
            assert torch.equal(value, os_["state"][pid][key]) and value.dtype == os_["state"][pid][key].dtype, key


def test_an_empty_parameter_is_stepped_not_divided_by():
    """torch's raises ZeroDivisionError on a parameter with no elements (it divides by the size); ours
    counts the step and changes nothing."""
    e, w = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.ones(2, 3))
    opt = kernels.Adafactor([e, w])
    e.grad, w.grad = torch.zeros(0, 3), torch.ones(2, 3)
    opt.step()
    assert float(opt.state[e]["step"]) == 1 and opt.state[e]["row_var"].shape == (0, 1)
    with pytest.raises(ZeroDivisionError):
        ref_e = torch.nn.Parameter(torch.zeros(0, 3))
        ref_e.grad = torch.zeros(0, 3)
        torch.optim.Adafactor([ref_e]).step()


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=param_specs, kw=adafactor_kwargs, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       steps=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_matches_torch_bit_for_bit(specs, kw, dtype, steps, seed):
    _same(*_run(specs, kw, dtype, steps, seed))


def test_higher_ranks_factor_the_last_two_dimensions():
    a, b, ours, ref = _run([((2, 3, 4, 5), False, False), ((6,), False, False), ((), False, False)],
                           dict(lr=0.05), torch.float32, 5, 0, none_prob=0.0)
    _same(a, b, ours, ref)
    st0 = ours.state[a[0]]
    assert st0["row_var"].shape == (2, 3, 4, 1) and st0["col_var"].shape == (2, 3, 1, 5)
    assert set(ours.state[a[1]]) == {"step", "variance"}


@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_checkpoints_interchange(direction):
    specs = [((6, 4), False, False), ((4,), False, False)]
    kw = dict(lr=0.05, weight_decay=0.01)
    a, b, ours, ref = _run(specs, kw, torch.float32, 3, 1, none_prob=0.0)
    src, dst_cls = (ours, torch.optim.Adafactor) if direction == "ours->torch" else (ref, kernels.Adafactor)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in (a if direction == "ours->torch" else b)]
    dst = dst_cls(twin, **kw)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    grads = make_grads(twin, 3, 9, 0.0)
    for o, ps in ((src, a if direction == "ours->torch" else b), (dst, twin)):
        for row in grads:
            for p, g in zip(ps, row):
                p.grad = g.clone()
            o.step()
    for p, q in zip(a if direction == "ours->torch" else b, twin):
        assert torch.equal(p, q)


def test_many_instances_keep_their_own_state():
    runs = [_run([((5, 3), False, False), ((7,), False, False)], dict(lr=lr), torch.float32, 4, s, 0.0)
            for s, lr in enumerate([1e-2, 0.1, 1e-3])]
    for a, b, ours, ref in runs:
        _same(a, b, ours, ref)


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    for eps in [(1e-3,), (None, 1e-3, 1.0), 1e-3]:
        with pytest.raises(ValueError, match=re.escape(f"Adafactor: eps must be a pair (epsilon1 or None, "
                                                       f"epsilon2), got {eps!r}")):
            kernels.Adafactor([p], eps=eps)
    for kw, message in [(dict(lr=-1.0), "Learning rate should be >= 0 but is: -1.0"),
                        (dict(beta2_decay=0.5), "beta2_decay should be <= 0 but is: 0.5"),
                        (dict(d=0.5), "Clipping threshold d should be >= 1 but is: 0.5"),
                        (dict(eps=(-1.0, 1e-3)), "epsilon1 should be >= 0 but is: -1.0")]:
        for cls in (kernels.Adafactor, torch.optim.Adafactor):
            with pytest.raises(ValueError, match=re.escape(message)):
                cls([p], **kw)
    c = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        kernels.Adafactor([c]).step()
    opt = kernels.Adafactor([p])
    p.grad = torch.ones_like(p)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["row_var"] = torch.zeros(3, 1)
    with pytest.raises(ValueError, match=r"state of parameter 0: 'row_var' must be a tensor of shape \(2, 1\)"):
        opt.load_state_dict(bad)
    assert torch.equal(opt.state[p]["row_var"], good["state"][0]["row_var"])

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
    weight_decay=st.sampled_from([0.0, 0.1, 1.0]), maximize=st.booleans()))


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


def test_messages_word_for_word_and_boundaries():
    """Found by mutation testing (mutmut, kernels.optim.adafactor: 266 of 333 killed before these): the
    refusals' exact words, lr 0 and a one-element tensor lr accepted, a two-element one refused."""
    p = torch.nn.Parameter(torch.ones(3, 2))
    for kw, message in [(dict(weight_decay=-1.0), "weight_decay should be >= 0 but is: -1.0"),
                        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
                        (dict(eps=(None, -1.0)), "epsilon2 should be >= 0 but is: -1.0")]:
        with pytest.raises(ValueError) as ours:
            kernels.Adafactor([p], **kw)
        with pytest.raises(ValueError) as theirs:
            torch.optim.Adafactor([p], **kw)
        assert str(ours.value) == str(theirs.value) == message
    with pytest.raises(ValueError) as info:
        kernels.Adafactor([p], eps=(1e-3,))
    assert str(info.value) == ("Adafactor: eps must be a pair (epsilon1 or None, epsilon2), got (0.001,) (1); "
                               "torch.optim.Adafactor fails at its first step with 'too many values to unpack' "
                               "or 'not enough values to unpack' for it")
    with pytest.raises(ValueError, match=r"got 0.001 \(float\)"):
        kernels.Adafactor([p], eps=1e-3)
    for lr in (0.0, torch.tensor(0.05)):
        a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3, 2))
        ours, ref = kernels.Adafactor([a], lr=lr), torch.optim.Adafactor([b], lr=lr, foreach=False)
        for opt, q in ((ours, a), (ref, b)):
            q.grad = torch.full((3, 2), 0.5)
            opt.step()
        assert torch.equal(a, b)
    assert kernels.Adafactor([p]).param_groups[0]["foreach"] is None


def test_an_old_checkpoint_with_number_steps_loads_as_torchs():
    """torch's __setstate__ turns a checkpoint's Python-number step into a float32 tensor (and gives groups
    without 'foreach' None): ours too, and training goes on equally."""
    a, b, ours, ref = _run([((4, 3), False, False), ((5,), False, False)], dict(lr=0.05), torch.float32, 2, 3, 0.0)
    sd = copy.deepcopy(ref.state_dict())
    for entry in sd["state"].values():
        entry["step"] = float(entry["step"])
    for g in sd["param_groups"]:
        del g["foreach"]
    twin_a = [torch.nn.Parameter(p.detach().clone()) for p in a]
    twin_b = [torch.nn.Parameter(p.detach().clone()) for p in b]
    mine, theirs = kernels.Adafactor(twin_a, lr=0.05), torch.optim.Adafactor(twin_b, lr=0.05)
    mine.load_state_dict(copy.deepcopy(sd))
    theirs.load_state_dict(copy.deepcopy(sd))
    for opt in (mine, theirs):
        for entry in opt.state.values():
            assert entry["step"].dtype == torch.float32 and float(entry["step"]) == 2.0
        assert opt.param_groups[0]["foreach"] is None
    for row in make_grads(twin_a, 2, 4, 0.0):
        for p, q, g in zip(twin_a, twin_b, row):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
    for p, q in zip(twin_a, twin_b):
        assert torch.equal(p, q)


def test_bad_checkpoints_are_refused_word_for_word_and_change_nothing():
    p, v = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    opt = kernels.Adafactor([p, v])
    p.grad, v.grad = torch.ones(2, 3), torch.ones(4)
    opt.step()
    good = copy.deepcopy(opt.state_dict())

    def edited(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        ({"state": {}}, "a state_dict needs the keys 'state' and 'param_groups' (as returned by "
                        "optimizer.state_dict())"),
        ({"param_groups": []}, "a state_dict needs the keys 'state' and 'param_groups' (as returned by "
                               "optimizer.state_dict())"),
        ([good], "a state_dict needs the keys 'state' and 'param_groups' (as returned by optimizer.state_dict())"),
        (edited(lambda sd: sd["param_groups"][0]["params"].pop()),
         "loaded state dict's groups or parameters do not match this optimizer's (1 groups, 1 parameters; "
         "this optimizer: 1, 2)"),
        (edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))),
         "loaded state dict's groups or parameters do not match this optimizer's (2 groups, 2 parameters; "
         "this optimizer: 1, 2)"),
        (edited(lambda sd: sd["state"][0].pop("step")), "state of parameter 0 lacks a scalar 'step'"),
        (edited(lambda sd: sd["state"][1].__setitem__("step", True)), "state of parameter 1 lacks a scalar 'step'"),
        (edited(lambda sd: sd["state"][1].__setitem__("step", torch.ones(2))),
         "state of parameter 1 lacks a scalar 'step'"),
        (edited(lambda sd: sd["state"][0].__setitem__("col_var", [0.0])),
         "state of parameter 0: 'col_var' must be a tensor of shape (1, 3) for a parameter of shape (2, 3) "
         "(got list)"),
        (edited(lambda sd: sd["state"][1].__setitem__("variance", torch.zeros(3))),
         "state of parameter 1: 'variance' must be a tensor of shape (4,) for a parameter of shape (4,) "
         "(got (3,))"),
        (edited(lambda sd: sd["state"][1].pop("variance")),
         "state of parameter 1: 'variance' must be a tensor of shape (4,) for a parameter of shape (4,) "
         "(got NoneType)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError) as info:
            opt.load_state_dict(bad)
        assert str(info.value) == message
        assert torch.equal(opt.state[p]["row_var"], good["state"][0]["row_var"])
    later = edited(lambda sd: sd["state"][0].__setitem__("step", torch.tensor(7.0)))
    opt.load_state_dict(later)  # a good one still loads, and a number step is taken as is
    assert float(opt.state[p]["step"]) == 7.0


def test_what_the_second_mutation_run_left():
    """epsilon1 = 0 is allowed; gradients small enough that epsilon1 (the dtype's machine epsilon by default)
    clamps the variance estimate; a copy or pickle of an optimizer with a parameter that never stepped; a bad
    state after a parameter without state is still found."""
    import pickle

    kernels.Adafactor([torch.nn.Parameter(torch.ones(2))], eps=(0.0, 1e-3))
    a, b, ours, ref = _run([((6, 5), False, False), ((7,), False, False)], dict(lr=0.05), torch.float32, 1, 0, 0.0)
    for p, q in zip(a, b):
        g = torch.randn(p.shape) * 1e-6
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    _same(a, b, ours, ref)
    idle = torch.nn.Parameter(torch.ones(3))
    opt = kernels.Adafactor([a[0], idle])
    a[0].grad = torch.ones_like(a[0])
    opt.step()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert [len(s) for s in copied.state.values()] == [3]
    sd = copy.deepcopy(opt.state_dict())
    other = kernels.Adafactor([idle, a[0]])
    bad = {"state": {1: sd["state"][0]}, "param_groups": [dict(sd["param_groups"][0], params=[0, 1])]}
    bad["state"][1] = dict(bad["state"][1], row_var=torch.zeros(9, 1))
    with pytest.raises(ValueError, match=r"state of parameter 1: 'row_var' must be a tensor of shape \(6, 1\)"):
        other.load_state_dict(bad)

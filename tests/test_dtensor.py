"""kernels' optimizers on DTensor parameters in this process (a one-rank gloo group): against torch.optim on the
same DTensors, state as DTensors in torch's layout, checkpoints, moved shards, kept gradients, bad input.

tests/test_fsdp.py proves the same code under real sharding (2 processes, FSDP2, DCP); this file runs where
mutation testing and a debugger can see it: a one-rank mesh still takes every DTensor path (shard-local
updates, the packed small shards, state exposed as DTensors, loading a re-placed or plain state)."""

import copy
import io
import re

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    DIRECT_THRESHOLDS,
    OPTIMIZER_CASES,
    OPTIMIZERS,
    TOLERANCES,
    examples,
    hyperparams,
    make_grads,
    make_params,
    shape,
    with_threshold,
)

from optadvisor import kernels
from optadvisor.kernels._runtime import native as _native, optimizer as _optimizer

tensor_mod = pytest.importorskip("torch.distributed.tensor", reason="this torch has no DTensor")
DTensor, Partial, Replicate, Shard = (tensor_mod.DTensor, tensor_mod.Partial, tensor_mod.Replicate,
                                      tensor_mod.Shard)
distribute_tensor = tensor_mod.distribute_tensor


@pytest.fixture(scope="module")
def mesh():
    """A one-rank CPU mesh over an in-memory store; the process group is gone after this module."""
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required on this platform")
    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _placements(ndim):
    return st.sampled_from([Replicate(), *[Shard(d) for d in range(ndim)]]).map(lambda p: [p])


def _distribute(params, mesh, placements):
    return [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, pl), requires_grad=p.requires_grad)
            for p, pl in zip(params, placements)]


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _set_grads(params, row, placements, mesh):
    for p, g, pl in zip(params, row, placements):
        p.grad = None if g is None else distribute_tensor(g.clone(), mesh, pl)


def _train(pairs, rows, placements, mesh):
    """Each row of gradients given to every (optimizer, parameters) pair, then a step of each."""
    for row in rows:
        for opt, params in pairs:
            _set_grads(params, row, placements, mesh)
            opt.step()


_SCALAR_KEYS = {"step", *(k for e in kernels.catalog.optimizers() for k in getattr(e.cls, "_host_state", {}))}


def _assert_same(ref, ours, ref_params, our_params, dtype=torch.float32):
    """Full parameters and state equal; every state tensor but ``step`` a DTensor laid out as its parameter,
    in torch's key order."""
    tol = TOLERANCES[dtype]
    for i, (p, q) in enumerate(zip(ref_params, our_params)):
        assert isinstance(q, DTensor) and q.placements == p.placements
        torch.testing.assert_close(_full(q).detach(), _full(p).detach(), equal_nan=True, msg=lambda m: f"param {i}: {m}", **tol)
    rs, os_ = ref.state_dict()["state"], ours.state_dict()["state"]
    assert list(rs) == list(os_)
    for pid in rs:
        assert list(rs[pid]) == list(os_[pid]), (pid, list(rs[pid]), list(os_[pid]))
        for key, a in rs[pid].items():
            b = os_[pid][key]
            if key in _SCALAR_KEYS:  # step, and scalars kept beside it (NAdam's mu_product): plain, as torch's
                assert float(a) == float(b) and a.dtype == b.dtype and not isinstance(b, DTensor), (pid, key)
                continue
            assert isinstance(b, DTensor), (pid, key, type(b))
            assert b.placements == a.placements and b.device_mesh == a.device_mesh and b.shape == a.shape
            assert b.to_local().shape == a.to_local().shape
            torch.testing.assert_close(_full(b), _full(a), equal_nan=True, msg=lambda m: f"state {pid}/{key}: {m}", **tol)


@st.composite
def _setups(draw, name):
    shapes = draw(st.lists(shape, min_size=1, max_size=5))
    specs = [(s, False, draw(st.booleans()) and draw(st.booleans())) for s in shapes]  # 1 in 4 frozen
    placements = [draw(_placements(len(s))) for s in shapes]
    return dict(kwargs=draw(hyperparams(name)), specs=specs, placements=placements,
                direct=draw(DIRECT_THRESHOLDS), steps=draw(st.integers(1, 5)),
                none_prob=draw(st.sampled_from([0.0, 0.3])), seed=draw(st.integers(0, 2 ** 16)))


def _train_both(mesh, name, kwargs, specs, placements, direct, steps, none_prob, seed, *, fused=False,
                keep_grads=False, split=False):
    ours_cls, torch_cls = OPTIMIZERS[name]
    base = make_params(specs, torch.float32, seed)
    ref_params, our_params = _distribute(base, mesh, placements), _distribute(base, mesh, placements)

    def groups(params):
        if not split or len(params) < 2:
            return params
        return [{"params": params[:1]}, {"params": params[1:], "lr": kwargs["lr"] * 0.5}]
    ref = torch_cls(groups(ref_params), foreach=False, **kwargs)
    ours = with_threshold(ours_cls, direct)(groups(our_params), fused=fused, **kwargs)
    for row in make_grads(base, steps, seed, none_prob):
        if keep_grads:  # gradients accumulate into the existing ones after zero_grad(set_to_none=False)
            for o in (ref, ours):
                o.zero_grad(set_to_none=False)
            for params in (ref_params, our_params):
                for p, g, pl in zip(params, row, placements):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = distribute_tensor(torch.zeros_like(g), mesh, pl)
                    p.grad += distribute_tensor(g.clone(), mesh, pl)
        else:
            _set_grads(ref_params, row, placements, mesh)
            _set_grads(our_params, row, placements, mesh)
        ref.step()
        ours.step()
    return ref, ours, ref_params, our_params


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@settings(max_examples=examples(6), deadline=None)
@given(data=st.data())
def test_dtensor_parameters_train_as_torch(mesh, name, data):
    """Random hyperparameters, shapes (0-dim and empty too), placements, missing gradients (so step counts
    differ and the small shards cannot be packed), and every threshold between packed and in-place shards."""
    setup = data.draw(_setups(name))
    ref, ours, rp, op = _train_both(mesh, name, **setup, split=data.draw(st.booleans()))
    _assert_same(ref, ours, rp, op)


@pytest.mark.parametrize("native", ["C kernels", "torch ops"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_dtensor_small_shards_packed_and_large_in_place_compiled(mesh, name, native, monkeypatch):
    """The fused path (the C kernels where they apply on the CPU, else compiled torch ops): three small shards
    packed into one call and two updated where they lie, every gradient present so the packed call runs at
    every step; then one missing gradient."""
    compiled = []
    if native == "torch ops":
        monkeypatch.setenv(_native.ENV_VAR, "0")
        real = _optimizer.run_fused
        monkeypatch.setattr(_optimizer, "run_fused", lambda *a, **kw: compiled.append(1) or real(*a, **kw))
    specs = [((3,), False, False), ((2, 2), False, False), ((), False, False), ((6, 4), False, False),
             ((5, 3), False, False)]
    placements = [[Replicate()], [Shard(1)], [Replicate()], [Shard(0)], [Shard(1)]]
    kwargs = {**OPTIMIZER_CASES[name].full, "lr": 0.05}
    ref, ours, rp, op = _train_both(mesh, name, kwargs, specs, placements, direct=8, steps=4, none_prob=0.0,
                                    seed=3, fused=True)
    bucket, = ours._buckets
    assert bucket.sharded and bucket.n_small == 3 and bucket.positions == [0, 1, 2, 3, 4]
    assert bucket.common_step == 4
    # without the C kernels every update ran compiled: the packed call and the two large shards, 4 steps
    assert len(compiled) == (12 if native == "torch ops" else 0)
    _assert_same(ref, ours, rp, op)
    for i in (0, 3):  # parameters 0 and 3 miss a step: no common step any more, the small ones go one by one
        rp[i].grad = op[i].grad = None
    for j in (1, 2, 4):
        g = torch.full(rp[j].shape, 0.25)
        rp[j].grad = distribute_tensor(g.clone(), mesh, placements[j])
        op[j].grad = distribute_tensor(g.clone(), mesh, placements[j])
    ref.step()
    ours.step()
    assert bucket.common_step is None and bucket.host_steps == [4, 5, 5, 4, 5]
    _assert_same(ref, ours, rp, op)
    ours.step()  # same gradients again: the packed call is skipped while the small shards' steps differ
    ref.step()
    _assert_same(ref, ours, rp, op)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_dtensor_gradients_kept_by_zero_grad_are_zeroed_in_place(mesh, name):
    """``zero_grad(set_to_none=False)`` zeroes each DTensor gradient where it is (FSDP2 owns them): the same
    gradient objects, zero, and training by accumulation equals torch's."""
    specs = [((4, 3), False, False), ((5,), False, False), ((2,), False, True)]
    placements = [[Shard(0)], [Replicate()], [Replicate()]]
    kwargs = dict(lr=0.05, **OPTIMIZER_CASES[name].stateful)
    ref, ours, rp, op = _train_both(mesh, name, kwargs, specs, placements, direct=1, steps=3, none_prob=0.0,
                                    seed=5, keep_grads=True)
    _assert_same(ref, ours, rp, op)
    grads = [p.grad for p in op]
    ours.zero_grad(set_to_none=False)
    assert [p.grad for p in op] == grads and grads[2] is None
    for g in grads[:2]:
        assert isinstance(g, DTensor) and not g.requires_grad and not _full(g).any()


def test_dtensor_state_is_exposed_after_the_first_step_only_for_stepped_parameters(mesh):
    base = make_params([((4,), False, False), ((3, 2), False, False)], torch.float32, 0)
    params = _distribute(base, mesh, [[Shard(0)], [Shard(1)]])
    opt = kernels.Adam(params, lr=0.1)
    params[1].grad = distribute_tensor(torch.ones(3, 2), mesh, [Shard(1)])
    opt.step()
    assert params[0] not in opt.state
    entry = opt.state[params[1]]
    assert list(entry) == ["step", "exp_avg", "exp_avg_sq"] and float(entry["step"]) == 1
    assert entry["exp_avg"].placements == (Shard(1),) and entry["exp_avg"].shape == (3, 2)
    torch.testing.assert_close(entry["exp_avg"].full_tensor(), torch.full((3, 2), 0.1))
    # the exposed state is the optimizer's own: the next step's update is visible through it
    opt.step()
    assert float(entry["step"]) == 2
    torch.testing.assert_close(entry["exp_avg"].full_tensor(), torch.full((3, 2), 0.19))
    for direct in (1, 8, 1 << 16):  # no momentum: no state, and every shard updated (packed or in place)
        sgd = with_threshold(kernels.SGD, direct)(_distribute(base + base, mesh, [[Shard(0)], [Replicate()]] * 2),
                                                  lr=0.1)
        for p in sgd.param_groups[0]["params"]:
            p.grad = distribute_tensor(torch.ones(p.shape), mesh, p.placements)
        sgd.step()
        assert dict(sgd.state) == {}
        for p, b in zip(sgd.param_groups[0]["params"], base + base):
            torch.testing.assert_close(p.full_tensor(), b.detach() - 0.1)


def _checkpoint_case(mesh, name):
    specs = [((6,), False, False), ((3, 4), False, False), ((), False, False)]
    placements = [[Shard(0)], [Shard(1)], [Replicate()]]
    base = make_params(specs, torch.float32, 11)
    grads = make_grads(base, 6, 11, none_prob=0.0)
    kwargs = dict(OPTIMIZER_CASES[name].full)
    return base, grads, placements, kwargs


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("first, second", [("ours", "ours"), ("torch", "ours"), ("ours", "torch")])
def test_dtensor_checkpoints_resume_as_an_uninterrupted_run(mesh, name, first, second):
    """3 steps, state_dict (DTensor state), a fresh optimizer on fresh DTensor parameters loads it, 3 more
    steps: equal to 6 uninterrupted steps of torch.optim; between ours and torch both ways."""
    classes = dict(zip(("ours", "torch"), OPTIMIZERS[name]))
    extra = {"ours": {}, "torch": {"foreach": False}}
    base, grads, placements, kwargs = _checkpoint_case(mesh, name)
    whole = _distribute(base, mesh, placements)
    ref = classes["torch"](whole, foreach=False, **kwargs)
    _train([(ref, whole)], grads, placements, mesh)
    params = _distribute(base, mesh, placements)
    opt = classes[first](params, **extra[first], **kwargs)
    _train([(opt, params)], grads[:3], placements, mesh)
    saved = copy.deepcopy(opt.state_dict())
    resumed = _distribute([p.full_tensor().detach() for p in params], mesh, placements)
    opt2 = classes[second](resumed, **extra[second], **kwargs)
    opt2.load_state_dict(saved)
    _train([(opt2, resumed)], grads[3:], placements, mesh)
    _assert_same(ref, opt2, whole, resumed) if second == "ours" else _assert_same(opt2, ref, resumed, whole)


@pytest.mark.parametrize("form", ["replicated", "plain local shards"])
def test_dtensor_state_loaded_from_another_placement_or_as_local_shards(mesh, form):
    """A checkpoint whose state DTensors have other placements is redistributed to the parameters'; plain
    tensors are taken as the local shards when their shape is the shard's."""
    base, grads, placements, kwargs = _checkpoint_case(mesh, "Adam")
    whole = _distribute(base, mesh, placements)
    ref = torch.optim.Adam(whole, foreach=False, **kwargs)
    _train([(ref, whole)], grads, placements, mesh)
    params = _distribute(base, mesh, placements)
    opt = kernels.Adam(params, **kwargs)
    _train([(opt, params)], grads[:3], placements, mesh)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        for k, v in entry.items():
            if isinstance(v, DTensor):
                entry[k] = v.redistribute(mesh, [Replicate()]) if form == "replicated" else v.to_local().clone()
    resumed = _distribute([p.full_tensor().detach() for p in params], mesh, placements)
    opt2 = kernels.Adam(resumed, **kwargs)
    opt2.load_state_dict(saved)
    _train([(opt2, resumed)], grads[3:], placements, mesh)
    _assert_same(ref, opt2, whole, resumed)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_dtensor_state_dict_is_copied_and_saved_like_torchs(mesh, how):
    """``copy.deepcopy(opt.state_dict())`` and ``torch.save``/``torch.load`` work on the DTensor state (every
    parameter's, not only the one at the start of the flat buffer) and give independent copies equal to
    torch's, which a second optimizer loads."""
    base, grads, placements, kwargs = _checkpoint_case(mesh, "Adam")
    rp, op = _distribute(base, mesh, placements), _distribute(base, mesh, placements)
    ref, ours = torch.optim.Adam(rp, foreach=False, **kwargs), kernels.Adam(op, **kwargs)
    _train([(ref, rp), (ours, op)], grads[:2], placements, mesh)

    def copied(opt):
        if how == "deepcopy":
            return copy.deepcopy(opt.state_dict())
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    mine, theirs = copied(ours), copied(ref)
    for pid, entry in theirs["state"].items():
        assert list(mine["state"][pid]) == list(entry)
        for k, v in entry.items():
            got = mine["state"][pid][k]
            assert type(got) is type(v) and _full(got).shape == _full(v).shape
            torch.testing.assert_close(_full(got), _full(v), **TOLERANCES[torch.float32])
    live = ours.state[op[1]]["exp_avg"].full_tensor().clone()
    mine["state"][1]["exp_avg"].to_local().fill_(7.0)  # a copy: the optimizer's own state is untouched
    assert torch.equal(ours.state[op[1]]["exp_avg"].full_tensor(), live)
    resumed = _distribute([p.full_tensor().detach() for p in op], mesh, placements)
    again = kernels.Adam(resumed, **kwargs)
    again.load_state_dict(copied(ours))
    _train([(ref, rp), (again, resumed)], grads[2:], placements, mesh)
    _assert_same(ref, again, rp, resumed)


def test_dtensor_plain_state_of_the_wrong_shape_is_refused_before_anything_changes(mesh):
    base, grads, placements, kwargs = _checkpoint_case(mesh, "Adam")
    params = _distribute(base, mesh, placements)
    opt = kernels.Adam(params, **kwargs)
    _set_grads(params, grads[0], placements, mesh)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["exp_avg"] = torch.zeros(4, 3)  # the transpose of parameter 1's (3, 4)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"^state of parameter 1 in group 0: 'exp_avg' has shape \(4, 3\), "
                                         r"the parameter has \(3, 4\)$"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    for pid, entry in before["state"].items():
        for k, v in entry.items():
            assert torch.equal(_full(after["state"][pid][k]), _full(v))


def test_dtensor_local_value_refuses_a_plain_tensor_that_is_not_the_local_shard(mesh):
    from optadvisor.kernels._runtime.dtensor import local_value
    p = distribute_tensor(torch.zeros(3, 4), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"^a plain tensor of shape \(12,\) cannot be the state of a DTensor "
                                         r"parameter whose local shard has shape \(3, 4\) \(global \(3, 4\)\); "
                                         r"load a sharded state dict \(torch.distributed.checkpoint\)$"):
        local_value(torch.zeros(12), p)
    plain = torch.ones(3, 4)
    assert local_value(plain, p) is plain
    other = distribute_tensor(torch.arange(12.).view(3, 4), mesh, [Replicate()])
    out = local_value(other, p)
    assert not isinstance(out, DTensor) and torch.equal(out, torch.arange(12.).view(3, 4))


def test_dtensor_state_from_another_sharding_is_redistributed_to_the_parameters(mesh, monkeypatch):
    """On one rank every placement holds the whole tensor, so the values cannot tell whether a checkpoint's
    DTensor was redistributed: the calls are watched instead (on several ranks a skipped redistribution
    loads another rank's shard; tests/test_fsdp.py runs that)."""
    from optadvisor.kernels._runtime.dtensor import local_value
    calls = []
    redistribute = DTensor.redistribute
    monkeypatch.setattr(DTensor, "redistribute", lambda self, mesh_, placements, **kw: calls.append(
        (mesh_, tuple(placements))) or redistribute(self, mesh_, placements, **kw))
    p = distribute_tensor(torch.zeros(3, 4), mesh, [Shard(1)])
    same = distribute_tensor(torch.arange(12.).view(3, 4), mesh, [Shard(1)])
    assert torch.equal(local_value(same, p), torch.arange(12.).view(3, 4)) and calls == []
    other = distribute_tensor(torch.arange(12.).view(3, 4), mesh, [Shard(0)])
    assert torch.equal(local_value(other, p), torch.arange(12.).view(3, 4))
    assert calls == [(p.device_mesh, (Shard(1),))]
    del calls[:]
    from torch.distributed.device_mesh import init_device_mesh
    another_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    elsewhere = distribute_tensor(torch.arange(12.).view(3, 4), another_mesh, [Shard(1)])
    assert elsewhere.device_mesh != p.device_mesh
    local_value(elsewhere, p)
    assert calls == [(p.device_mesh, (Shard(1),))]


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_dtensor_parameter_whose_shard_moved_is_updated_where_it_now_lies(mesh, name):
    """A parameter's local shard replaced (``p.data = ...``, as a resharding does): the next step updates the
    new shard, with the state carried over, as torch.optim (which keys state by the parameter) does."""
    specs = [((5,), False, False), ((2, 3), False, False)]
    placements = [[Shard(0)], [Replicate()]]
    kwargs = dict(lr=0.05, **OPTIMIZER_CASES[name].stateful)
    base = make_params(specs, torch.float32, 2)
    grads = make_grads(base, 4, 2, none_prob=0.0)
    ours_cls, torch_cls = OPTIMIZERS[name]
    rp, op = _distribute(base, mesh, placements), _distribute(base, mesh, placements)
    ref, ours = torch_cls(rp, foreach=False, **kwargs), ours_cls(op, **kwargs)
    for s, row in enumerate(grads):
        if s == 2:
            for p in (*rp, *op):
                p.data = distribute_tensor(p.full_tensor().detach().clone(), mesh, p.placements)
        _set_grads(rp, row, placements, mesh)
        _set_grads(op, row, placements, mesh)
        ref.step()
        ours.step()
    _assert_same(ref, ours, rp, op)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_dtensor_partial_placement_is_refused_by_name(mesh):
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"^Adam: param_groups\[0\]\['params'\]\[1\] is a DTensor with placement "
                                         r"Partial\(.*\) \(a pending reduction\): its local values are not the "
                                         r"parameter's, so an elementwise update of them would be wrong; "
                                         r"redistribute it to Shard or Replicate first$"):
        kernels.Adam([torch.nn.Parameter(torch.ones(2)), p])
    opt = kernels.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"^SGD: param_groups\[1\]\['params'\]\[0\] is a DTensor with placement "
                                         r"Partial"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_dtensor_parameters_on_different_meshes_in_one_group_are_refused(mesh):
    from torch.distributed.device_mesh import init_device_mesh
    other = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    a = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Shard(0)]))
    b = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Replicate()]))
    c = torch.nn.Parameter(DTensor.from_local(torch.ones(3), other, [Replicate(), Shard(0)]))
    with pytest.raises(ValueError, match="^" + re.escape(
            "SGD: parameter group 0 mixes DTensors on different device meshes (param_groups[0]['params'][0] and "
            "param_groups[0]['params'][2]); put each mesh's parameters in a group of its own") + "$"):
        kernels.SGD([a, b, c], lr=0.1)
    kernels.SGD([a, b, torch.nn.Parameter(torch.ones(2))], lr=0.1)  # one mesh (and a plain tensor): fine
    opt = kernels.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1)  # a group per mesh: fine
    for p in (a, b, c):
        p.grad = DTensor.from_local(torch.ones(3), p.device_mesh, p.placements)
    opt.step()
    for p in (a, b, c):
        torch.testing.assert_close(p.to_local(), torch.full((3,), 0.9))


def test_dtensor_plain_gradient_is_refused_by_name(mesh):
    a = torch.nn.Parameter(distribute_tensor(torch.ones(4), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.ones(2), mesh, [Replicate()]))
    opt = kernels.Adam([torch.nn.Parameter(torch.ones(1)), a, b], lr=0.1)
    a.grad = distribute_tensor(torch.ones(4), mesh, [Shard(0)])
    b.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"^Adam: parameter 2 of group 0 is a DTensor but its gradient is "
                                           r"a plain Tensor$"):
        opt.step()
    torch.testing.assert_close(a.full_tensor(), torch.ones(4))  # nothing was updated


def test_dtensor_non_contiguous_local_shard_is_refused_by_name(mesh):
    local = torch.ones(4, 3).t()
    p = torch.nn.Parameter(DTensor.from_local(local, mesh, [Replicate()], run_check=False))
    assert not p.to_local().is_contiguous()
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[1\]: its local shard is not "
                                         r"contiguous, so it cannot be updated in place by the fused pass$"):
        kernels.SGD([torch.nn.Parameter(distribute_tensor(torch.ones(2), mesh, [Shard(0)])), p], lr=0.1)


def test_dtensor_options_that_serve_only_plain_tensors_are_refused_by_name(mesh):
    p = torch.nn.Parameter(distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"^AdamW: param_groups\[0\]\['params'\]\[0\] is a DTensor; "
                                         r"state_dtype=torch.bfloat16 serves float32 \(and bfloat16\) "
                                         r"parameters that are not DTensors$"):
        kernels.AdamW([p], state_dtype=torch.bfloat16)
    low = torch.nn.Parameter(distribute_tensor(torch.ones(8, 4, dtype=torch.bfloat16), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"^SGD: param_groups\[0\]\['params'\]\[0\] is a DTensor; kahan_sum=True "
                                         r"serves bfloat16 and float16 parameters that are not DTensors$"):
        kernels.SGD([low], lr=0.1, kahan_sum=True)
    with pytest.raises(ValueError, match=r"^Adam8bit: param_groups\[0\]\['params'\]\[0\] is a DTensor; 8-bit "
                                         r"state does not support FSDP2/DTensor parameters yet \(use "
                                         r"kernels.Adam\)$"):
        kernels.Adam8bit([p], min_8bit_size=1)


@pytest.mark.parametrize("fused", [False, True])
def test_dtensor_small_shards_are_packed_into_one_call_only_when_they_can_be(mesh, fused):
    """Two or more small shards with gradients at one step count: one update call for all of them, plus one
    per large shard; one small shard alone, or small shards at different step counts: a call each."""
    def calls(shapes, present_per_step, direct=8):
        params = _distribute([torch.nn.Parameter(torch.randn(s)) for s in shapes], mesh,
                             [[Replicate()]] * len(shapes))
        opt = with_threshold(kernels.Adam, direct)(params, lr=0.1, fused=fused)
        seen, apply = [], opt._apply
        opt._apply = lambda s, hp, flags, run, bucket: seen.append(run["param"].numel()) or apply(s, hp, flags,
                                                                                               run, bucket)
        out = []
        for present in present_per_step:
            for p, has in zip(params, present):
                p.grad = distribute_tensor(torch.ones(p.shape), mesh, [Replicate()]) if has else None
            seen.clear()
            opt.step()
            out.append(sorted(seen))
        return out
    # small: 3, 4 and 5 elements (below 8); large: 9 and 12
    assert calls([(3,), (9,), (4,), (12,), (5,)], [[1] * 5, [1] * 5]) == [[9, 12, 12]] * 2
    assert calls([(3,), (4,), (9,)], [[1, 1, 1]]) == [[7, 9]]
    assert calls([(3,), (9,)], [[1, 1]]) == [[3, 9]]  # one small shard: nothing to pack
    # the second small shard misses a step: their counts differ, so each goes alone from then on
    assert calls([(3,), (4,), (9,)], [[1, 1, 1], [1, 0, 1], [1, 1, 1]]) == [[7, 9], [3, 9], [3, 4, 9]]

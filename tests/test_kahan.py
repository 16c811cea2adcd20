"""``kahan_sum=True``: Kahan-compensated bfloat16/float16 parameters for Adam/AdamW, SGD and RMSprop. Each
step is torch.optim's float32 step (for-loop path) on ``param + kahan_comp``, then ``param`` stores its
rounding and ``kahan_comp`` the remainder; updates below half an ulp accumulate instead of vanishing;
float32 parameters are untouched; checkpoints load both ways; bad input is refused by name."""

from __future__ import annotations

import pytest
import torch

from optadvisor import kernels
from optadvisor.kernels.precision.kahan import half_ulp

CASES = [("SGD", dict(lr=1e-2)), ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
         ("Adam", dict(lr=1e-3)), ("AdamW", dict(lr=1e-3, weight_decay=0.1)),
         ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True, maximize=True)),
         ("Adagrad", dict(lr=1e-2, initial_accumulator_value=0.125, weight_decay=1e-2))]  # (exact in 16 bits)
IDS = ["SGD", "SGD-nesterov-wd", "Adam", "AdamW", "RMSprop-centered-momentum", "Adagrad"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_each_step_is_torchs_float32_step_on_param_plus_compensation(name, kwargs, fused, dtype):
    """From the same state each step: ``param + kahan_comp`` equals torch.optim's float32 step (for-loop) on
    the compensated parameter and float32 copies of the state, to within the compensation's own rounding
    (2^-16 relative); ``param`` and the state are that step's values rounded to nearest. The eager path
    (fused=False) runs torch's float32 step itself, so those roundings are bit for bit; the compiled one is
    within float32 tolerance of it (one ulp of ``dtype`` where a value straddles a rounding point)."""
    torch.manual_seed(4)
    p = torch.nn.Parameter(torch.randn(3000).to(dtype))
    opt = getattr(kernels, name)([p], kahan_sum=True, fused=fused, **kwargs)
    tiny = 2.0 ** -24 if dtype == torch.float16 else 0.0  # float16's smallest subnormal

    def same(got, want, what):
        if fused is False:
            assert torch.equal(got, want.to(dtype)), what
        else:
            torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=2 ** -7, atol=tiny, msg=what)
            assert (got == want.to(dtype)).float().mean() > 0.99, what

    for t in range(1, 6):
        g = (torch.randn(3000) * 0.1).to(dtype)
        comp = opt.state[p]["kahan_comp"].float() if t > 1 else torch.zeros(3000)
        q = torch.nn.Parameter(p.detach().float() + comp)
        ref = getattr(torch.optim, name)([q], foreach=False, **kwargs)
        if t > 1:
            ref.state[q] = {k: (v.float().clone() if k != "step" else v.clone())
                            for k, v in opt.state[p].items() if k != "kahan_comp"}
        p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        want = q.detach()
        assert opt.state[p]["kahan_comp"].dtype == dtype
        total = p.detach().float() + opt.state[p]["kahan_comp"].float()
        torch.testing.assert_close(total, want, rtol=2.0 ** -16 + 1.3e-6, atol=1e-6 + tiny)
        same(p.detach(), want, "param")
        for k, v in ref.state[q].items():
            if k == "step":
                assert float(opt.state[p][k]) == float(v)
            else:
                same(opt.state[p][k], v, k)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=1e-4)), ("Adam", dict(lr=1e-4)),
                                          ("RMSprop", dict(lr=1e-5))], ids=["SGD", "Adam", "RMSprop"])
def test_updates_below_half_an_ulp_accumulate(name, kwargs, fused):
    """bfloat16 parameters at 1.0 (ulp 2^-7) and steps of 1e-5 to 1e-4: without compensation every step
    rounds back to 1.0; with it, 100 steps move the parameter as float32 parameters move (by 2e-3 to 1e-2)."""
    results = {}
    for variant in ("plain", "kahan", "float32"):
        dtype = torch.float32 if variant == "float32" else torch.bfloat16
        p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
        opt = getattr(kernels, name)([p], kahan_sum=variant == "kahan", fused=fused, **kwargs)
        for _ in range(100):
            p.grad = torch.ones(4096, dtype=dtype)
            opt.step()
        comp = opt.state[p].get("kahan_comp")
        results[variant] = p.detach().float() + (comp.float() if comp is not None else 0.0)
    assert torch.equal(results["plain"], torch.ones(4096))  # the failure Kahan summation fixes
    moved = 1.0 - results["float32"]
    assert (moved > 1e-3).all()
    torch.testing.assert_close(results["kahan"], results["float32"], rtol=0, atol=moved.max().item() * 2e-2)


def test_float32_parameters_are_untouched_and_groups_choose():
    """kahan_sum affects bfloat16/float16 parameters only: float32 ones step bit for bit as without it, with
    no kahan_comp. A group added with kahan_sum=True gets it; the others do not."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.randn(500))
    c = torch.nn.Parameter(torch.randn(300).bfloat16())
    d = torch.nn.Parameter(c.detach().clone())
    opt, plain = kernels.AdamW([a], kahan_sum=True), kernels.AdamW([b])
    opt.add_param_group({"params": [d]})
    opt.add_param_group({"params": [c], "kahan_sum": False})
    b.data.copy_(a.data)
    for _ in range(3):
        g = torch.randn(500)
        a.grad, b.grad = g, g.clone()
        c.grad = d.grad = torch.randn(300).bfloat16()
        opt.step()
        plain.step()
    assert torch.equal(a.detach(), b.detach()) and "kahan_comp" not in opt.state[a]
    assert "kahan_comp" in opt.state[d] and "kahan_comp" not in opt.state[c]
    assert opt.param_groups[0]["kahan_sum"] is True and opt.param_groups[2]["kahan_sum"] is False


def _bf16_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).bfloat16()


def _train(model, opt, steps=3, seed=0):
    torch.manual_seed(seed + 50)
    for _ in range(steps):
        model(torch.randn(8, 16).bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_checkpoints_round_trip_and_load_both_ways():
    """Ours round-trips exactly (kahan_comp included); torch.optim's checkpoint (no kahan_comp) loads with the
    compensation at 0; torch.optim loads ours (it keeps kahan_comp as an unused entry) and continues."""
    model = _bf16_model()
    opt = kernels.AdamW(model.parameters(), lr=1e-3, kahan_sum=True)
    _train(model, opt)
    sd = opt.state_dict()
    assert list(sd["state"][0]) == ["step", "exp_avg", "exp_avg_sq", "kahan_comp"]
    twin = _bf16_model()
    twin.load_state_dict(model.state_dict())
    opt2 = kernels.AdamW(twin.parameters(), lr=1e-3, kahan_sum=True)
    opt2.load_state_dict(sd)
    for a, b in zip(_train(model, opt, seed=1), _train(twin, opt2, seed=1)):
        assert torch.equal(a, b)
    topt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    _train(model, topt, seed=2)
    back = kernels.AdamW(model.parameters(), lr=1e-3, kahan_sum=True)
    back.load_state_dict(topt.state_dict())
    w = model[0].weight
    assert torch.equal(back.state[w]["kahan_comp"], torch.zeros_like(w))
    assert torch.equal(back.state[w]["exp_avg"], topt.state[w]["exp_avg"])
    _train(model, back, seed=3)
    again = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    again.load_state_dict(back.state_dict())
    _train(model, again, seed=4)


def test_a_bad_compensation_in_a_checkpoint_is_refused_before_anything_changes():
    model = _bf16_model()
    opt = kernels.SGD(model.parameters(), lr=0.1, momentum=0.9, kahan_sum=True)
    _train(model, opt)
    w = model[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items()}
    sd = opt.state_dict()
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    sd["state"][0]["kahan_comp"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state of parameter 0 in group 0: 'kahan_comp' must be a floating-point "
                                         r"tensor of the parameter's shape \(32, 16\)"):
        opt.load_state_dict(sd)
    for k, v in opt.state[w].items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop"])
def test_kahan_sum_must_be_a_bool(name):
    with pytest.raises(ValueError, match=rf"{name}: kahan_sum must be True or False \(got 'yes'\)"):
        getattr(kernels, name)([torch.nn.Parameter(torch.zeros(3))], kahan_sum="yes")


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_the_compiled_update_runs_unless_fused_is_false(name, kwargs, monkeypatch):
    """The compensated step takes the optimizer's compiled Kahan update (one call per step for one bucket)
    unless fused=False, which runs the eager one: the two agree (the test above), so only counting tells them
    apart."""
    from optadvisor.kernels.precision import bf16 as _bf16state

    calls = []
    real = _bf16state.run_fused

    def counting(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(_bf16state, "run_fused", counting)
    for fused, want in ((True, 3), (None, 3), (False, 0)):
        calls.clear()
        p = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
        opt = getattr(kernels, name)([p], kahan_sum=True, fused=fused, **kwargs)
        for _ in range(3):
            p.grad = torch.randn(300).to(torch.bfloat16)
            opt.step()
        assert calls == [getattr(kernels, name)._kahan_update.__name__] * want, (fused, calls)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_read_in_place_take_the_kahan_update_too(fused):
    """Large gradients are read where they lie, a call of their own per parameter: that call must take the
    compensated update as the runs over the buffers do (same bits as with every gradient copied)."""
    from strategies import with_threshold

    torch.manual_seed(0)
    init = [torch.randn(n).bfloat16() for n in (3, 10, 2, 20)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    direct = with_threshold(kernels.Adam, 8)(a, lr=1e-3, kahan_sum=True, fused=fused)
    copied = kernels.Adam(b, lr=1e-3, kahan_sum=True, fused=fused)
    for _ in range(5):
        grads = [torch.randn(t.shape).bfloat16() for t in init]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        direct.step()
        copied.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert torch.equal(direct.state[p]["kahan_comp"], copied.state[q]["kahan_comp"])
    assert any(direct.state[p]["kahan_comp"].abs().sum() > 0 for p in a)


def _trained(name, kwargs, seed=0, steps=20):
    torch.manual_seed(seed)
    model = torch.nn.Linear(50, 20).to(torch.bfloat16)
    opt = getattr(kernels, name)(model.parameters(), kahan_sum=True, **kwargs)
    x = torch.randn(64, 50).to(torch.bfloat16)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return model, opt


def _zero_grad_step(model, opt):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


EDITS = ["data-clamp", "no-grad-clamp", "data-projection", "reset_parameters", "load_state_dict"]
KAHAN_OPTIMIZERS = [("SGD", dict(lr=1e-2)), ("AdamW", dict(lr=0.0)), ("Adam", dict(lr=0.0)),
                    ("RMSprop", dict(lr=0.0)), ("Adagrad", dict(lr=0.0))]


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name, kwargs", KAHAN_OPTIMIZERS, ids=[n for n, _ in KAHAN_OPTIMIZERS])
@pytest.mark.parametrize("edit", EDITS)
def test_an_edit_of_the_weights_drops_their_stale_compensation(edit, name, kwargs, fused):
    """After 20 steps, the weights are edited in place; a step that cannot move them (a zero gradient; lr 0
    for the adaptive ones) leaves them exactly as edited, as torch.optim's step does — the compensation of
    the old weights is not added to the new ones (it moved clipped weights by up to 77% of the clip bound)."""
    model, opt = _trained(name, {**kwargs, "fused": fused})
    w = model.weight
    if edit == "data-clamp":
        w.data.clamp_(-0.01, 0.01)
    elif edit == "no-grad-clamp":
        with torch.no_grad():
            w.clamp_(-0.01, 0.01)
    elif edit == "data-projection":
        w.data.div_(w.data.float().norm().to(torch.bfloat16) * 4)
    elif edit == "reset_parameters":
        model.reset_parameters()
    else:
        other = torch.nn.Linear(50, 20).to(torch.bfloat16)
        model.load_state_dict(other.state_dict())
    edited = [p.detach().clone() for p in model.parameters()]
    _zero_grad_step(model, opt)
    if edit in ("data-clamp", "data-projection"):
        # the edit went around autograd (p.data): what tells it is the residue itself, larger than half an ulp
        # of the edited weights where they shrank. A residue of at most half an ulp is kept (it may be the
        # weight's own, untouched by the edit): a tie then rounds to the even neighbour, one ulp, with
        # param + compensation unchanged. Nothing moves further.
        e = edited[0].float()
        ulp = 2 * half_ulp(e, torch.bfloat16)
        assert ((w.float() - e).abs() <= ulp).all()
        if edit == "data-clamp":
            assert w.abs().max() <= 0.01 and torch.equal(w[e.abs() >= 0.01], edited[0][e.abs() >= 0.01])
    else:
        for p, e in zip(model.parameters(), edited):
            assert torch.equal(p, e)
        touched = [w] if edit == "no-grad-clamp" else list(model.parameters())
        assert not any(opt.state[p]["kahan_comp"].any() for p in touched)


def test_compensation_survives_steps_that_do_not_edit():
    """Without an edit, the residue is kept step to step (the version check does not fire on our own writes):
    updates below half an ulp still accumulate."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = kernels.SGD([p], lr=1.0, kahan_sum=True)
    for _ in range(100):
        p.grad = torch.full((1000,), -2.0 ** -12, dtype=torch.bfloat16)  # an eighth of an ulp at 1.0
        opt.step()
    assert torch.equal(p.float() + opt.state[p]["kahan_comp"].float(), torch.full((1000,), 1 + 100 * 2 ** -12))

"""NAdam and RAdam beyond the generic tables: NAdam's per-parameter ``mu_product`` (kept beside ``step`` on
the host, torch's float32 rounding) when parameters join late or load different values, and the 8-bit forms
the codec makes (NAdam8bit, RAdam8bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from strategies import make_params

from optadvisor import kernels


def _grads(params, gen, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("fused", [False, None])
def test_mu_product_of_a_parameter_that_joins_late_and_of_a_mixed_checkpoint(fused):
    """A parameter without gradients for its first steps has a shorter product than its neighbours (runs cut
    by it); a checkpoint whose parameters hold different products at the same step (edited) is followed as
    torch follows it."""
    specs = [((5,), False, False), ((3, 4), False, False), ((7,), False, False)]
    ours_p, ref_p = make_params(specs, torch.float32, 0), make_params(specs, torch.float32, 0)
    kw = dict(lr=0.01, momentum_decay=0.3)
    ours, ref = kernels.NAdam(ours_p, fused=fused, **kw), torch.optim.NAdam(ref_p, foreach=False, **kw)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(6):
        _grads(ours_p, g1, skip={1} if t < 3 else ())
        _grads(ref_p, g2, skip={1} if t < 3 else ())
        ours.step()
        ref.step()
    products = [float(ours.state[p]["mu_product"]) for p in ours_p]
    assert products == [float(ref.state[q]["mu_product"]) for q in ref_p]
    assert products[0] == products[2] != products[1]
    sd = copy.deepcopy(ref.state_dict())
    sd["state"][1]["step"] = torch.tensor(6.0)
    sd["state"][2]["mu_product"] = torch.tensor(0.25)
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    for _ in range(3):
        _grads(ours_p, g1)
        _grads(ref_p, g2)
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert float(ours.state[p]["mu_product"]) == float(ref.state[q]["mu_product"])
        torch.testing.assert_close(p, q, rtol=1.3e-6, atol=1e-5)
        if fused is False:
            assert torch.equal(p, q)


@pytest.mark.parametrize("cls, float_cls, kw", [(kernels.NAdam8bit, kernels.NAdam, dict(lr=1e-2, weight_decay=0.1)),
                                                (kernels.RAdam8bit, kernels.RAdam, dict(lr=1e-2))])
def test_eight_bit_forms(cls, float_cls, kw):
    """Small parameters keep float state and step exactly as the float optimizer; large ones keep codes
    (a quarter of the state memory) and train a least-squares problem as well as float state, within 2%."""
    torch.manual_seed(0)
    small, large = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(8192))
    twin = torch.nn.Parameter(small.detach().clone())
    opt, flt = cls([small, large], **kw), float_cls([twin], **kw)
    for _ in range(4):
        g = torch.randn(100)
        small.grad, large.grad, twin.grad = g, torch.randn(8192), g.clone()
        opt.step()
        flt.step()
    assert torch.equal(small, twin)
    assert opt.state[large]["exp_avg"].dtype == torch.int8 and opt.state[large]["exp_avg_sq"].dtype == torch.uint8

    def fit(opt_cls):
        gen = torch.Generator().manual_seed(3)
        a, b = torch.randn(256, 64, generator=gen), torch.randn(256, 64, generator=gen)
        w = torch.nn.Parameter(torch.zeros(64, 64))
        o = opt_cls([w], lr=1e-2, **({"min_8bit_size": 0} if opt_cls is cls else {}))
        for _ in range(300):
            o.zero_grad()
            loss = (a @ w - b).pow(2).mean()
            loss.backward()
            o.step()
        state = sum(t.numel() * t.element_size() for k, t in o.state[w].items() if k not in ("step", "mu_product"))
        return loss.item(), state

    (q8_loss, q8_bytes), (f_loss, f_bytes) = fit(cls), fit(float_cls)
    assert q8_loss < f_loss * 1.02, (q8_loss, f_loss)
    assert q8_bytes <= 0.27 * f_bytes

"""kernels.Lion and Lion8bit: every state variant comes from the precision codecs around Lion's one declared
update. Each variant is held to a plain reference: lion-pytorch's step (fp32, through the generic tables in
strategies.py), its float32 step on ``param + kahan_comp`` (Kahan), on float32 copies of bfloat16 state stored
with stochastic rounding (bf16 state), and on decoded 8-bit state, encoded again (8-bit, q8reference's codes);
checkpoints interchange with lion-pytorch's both ways."""

from __future__ import annotations

import copy

import lion_pytorch
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optadvisor.kernels.precision.bf16 import random_bits, stochastic_round
from q8reference import _f32, _padded, _sqrt32, assert_matches_reference, bucket_offsets, decode_signed, encode_signed
from strategies import UNDER_MUTMUT, examples, make_params

from optadvisor import kernels

SETTINGS = settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = [((300,), False, False), ((7, 9), True, False), ((5000,), False, False)]

STRICT = None if UNDER_MUTMUT else True  # under mutmut the compiled path cannot trace its trampolines


def _lion_step(p, g, m, lr, betas, wd):
    """lion-pytorch's update_fn in float32 ops on plain tensors (returns new p and m)."""
    p = p * _f32(1 - lr * wd)
    c = torch.sign(m * _f32(betas[0]) + _f32(1 - betas[0]) * g)
    return p - _f32(lr) * c, m * _f32(betas[1]) + _f32(1 - betas[1]) * g


def _encode_signed_stochastic(m: torch.Tensor, n: int, index: torch.Tensor, step: int):
    """(blocks, block) float32 values: int8 codes rounded down or up to a neighbouring level (c/127)^2 absmax
    with probability by distance in value, u = the low 16 bits of the documented hash / 2^16."""
    u = (random_bits(index, torch.tensor(step))[0].float() / 65536).view(m.shape)
    fm = m.abs() < float("inf")
    am = torch.where(fm, m.abs(), 0.0).amax(1, keepdim=True)
    km = torch.where(am > 0, torch.full_like(am, 127.0) / _sqrt32(am), 0.0)  # float32, as the codes' map
    x = _sqrt32(m.abs()) * km
    lo = torch.floor(x)
    up = u * ((lo + 1) ** 2 - lo ** 2) < x * x - lo * lo
    c = torch.where(fm, torch.where(up, lo + 1, lo).clamp(max=127.0), 0.0)
    return torch.where(m < 0, -c, c).to(torch.int8).reshape(-1)[:n], am.view(-1)


def test_stochastic_codes_are_unbiased():
    """The 8-bit codec's stochastic rounding: 0.3 in blocks whose scale is 1 lies between the levels
    (69/127)^2 and (70/127)^2; round to nearest stores 0.3038 every time, the stochastic codes average 0.3."""
    from optadvisor.kernels.precision.codecs import encode_first_stochastic

    m = torch.full((4000, 64), 0.3)
    m[:, 0] = 1.0
    codes, scales = _encode_signed_stochastic(m, m.numel(), torch.arange(m.numel()), 7)
    ours, _ = encode_first_stochastic(m, (random_bits(torch.arange(m.numel()), torch.tensor(7))[0].float()
                                          / 65536).view(m.shape))
    assert torch.equal(ours.reshape(-1), codes)
    back = decode_signed(codes, scales, 64)[:, 1:]
    assert back.unique().numel() == 2  # the two neighbouring levels only
    assert abs(back.mean().item() - 0.3) < 2e-4
    nearest = decode_signed(encode_signed(m, m.numel())[0], scales, 64)[:, 1:]
    assert abs(nearest.mean().item() - 0.3) > 3e-3


@pytest.mark.parametrize("fused", [False, STRICT])
@SETTINGS
@given(block=st.sampled_from([32, 64, 256]), lr=st.sampled_from([1e-4, 1e-3, 0.05]),
       betas=st.sampled_from([(0.9, 0.99), (0.5, 0.9), (0.0, 0.5)]), wd=st.sampled_from([0.0, 0.1, 1.0]),
       steps=st.integers(3, 12), seed=st.integers(0, 2 ** 16))
def test_lion8bit_is_the_lion_step_on_decoded_state(fused, block, lr, betas, wd, steps, seed):
    """Per parameter: decode the int8 codes, take lion-pytorch's float32 step, encode again (the first
    moment's signed map, stochastic rounding seeded by the element's place in the bucket and the step). The
    eager codec gives those bits; compiled, float32 tolerance on the parameters and the codes within one
    level."""
    params = make_params(SPECS, torch.float32, seed)
    ref = [dict(p=p.detach().clone(), c=torch.zeros(p.numel(), dtype=torch.int8),
                s=torch.zeros(-(-p.numel() // block))) for p in params]
    opt = kernels.Lion8bit(params, lr=lr, betas=betas, weight_decay=wd, block_size=block, min_8bit_size=0,
                           fused=True if fused else False)
    gen = torch.Generator().manual_seed(seed)
    offsets = bucket_offsets(opt, params)
    for t in range(1, steps + 1):
        for p, r, off in zip(params, ref, offsets):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g
            n = p.numel()
            m = decode_signed(r["c"], r["s"], block)
            newp, newm = _lion_step(_padded(r["p"], block), _padded(g, block), m, lr, betas, wd)
            r["p"] = newp.reshape(-1)[:n].view(p.shape)
            r["c"], r["s"] = _encode_signed_stochastic(newm, n, off + torch.arange(newm.numel()), t)
        opt.step()
    assert_matches_reference(opt, params, ref, "exp_avg", fused is not False)


@pytest.mark.parametrize("fused", [False, STRICT])
def test_bf16_state_is_the_float32_step_stored_with_stochastic_rounding(fused):
    """``state_dtype=torch.bfloat16``: each step is lion-pytorch's float32 step on the state read as float32,
    the new state stored with the documented stochastic rounding (the hash of position and step)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000))
    opt = kernels.Lion([p], lr=1e-3, weight_decay=0.1, state_dtype=torch.bfloat16, fused=fused)
    ref_p, ref_m = p.detach().clone(), torch.zeros(3000)
    for t in range(1, 8):
        g = torch.randn(3000)
        p.grad = g
        opt.step()
        ref_p, m32 = _lion_step(ref_p, g, ref_m, 1e-3, (0.9, 0.99), 0.1)
        low, _ = random_bits(torch.arange(3000, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))
        ref_m = stochastic_round(m32, low).float()
        m = opt.state[p]["exp_avg"]
        assert m.dtype == torch.bfloat16
        if fused is not False:
            torch.testing.assert_close(p.detach(), ref_p, rtol=1.3e-6, atol=1e-5)
            assert (m.float() != ref_m).float().mean() < 1e-3
            ref_m = m.float()  # carry ours: a rare one-ulp rounding difference must not compound
        else:
            assert torch.equal(p.detach(), ref_p) and torch.equal(m.float(), ref_m)


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kahan_is_the_float32_step_on_param_plus_compensation(dtype, fused):
    """``kahan_sum=True``: from the same state, param + kahan_comp is lion-pytorch's float32 step on the
    compensated parameter (within the compensation's rounding), param its rounding to nearest; updates far
    below half an ulp accumulate."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(2000).to(dtype))
    opt = kernels.Lion([p], lr=1e-4, weight_decay=0.1, kahan_sum=True, fused=fused)
    for t in range(1, 6):
        comp = opt.state[p]["kahan_comp"].float() if t > 1 else torch.zeros(2000)
        q = torch.nn.Parameter(p.detach().float() + comp)
        ref = lion_pytorch.Lion([q], lr=1e-4, weight_decay=0.1)
        if t > 1:
            ref.state[q] = {"exp_avg": opt.state[p]["exp_avg"].float().clone()}
        g = (torch.randn(2000) * 0.1).to(dtype)
        p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        total = p.detach().float() + opt.state[p]["kahan_comp"].float()
        torch.testing.assert_close(total, q.detach(), rtol=2.0 ** -16 + 1.3e-6, atol=1e-6)
    one = torch.nn.Parameter(torch.ones(500, dtype=torch.bfloat16))
    opt = kernels.Lion([one], lr=2.0 ** -12, kahan_sum=True, fused=fused)  # an eighth of an ulp at 1.0
    for _ in range(64):
        one.grad = torch.full((500,), -1.0, dtype=torch.bfloat16)
        opt.step()
    assert torch.equal(one.float() + opt.state[one]["kahan_comp"].float(), torch.full((500,), 1 + 64 * 2 ** -12))


def _trained(cls, steps=4, **kw):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    opt = cls(model.parameters(), lr=1e-3, weight_decay=0.1, **kw)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 80)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_checkpoints_interchange_with_lion_pytorch_both_ways():
    """lion-pytorch -> Lion and Lion -> lion-pytorch: training continues bit for bit (eager); Lion8bit's
    checkpoint loads into Lion dequantized and, through dequantize_state_dict, into lion-pytorch; a float
    checkpoint loads into Lion8bit quantized."""
    model, theirs = _trained(lion_pytorch.Lion)
    twin = copy.deepcopy(model)
    ours = kernels.Lion(twin.parameters(), lr=1e-3, weight_decay=0.1, fused=False)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    back = lion_pytorch.Lion(copy.deepcopy(twin).parameters(), lr=1e-3)
    back.load_state_dict(ours.state_dict())
    assert back.param_groups[0]["weight_decay"] == 0.1
    x = torch.randn(16, 80)
    for m, o in ((model, theirs), (twin, ours)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

    model8, q8 = _trained(kernels.Lion8bit, min_8bit_size=0, block_size=64)
    sd = q8.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == torch.int8 and "exp_avg_absmax" in sd["state"][0]
    flt = kernels.Lion(copy.deepcopy(model8).parameters(), lr=1e-3)
    flt.load_state_dict(copy.deepcopy(sd))
    plain = lion_pytorch.Lion(copy.deepcopy(model8).parameters(), lr=1e-3)
    plain.load_state_dict(kernels.dequantize_state_dict(sd))
    for pid, p in enumerate(flt.param_groups[0]["params"]):
        want = plain.state[plain.param_groups[0]["params"][pid]]["exp_avg"]
        assert torch.equal(flt.state[p]["exp_avg"], want)
    again = kernels.Lion8bit(copy.deepcopy(model8).parameters(), lr=1e-3, min_8bit_size=0, block_size=64)
    again.load_state_dict(plain.state_dict())  # float state: quantized on load, to the codes it came from
    for a, b in zip(again.state_dict()["state"].values(), sd["state"].values()):
        # (a block's largest decoded value is 127^2 * (absmax / 127^2) in float32: within an ulp of absmax)
        assert torch.equal(a["exp_avg"], b["exp_avg"])
        torch.testing.assert_close(a["exp_avg_absmax"], b["exp_avg_absmax"], rtol=2.4e-7, atol=0)


def test_bad_input_is_refused_by_name():
    p = torch.nn.Parameter(torch.ones(3))
    for kw, msg in [(dict(lr=0.0), r"Lion: Invalid learning rate: 0.0 \(lion-pytorch requires lr > 0\)"),
                    (dict(lr=-1e-3), "Invalid learning rate"),
                    (dict(betas=(0.9, 1.5)), r"Invalid beta parameter at index 1: 1.5 \(must be in \[0, 1\]\)"),
                    (dict(betas=(0.9, 0.99, 0.5)), "betas must be two numbers"),
                    (dict(state_dtype=torch.float16), "Lion: state_dtype must be None"),
                    (dict(kahan_sum=1), r"Lion: kahan_sum must be True or False \(got 1\)")]:
        with pytest.raises(ValueError, match=msg):
            kernels.Lion([p], **kw)
    with pytest.raises(ValueError, match=r"Lion8bit: block_size must be an int in \[1, 4096\]"):
        kernels.Lion8bit([p], block_size=0)
    with pytest.raises(ValueError, match="Lion8bit: .* is torch.complex64; 8-bit state serves float32"):
        kernels.Lion8bit([torch.nn.Parameter(torch.ones(5000, dtype=torch.complex64))])


def test_complex_parameters_take_the_eager_path_and_match_lion_pytorch():
    """The sign of a complex number is z/|z| (lion-pytorch's sgn_), not the signs of its parts: a complex
    parameter is stepped eagerly even where the compiled path is on."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.complex64))
    q = torch.nn.Parameter(p.detach().clone())
    ours, ref = kernels.Lion([p], lr=1e-2, fused=True), lion_pytorch.Lion([q], lr=1e-2)
    for _ in range(5):
        g = torch.randn(50, dtype=torch.complex64)
        p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
    assert torch.equal(p, q)

"""kernels.precision: the codecs that make every state variant from an optimizer's one declared update, and
the accelerator table. Adagrad8bit is the codec around Adagrad's update, held here to a plain reference
(decode, torch's float32 step, encode with stochastic rounding); Lion's variants are in test_lion.py."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from q8reference import _f32, _padded, _sqrt32, assert_matches_reference, bucket_offsets, decode_unsigned
from strategies import UNDER_MUTMUT, examples, make_params

from optadvisor import kernels
from optadvisor.kernels._runtime import native as _native
from optadvisor.kernels.precision.bf16 import random_bits
from optadvisor.kernels.precision import accelerators, codecs

SPECS = [((300,), False, False), ((7, 9), True, False), ((5000,), False, False)]

STRICT = None if UNDER_MUTMUT else True  # under mutmut the compiled path cannot trace its trampolines


def _encode_unsigned_stochastic(v, n, index, step):
    """(blocks, block) non-negative values: uint8 codes d, levels ((d+1)/256)^2 absmax, rounded down or up by
    distance in value with u = the documented hash's low 16 bits / 2^16; below the smallest level, code 0."""
    u = (random_bits(index, torch.tensor(step))[0].float() / 65536).view(v.shape)
    fv = v < float("inf")
    av = torch.where(fv, v, 0.0).amax(1, keepdim=True)
    kv = torch.where(av > 0, torch.full_like(av, 256.0) / _sqrt32(av), 0.0)
    x = _sqrt32(v) * kv
    lo = torch.floor(x)
    d = torch.where(u * (2 * lo + 1) < x * x - lo * lo, lo, lo - 1).clamp(0.0, 255.0)
    return torch.where(fv, d, 0.0).to(torch.uint8).reshape(-1)[:n], av.view(-1)


@pytest.mark.parametrize("fused", [False, STRICT])
@settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=st.sampled_from([32, 256]), lr=st.sampled_from([1e-2, 0.1]), lr_decay=st.sampled_from([0.0, 0.01]),
       wd=st.sampled_from([0.0, 0.01]), init=st.sampled_from([0.0, 0.1, 1.0]), eps=st.sampled_from([1e-10, 1e-3]),
       steps=st.integers(2, 8), seed=st.integers(0, 2 ** 16))
def test_adagrad8bit_is_the_adagrad_step_on_decoded_state(fused, block, lr, lr_decay, wd, init, eps, steps, seed):
    """Per parameter: decode the uint8 sum, take torch's float32 Adagrad step in the order of our declared
    update, encode with stochastic rounding; initial_accumulator_value decodes exactly. Eager: those bits;
    compiled: float32 tolerance and codes within one level."""
    params = make_params(SPECS, torch.float32, seed)
    opt = kernels.Adagrad8bit(params, lr=lr, lr_decay=lr_decay, weight_decay=wd, initial_accumulator_value=init,
                              eps=eps, block_size=block, min_8bit_size=0, fused=fused)
    offsets = bucket_offsets(opt, params)
    ref = []
    for p in params:
        nb = -(-p.numel() // block)
        codes = torch.full((p.numel(),), 255 if init else 0, dtype=torch.uint8)
        assert torch.equal(opt.state[p]["sum"].reshape(-1), codes)  # the state exists from construction
        ref.append(dict(p=p.detach().clone(), c=codes, s=torch.full((nb,), float(init))))
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        clr = _f32(lr / (1 + (t - 1) * lr_decay))
        for p, r, off in zip(params, ref, offsets):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g
            n = p.numel()
            P, G = _padded(r["p"], block), _padded(g, block)
            if wd:
                G = G + _f32(wd) * P
            s = decode_unsigned(r["c"], r["s"], block) + G * G
            P = P - clr * G / (s.sqrt() + _f32(eps))
            r["p"] = P.reshape(-1)[:n].view(p.shape)
            r["c"], r["s"] = _encode_unsigned_stochastic(s, n, off + torch.arange(s.numel()), t)
        opt.step()
    assert_matches_reference(opt, params, ref, "sum", fused is not False)


def test_each_codec_has_a_name_of_its_own():
    """The compile cache keys kernels by name: two codecs of one update, or one codec of two updates, must
    not share one (a Lion step would run an SGD kernel)."""
    names = {kernels.Lion._bf16_update.__qualname__, kernels.Lion._kahan_update.__qualname__,
             kernels.Lion8bit._q8_update.__qualname__, kernels.SGD._bf16_update.__qualname__,
             kernels.SGD._kahan_update.__qualname__, kernels.Adagrad8bit._q8_update.__qualname__,
             codecs.blockwise_8bit(kernels.Lion._fused_update).__qualname__}
    assert len(names) == 7
    assert kernels.Lion8bit._q8_update.__qualname__ == "blockwise_8bit_sr[_lion_fused]"


def test_the_accelerator_table():
    """Accelerators are found by (update, codec): SGD's and RMSprop's bf16-state C kernels are registered,
    none for Lion or Adagrad (their torch-op path runs); a second registration or an unknown codec is
    refused by name."""
    assert accelerators.accelerator(kernels.SGD._fused_update, "bf16") is not None
    assert accelerators.accelerator(kernels.RMSprop._fused_update, "bf16") is not None
    assert accelerators.accelerator(kernels.Lion._fused_update, "bf16") is None
    assert accelerators.accelerator(kernels.Adagrad._fused_update, "bf16") is None
    for cls in (kernels.Adam, kernels.SGD, kernels.RMSprop):  # the C q8_step kernels
        assert accelerators.accelerator(cls._fused_update, "8bit") is not None
    for cls in (kernels.Lion, kernels.Adagrad):
        assert accelerators.accelerator(cls._fused_update, "8bit") is None
    assert getattr(kernels.SGD8bit._q8_update, "codec", False)  # SGD8bit: the codec, the C kernel its accelerator
    with pytest.raises(ValueError, match=r"codec must be one of \('bf16', '8bit'\) \(got 'fp8'\)"):
        accelerators.register_accelerator(kernels.Lion._fused_update, "fp8", lambda *a: False)
    with pytest.raises(ValueError, match="_sgd_fused already has a bf16 accelerator"):
        accelerators.register_accelerator(kernels.SGD._fused_update, "bf16", lambda *a: False)

    def update(hp, p, g):  # a new update: its accelerator is registered once (again: no change) and found
        pass

    def native(*args):
        return False

    try:
        accelerators.register_accelerator(update, "8bit", native)
        accelerators.register_accelerator(update, "8bit", native)
        assert accelerators.accelerator(update, "8bit") is native and accelerators.accelerator(update, "bf16") is None
    finally:
        accelerators._TABLE.pop((update, "8bit"), None)


@pytest.mark.parametrize("cls, kw", [(kernels.Lion, dict(lr=1e-3)), (kernels.Adagrad, dict(lr=1e-2))])
def test_bf16_state_without_an_accelerator_never_calls_another_optimizers_kernel(cls, kw, monkeypatch):
    """Before the table, the bf16-state step sent every optimizer but Adam that had no ``square_avg`` to
    SGD's C kernel: a Lion step would have run SGD's update. A library that records its calls sees none."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or 0

    monkeypatch.setattr(_native, "available", lambda: Recorder())
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(p.detach().clone())
    opt = cls([p], state_dtype=torch.bfloat16, **kw)
    twin = cls([q], state_dtype=torch.bfloat16, fused=False, **kw)
    for _ in range(3):
        p.grad = torch.randn(5000)
        q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert calls == []
    torch.testing.assert_close(p, q, rtol=1.3e-6, atol=1e-5)


@pytest.mark.skipif(_native.library() is None, reason="no C compiler: the C kernels are not built here")
def test_the_c_tables_refuse_an_index_outside_them():
    """q8_step and adam_bf16state check the kind and weight-decay mode before indexing their tables: -1, and
    nothing written."""
    lib = _native.library()
    p, g = torch.zeros(256), torch.ones(256)
    c, s = torch.zeros(256, dtype=torch.int8), torch.zeros(1)
    hp = (ctypes.c_float * 9)(*([0.1] * 9))
    for kind, wd_mode in ((3, 0), (-1, 0), (0, 3)):
        assert lib.q8_step(kind, p.data_ptr(), g.data_ptr(), 0, c.data_ptr(), s.data_ptr(), c.data_ptr(),
                           s.data_ptr(), 256, 256, ctypes.addressof(hp), 0, wd_mode, 0, 1) == -1
    m = torch.zeros(256, dtype=torch.bfloat16)
    assert lib.adam_bf16state(p.data_ptr(), g.data_ptr(), m.data_ptr(), m.data_ptr(), 256, 0, 1,
                              ctypes.addressof(hp), 0, 7, 1) == -1
    assert not p.any() and not c.any() and not m.any()


FLOAT_FORMS = [(kernels.Adam, kernels.Adam8bit, (1e-3, (0.9, 0.99))), (kernels.AdamW, kernels.AdamW8bit, (1e-3,)),
               (kernels.SGD, kernels.SGD8bit, (0.05, 0.9)), (kernels.RMSprop, kernels.RMSprop8bit, (1e-3, 0.9)),
               (kernels.Adagrad, kernels.Adagrad8bit, (0.05,)), (kernels.Lion, kernels.Lion8bit, (1e-3,)),
               (kernels.NAdam, kernels.NAdam8bit, (1e-3,)), (kernels.RAdam, kernels.RAdam8bit, (1e-3,))]


@pytest.mark.parametrize("cls, q8_cls, args", FLOAT_FORMS, ids=[c.__name__ for c, _, _ in FLOAT_FORMS])
def test_state_is_an_argument(cls, q8_cls, args):
    """``state="8bit"`` builds the optimizer's 8-bit form from the same arguments (positional ones included)
    and steps exactly as it does; ``state="bf16"`` is ``state_dtype=torch.bfloat16``; copies stay what they
    are."""
    import copy

    def run(make, fused=False):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(40))]
        opt = make(ps, fused)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return opt, [p.detach().clone() for p in ps]

    a, pa = run(lambda ps, f: cls(ps, *args, fused=f, state="8bit", block_size=128))
    b, pb = run(lambda ps, f: q8_cls(ps, *args, fused=f, block_size=128))
    assert type(a) is q8_cls and a.param_groups[0]["block_size"] == 128
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert type(copy.deepcopy(a)) is q8_cls
    c, pc = run(lambda ps, f: cls(ps, *args, fused=f, state="bf16"))
    d, pd = run(lambda ps, f: cls(ps, *args, fused=f, state_dtype=torch.bfloat16))
    assert type(c) is cls and c.param_groups[0]["state_dtype"] is torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(pc, pd))
    e = cls([torch.nn.Parameter(torch.randn(3))], *args, state="param")
    assert type(e) is cls and "state_dtype" not in e.param_groups[0] and "state" not in e.param_groups[0]


def test_state_refusals_name_the_optimizer_and_the_values():
    p = [torch.nn.Parameter(torch.zeros(3))]
    cases = [(lambda: kernels.AdamW(p, state="4bit"), r"^AdamW: state must be one of 'param', 'bf16', '8bit' "
                                                      r"\(got '4bit'\)$"),
             (lambda: kernels.Adam(p, state="bf16", state_dtype=torch.float16),
              r"^Adam: state='bf16' and state_dtype=torch.float16 disagree; give one of them$"),
             (lambda: kernels.SGD(p, 0.1, 0.9, state="8bit", kahan_sum=True),
              r"^SGD: kahan_sum=True with state='8bit' is not supported yet$"),
             (lambda: kernels.AdamW8bit(p, state="bf16"),
              r"^AdamW8bit: keeps 8-bit state \(state='8bit'\), got state='bf16'; for other state use kernels.AdamW$")]

    class MyAdamW(kernels.AdamW):
        pass

    cases.append((lambda: MyAdamW(p, state="8bit"), r"^MyAdamW: state='8bit' is not available for this class"))
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_a_rule_may_set_the_state_codec(tmp_path):
    """The catalog types ``state`` as a choice: a rule may set ``AdamW: {state: 8bit}``, and the advice builds
    an AdamW8bit; a word outside the choice is refused at load, by rule and file line."""
    from optadvisor.advisor import advise, load_rules

    assert kernels.catalog.entry("AdamW").params["state"].type == "choice:param|bf16|8bit"
    rule = ("rules:\n  - id: small-state\n    description: d\n    when: \"task == 'regression'\"\n    then:\n"
            "      optimizer: {AdamW: 50}\n      params:\n        AdamW: {state: %s, lr: 0.002}\n    because: b\n"
            "    source: s\n    examples:\n      - facts: {task: regression}\n        fires: true\n")
    good = tmp_path / "good.yaml"
    good.write_text(rule % "8bit")
    rec = advise(task="regression", n_samples=500, rules=load_rules(str(good)))
    opt = rec.build_optimizer([torch.nn.Parameter(torch.zeros(5000))])
    assert type(opt) is kernels.AdamW8bit and opt.param_groups[0]["lr"] == 0.002
    bad = tmp_path / "bad.yaml"
    bad.write_text(rule % "4bit")
    with pytest.raises(ValueError, match=r"small-state: AdamW.state: expected one of param, bf16, 8bit, got '4bit'"):
        load_rules(str(bad))


@pytest.mark.parametrize("cls", [kernels.Lion8bit, kernels.Adagrad8bit, kernels.AdamW8bit])
@pytest.mark.parametrize("fused", [False, STRICT])
def test_a_torch_op_8bit_step_in_chunks_is_the_step_in_one_call(cls, fused, monkeypatch):
    """The torch-op 8-bit path runs a long run in chunks of whole blocks (its temporaries are reused): the
    same bits as one call, stochastic rounding's draws included (each chunk seeded by its place)."""
    from optadvisor.kernels.precision import blockwise

    monkeypatch.setattr(_native, "available", lambda: None)  # the torch ops, where the C kernel would serve

    def run(chunk):
        monkeypatch.setattr(blockwise, "Q8_CHUNK", chunk)
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (3000, 70_001, 5000)]
        opt = cls(ps, lr=1e-3, fused=fused, min_8bit_size=0, block_size=64)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in ps], [v.clone() for st in opt.state.values() for v in st.values()]

    (p1, s1), (p2, s2) = run(1 << 30), run(1 << 12)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2)) and all(torch.equal(a, b) for a, b in zip(s1, s2))

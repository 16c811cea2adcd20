"""8-bit optimizer state (kernels.Adam8bit / AdamW8bit): the quantization's error bounds, the updates against
a plain reference of the same algorithm written here in simple torch ops (bit for bit, for the C kernel and
the torch-op path alike), checkpoints both ways, memory, and bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from q8reference import (
    Reference,
    _f32,
    _padded,
    _sqrt32,
    assert_bits,
    assert_matches,
    shapes,
    step_both,
)
from strategies import UNDER_MUTMUT, examples, make_grads, make_params, with_threshold

from optadvisor import kernels
from optadvisor.kernels._runtime import native as _native
from optadvisor.kernels.precision.q8math import dequantize, quantize

NATIVE = _native.library() is not None
# fused=True (a compile failure raises instead of falling back to eager) for the torch-op paths that use the 8-bit
# math (``_q8math``); under `mutmut run` that math is mutated, torch.compile cannot trace mutmut's trampolines,
# and these tests run with the default (the eager fallback) and check the values only
STRICT = None if UNDER_MUTMUT else True


PATHS = ["native", "torch-ops"] if NATIVE else ["torch-ops"]


def _configure(path, monkeypatch):
    """``fused`` for the path: the C kernel (the default on the CPU), or the torch ops (fused=False)."""
    return None if path == "native" else False


# ---- the quantization itself ---------------------------------------------------------------------------------
magnitudes = st.lists(st.floats(-12, 3), min_size=1, max_size=600)


@settings(max_examples=examples(60), deadline=None)
@given(exps=magnitudes, seed=st.integers(0, 2**16), block=st.sampled_from([1, 7, 64, 256]))
def test_first_moment_error_is_bounded_per_block(exps, seed, block):
    """|m - m'| <= 2 sqrt(|m| a) d + a d^2 with d = 1/254 (half a level in the square-root domain), a the
    block's absmax: relative to the block's largest value, never to a neighbour block's."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (len(exps),), generator=gen).float() * 2 - 1
    x = signs * torch.tensor([10.0 ** e for e in exps])
    codes, scale = quantize(x, block, torch.int8)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.dtype == torch.float32
    back = dequantize(codes, scale, block)
    a = _padded(x.abs(), block).amax(1).repeat_interleave(block)[:x.numel()]
    d = 1 / 254 * (1 + 1e-5)
    bound = 2 * (x.abs() * a).sqrt() * d + a * d * d + 1e-6 * a
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(scale, _padded(x.abs(), block).amax(1))
    assert (back.sign() * x.sign() >= 0).all()  # never the wrong sign


@settings(max_examples=examples(60), deadline=None)
@given(exps=magnitudes, block=st.sampled_from([1, 7, 64, 256]))
def test_second_moment_error_is_bounded_and_never_zero(exps, block):
    """sqrt(v') is within half a level (sqrt(a)/512) of sqrt(v) where v is above the lowest level; below it v'
    is that level (a/65536): small second moments are over-estimated, never rounded to 0."""
    v = torch.tensor([10.0 ** e for e in exps])
    codes, scale = quantize(v, block, torch.uint8)
    assert codes.dtype == torch.uint8 and codes.shape == v.shape and scale.dtype == torch.float32
    back = dequantize(codes, scale, block)
    a = _padded(v, block).amax(1).repeat_interleave(block)[:v.numel()]
    low = a / 65536
    above = v >= low
    err = (back.sqrt() - v.sqrt()).abs()
    assert (err[above] <= a[above].sqrt() / 512 * (1 + 1e-5) + 1e-7 * a[above].sqrt()).all()
    assert torch.allclose(back[~above], low[~above], rtol=1e-6)
    assert (back > 0).all()


def test_non_finite_second_moments_are_left_out_of_the_scale():
    v = torch.tensor([0.25, float("inf"), 0.5, float("nan"), 0.0, 0.01, 0.04, 0.09])
    codes, scale = quantize(v, 4, torch.uint8)
    assert codes[1] == 0 and codes[3] == 0
    assert torch.equal(scale, torch.tensor([0.5, 0.09]))  # the finite maxima, not inf nor a stand-in value
    assert codes[0].item() == round(256 * (0.25 / 0.5) ** 0.5) - 1


def test_non_finite_moments_do_not_reach_other_elements():
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5, 0.25, 3.0, -1.0, 0.5, float("nan"), -0.25, 0.1])
    codes, scale = quantize(x, 4, torch.int8)
    assert codes[1] == 0 and codes[3] == 0 and codes[9] == 0
    assert scale.tolist() == [2.0, 3.0, 0.5]  # the finite maxima, not inf nor a stand-in value
    clean = x.clone()
    clean[1] = clean[3] = 0
    assert torch.equal(codes, quantize(clean, 4, torch.int8)[0])


# ---- updates: bit for bit against the reference ------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=shapes, seed=st.integers(0, 2**16), block=st.sampled_from([1, 3, 8, 64, 256]),
       lr=st.sampled_from([1e-3, 1e-2, 0.1]), betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
       eps=st.sampled_from([1e-8, 1e-3]), wd=st.sampled_from([0.0, 1e-2]), maximize=st.booleans(),
       decoupled=st.booleans(), direct=st.sampled_from([1, 1 << 16]), steps=st.integers(1, 8))
def test_updates_equal_the_reference(path, dtype, monkeypatch, specs, seed, block, lr, betas, eps, wd, maximize,
                                     decoupled, direct, steps):
    """Random shapes (0-dim, empty, sizes no block divides, non-contiguous), hyperparameters, block sizes,
    steps with some gradients missing, gradients copied or read where they lie: parameters, codes and scales
    equal the reference's bit for bit, on the C kernel and on the torch-op path."""
    params = make_params(specs, dtype, seed)
    grads = make_grads(params, steps, seed, none_prob=0.2, scale=0.1)
    cls = with_threshold(kernels.Adam8bit, direct)
    opt = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, maximize=maximize,
              decoupled_weight_decay=decoupled, block_size=block, min_8bit_size=0,
              fused=_configure(path, monkeypatch))
    ref = Reference(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, maximize=maximize,
                    decoupled=decoupled, block_size=block)
    step_both(opt, ref, params, grads)
    assert_matches(opt, params, ref)


def test_float16_parameters_follow_the_reference_closely():
    """float16 parameters take the torch-op path, compiled (fused=True: a compile failure raises rather than
    falling back to eager; see STRICT): within an fp16 ulp of the reference."""
    params = make_params([((300,), False, False), ((17, 5), False, False)], torch.float16, 3)
    opt = kernels.AdamW8bit(params, lr=1e-2, min_8bit_size=0, block_size=64, fused=STRICT)
    ref = Reference(params, lr=1e-2, weight_decay=1e-2, decoupled=True, block_size=64)
    step_both(opt, ref, params, make_grads(params, 5, 3, none_prob=0.0, scale=0.1))
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-3, atol=2 ** -8)


def test_the_torch_op_path_serves_when_no_kernel_can_be_built(monkeypatch):
    """OPTADVISOR_NATIVE=0 (or no C compiler): the same bits from the torch ops."""
    monkeypatch.setenv(_native.ENV_VAR, "0")
    assert _native.library() is None
    params = make_params([((3000,), False, False)], torch.float32, 5)
    opt = kernels.Adam8bit(params, min_8bit_size=0)
    ref = Reference(params)
    for row in make_grads(params, 3, 5, none_prob=0.0):
        params[0].grad = row[0]
        opt.step()
        ref.step(row)
    assert_matches(opt, params, ref)


def test_small_parameters_keep_float_state_and_match_adam():
    """Below min_8bit_size a parameter keeps float state and steps exactly as kernels.Adam; above it, the
    8-bit reference. One group holds both kinds."""
    torch.manual_seed(0)
    small, large = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(5000))
    twin = torch.nn.Parameter(small.detach().clone())
    opt = kernels.AdamW8bit([small, large], lr=1e-2)
    adam = kernels.AdamW([twin], lr=1e-2)
    ref = Reference([large], lr=1e-2, weight_decay=1e-2, decoupled=True)
    for _ in range(4):
        gs, gl = torch.randn(100), torch.randn(5000)
        small.grad, large.grad, twin.grad = gs, gl, gs.clone()
        opt.step()
        adam.step()
        ref.step([gl])
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    assert torch.equal(small.detach(), twin.detach())
    assert torch.equal(opt.state[small]["exp_avg_sq"], adam.state[twin]["exp_avg_sq"])
    assert_bits(large.detach(), ref.params[0], "large parameter")


def test_many_optimizers_in_one_process_keep_their_own_state():
    """Optimizers of different sizes, block sizes and options, stepped interleaved: each equals its own
    reference (nothing cached per process leaks between them)."""
    configs = [dict(block_size=256), dict(block_size=3, lr=0.1), dict(block_size=64, maximize=True),
               dict(block_size=256, weight_decay=0.1, decoupled_weight_decay=True), dict(block_size=17)]
    runs = []
    for k, cfg in enumerate(configs):
        params = make_params([((7 + 50 * k,), False, False), ((3, 11 * (k + 1)), False, False)], torch.float32, k)
        opt = kernels.Adam8bit(params, min_8bit_size=0, **cfg)
        ref = Reference(params, lr=cfg.get("lr", 1e-3), maximize=cfg.get("maximize", False),
                        weight_decay=cfg.get("weight_decay", 0.0), decoupled=cfg.get("decoupled_weight_decay", False),
                        block_size=cfg["block_size"])
        runs.append((params, opt, ref, make_grads(params, 4, k, none_prob=0.0)))
    for step in range(4):
        for params, opt, ref, grads in runs:
            for p, g in zip(params, grads[step]):
                p.grad = g
            opt.step()
            ref.step(grads[step])
    for params, opt, ref, _ in runs:
        assert_matches(opt, params, ref)


# ---- memory ------------------------------------------------------------------------------------------------
def _state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


def test_state_memory_is_a_quarter_of_fp32_adams():
    """ResNet-50's parameter shapes: 8-bit state (codes, scales and the float state of small parameters)
    <= 0.27x fp32 Adam's."""
    from benchmarks.cases import resnet50_shapes

    def build(cls):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in resnet50_shapes()]
        opt = cls(params, lr=1e-3)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        return opt

    ratio = _state_bytes(build(kernels.Adam8bit)) / _state_bytes(build(kernels.Adam))
    assert ratio <= 0.27, ratio


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _trained(cls, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3)).to(dtype)
    opt = cls(model.parameters(), lr=1e-2, **kw)
    for _ in range(3):
        model(torch.randn(16, 64, dtype=dtype)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _continue(model, opt, steps=3, seed=5):
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model(torch.randn(16, 64, dtype=dtype)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_exact(tmp_path, dtype):
    """Saved, loaded and continued: the same bits. With bfloat16 parameters torch's load_state_dict casts every
    state tensor to the parameter's dtype; the codes and their float32 scales are put back as saved."""
    model, opt = _trained(kernels.AdamW8bit, dtype, block_size=64)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    sd = opt.state_dict()
    keys = list(sd["state"][0])
    assert keys == ["step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"]
    assert sd["param_groups"][0]["block_size"] == 64
    twin = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3)).to(dtype)
    twin.load_state_dict(model.state_dict())
    opt2 = kernels.AdamW8bit(twin.parameters(), lr=1e-2)  # block_size comes back from the checkpoint
    opt2.load_state_dict(torch.load(path))
    assert opt.state[model[0].weight]["exp_avg_absmax"].dtype == torch.float32
    for a, b in zip(model.parameters(), twin.parameters()):
        for k, v in opt.state[a].items():
            assert v.dtype == opt2.state[b][k].dtype and torch.equal(v, opt2.state[b][k]), k
    for a, b in zip(_continue(model, opt), _continue(twin, opt2)):
        assert torch.equal(a, b)


def test_a_torch_fp32_checkpoint_is_quantized_on_load():
    model, topt = _trained(torch.optim.Adam, foreach=False)
    saved = topt.state_dict()
    opt = kernels.Adam8bit(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved)
    w = model[0].weight
    codes, scale = quantize(saved["state"][0]["exp_avg"], 256, torch.int8)
    assert torch.equal(opt.state[w]["exp_avg"], codes) and torch.equal(opt.state[w]["exp_avg_absmax"], scale)
    codes, scale = quantize(saved["state"][0]["exp_avg_sq"], 256, torch.uint8)
    assert torch.equal(opt.state[w]["exp_avg_sq"], codes)
    assert opt.state[model[0].bias]["exp_avg"].dtype == torch.float32  # small: float state, as saved
    assert float(opt.state[w]["step"]) == 3
    _continue(model, opt)


def test_an_8bit_checkpoint_is_dequantized_for_float_optimizers():
    model, opt = _trained(kernels.Adam8bit)
    sd = opt.state_dict()
    w = model[0].weight
    expect = dequantize(opt.state[w]["exp_avg"], opt.state[w]["exp_avg_absmax"], 256)
    fopt = kernels.Adam(model.parameters(), lr=1e-2)
    fopt.load_state_dict(sd)
    assert torch.equal(fopt.state[w]["exp_avg"], expect) and "exp_avg_absmax" not in fopt.state[w]
    topt = torch.optim.Adam(model.parameters(), lr=1e-2)
    topt.load_state_dict(kernels.dequantize_state_dict(sd))
    assert torch.equal(topt.state[w]["exp_avg"], expect)
    _continue(model, topt)


def test_dequantize_state_dict_keeps_everything_but_the_8bit_form():
    """Codes become float32 (each with its own block size), scales are dropped, float state and every other
    group option stay, the 8-bit options go; the input is not changed."""
    model, opt = _trained(kernels.AdamW8bit, block_size=64, weight_decay=0.05)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(80, 70))], "block_size": 128})
    extra = opt.param_groups[1]["params"][0]
    extra.grad = torch.randn(80, 70)
    opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(sd)
    out = kernels.dequantize_state_dict(sd)
    assert [list(g) for g in out["param_groups"]] == [[k for k in g if k not in ("block_size", "min_8bit_size")]
                                                     for g in sd["param_groups"]]
    assert out["param_groups"][0]["weight_decay"] == 0.05 and "decoupled_weight_decay" in out["param_groups"][0]
    w = model[0].weight
    for pid, p, block in ((0, w, 64), (4, extra, 128)):
        entry = out["state"][pid]
        assert list(entry) == ["step", "exp_avg", "exp_avg_sq"]
        for key in ("exp_avg", "exp_avg_sq"):
            expect = dequantize(opt.state[p][key], opt.state[p][key + "_absmax"], block)
            assert entry[key].dtype == torch.float32 and torch.equal(entry[key], expect)
    small = out["state"][1]  # the first bias: float state, kept as it is
    assert small["exp_avg"] is sd["state"][1]["exp_avg"]
    assert list(sd["state"][0]) == list(before["state"][0]) and sd["param_groups"][0]["block_size"] == 64
    assert torch.equal(sd["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


@pytest.mark.parametrize("edit, message", [
    (None, "dequantize_state_dict needs an optimizer state_dict (keys 'state' and 'param_groups')"),
    (lambda sd: sd.pop("state"),
     "dequantize_state_dict needs an optimizer state_dict (keys 'state' and 'param_groups')"),
    (lambda sd: sd.pop("param_groups"),
     "dequantize_state_dict needs an optimizer state_dict (keys 'state' and 'param_groups')"),
    (lambda sd: sd["state"][0].pop("exp_avg_absmax"),
     "state of parameter 0: 'exp_avg' holds 8-bit codes but 'exp_avg_absmax', the per-block scales needed to "
     "read them, is missing"),
    (lambda sd: sd["param_groups"][0].pop("block_size"),
     "state of parameter 0: 'exp_avg' holds 8-bit codes but the saved parameter group has no valid "
     "'block_size' (got None); it is needed to read them"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_sq_absmax", torch.zeros(3)),
     "state of parameter 0: 'exp_avg_sq_absmax' must hold 20 float scales (one per block of 256 elements), "
     "got 3 of dtype torch.float32"),
])
def test_dequantize_state_dict_refuses_what_it_cannot_read(edit, message):
    _, opt = _trained(kernels.Adam8bit)
    sd = opt.state_dict()
    if edit is None:
        sd = [sd]
    else:
        edit(sd)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        kernels.dequantize_state_dict(sd)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["state"][0].pop("exp_avg_absmax"),
     r"state of parameter 0 in group 0: 'exp_avg' holds 8-bit codes but 'exp_avg_absmax', the per-block "
     r"scales needed to read them, is missing"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_sq_absmax", torch.zeros(3)),
     r"'exp_avg_sq_absmax' must hold 20 float scales \(one per block of 256 elements\), got 3"),
    (lambda sd: sd["param_groups"][0].pop("block_size"), "no valid 'block_size' \\(got None\\)"),
    (lambda sd: sd["param_groups"][0].__setitem__("block_size", 0), "no valid 'block_size' \\(got 0\\)"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].to(torch.int16)),
     r"has dtype torch.int16; state is floating point, or 8-bit codes \(int8 for a first moment, uint8 for a "
     r"second moment\) with a float32 scale per block"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg_sq"]), "holds torch.uint8 codes"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].to(torch.uint8)),
     "holds torch.uint8 codes, but this optimizer stores 'exp_avg' as torch.int8"),
])
def test_bad_checkpoints_are_refused_before_anything_changes(edit, message):
    """Each refusal names the parameter, the key and what is wrong, and leaves the state as it was."""
    model, opt = _trained(kernels.Adam8bit)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    sd = opt.state_dict()
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": [dict(g) for g in sd["param_groups"]]}
    edit(sd)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, before[k]), k


# ---- bad arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(block_size=0), r"block_size must be an int in \[1, 4096\] \(got 0\)"),
    (dict(block_size=5000), r"block_size must be an int in \[1, 4096\]"),
    (dict(block_size=2.5), r"block_size must be an int"),
    (dict(block_size=True), r"block_size must be an int"),
    (dict(min_8bit_size=-1), r"min_8bit_size must be an int in \[0, inf\]"),
    (dict(amsgrad=True), r"amsgrad=True is not supported with 8-bit state"),
    (dict(lr=-1.0), r"Invalid learning rate"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.Adam8bit([torch.nn.Parameter(torch.zeros(10))], **kwargs)


@pytest.mark.parametrize("path", PATHS)
def test_the_largest_block_size_equals_the_reference(path, monkeypatch):
    """block_size=4096 is allowed (the C kernel keeps a block in two stack arrays of that many floats):
    a parameter of one full block and a part of another, the same bits as the reference."""
    params = make_params([((5000,), False, False), ((4096,), False, False)], torch.float32, 1)
    grads = make_grads(params, 3, 1, none_prob=0.0, scale=0.1)
    opt = kernels.Adam8bit(params, lr=1e-2, block_size=4096, min_8bit_size=0,
                           fused=_configure(path, monkeypatch))
    ref = Reference(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False,
                    decoupled=False, block_size=4096)
    step_both(opt, ref, params, grads)
    assert_matches(opt, params, ref)
    assert opt.state[params[0]]["exp_avg_absmax"].numel() == 2


@pytest.mark.parametrize("fused, strict", [(True, True), (None, False)])
def test_the_compiled_8bit_update_is_strict_only_when_fused_is_true(monkeypatch, fused, strict):
    """fused=True: a compile failure raises (it is asked for); the default falls back to eager ops. Under
    mutmut the tests run with the default (its trampolines do not compile), so this is checked by call."""
    from optadvisor.kernels.precision import blockwise as _quantized  # (where the 8-bit step lives)
    calls = []
    monkeypatch.setattr(_quantized, "run_fused",
                        lambda fn, flags, tensors, hp, strict: calls.append((hp.tolist(), strict)) or (False, None))
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float16))  # float16: the torch ops, compiled
    opt = kernels.Adam8bit([p], lr=1e-2, min_8bit_size=0, block_size=32, fused=fused)
    p.grad = torch.randn(64, dtype=torch.float16)
    opt.step()
    assert [c[1] for c in calls] == [strict] and len(calls[0][0]) == 9  # and the step's 9 scalars


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "SGD8bit", "RMSprop8bit"])
def test_min_8bit_size_is_the_smallest_quantized_parameter(name):
    """A parameter of exactly ``min_8bit_size`` elements keeps 8-bit state; one element fewer, float32."""
    kw = {"momentum": 0.9} if name in ("SGD8bit", "RMSprop8bit") else {}
    at, below = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(99))
    opt = getattr(kernels, name)([at, below], lr=1e-3, min_8bit_size=100, block_size=32, **kw)
    for p in (at, below):
        p.grad = torch.randn(p.shape)
    opt.step()
    key = {"SGD8bit": "momentum_buffer", "RMSprop8bit": "square_avg"}.get(name, "exp_avg")
    assert opt.state[at][key].dtype in (torch.int8, torch.uint8) and key + "_absmax" in opt.state[at]
    assert opt.state[below][key].dtype == torch.float32 and key + "_absmax" not in opt.state[below]
    for block in (1, 4096):  # the bounds themselves are allowed
        assert getattr(kernels, name)([torch.nn.Parameter(torch.zeros(3))], block_size=block, min_8bit_size=0,
                                      **kw).defaults["block_size"] == block


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_float64_and_complex_parameters_are_refused(dtype):
    ok = torch.nn.Parameter(torch.zeros(10))
    bad = torch.nn.Parameter(torch.zeros(10, dtype=dtype))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[1\] is {dtype}"):
        kernels.Adam8bit([ok, bad])
    opt = kernels.Adam8bit([ok])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1  # the refused group left nothing behind


@pytest.mark.parametrize("key, value, message", [
    ("block_size", 0, "SGD8bit: parameter group 1: block_size must be an int in [1, 4096] (got 0)"),
    ("block_size", 4097, "SGD8bit: parameter group 1: block_size must be an int in [1, 4096] (got 4097)"),
    ("min_8bit_size", -1, "SGD8bit: parameter group 1: min_8bit_size must be an int in [0, inf] (got -1)"),
    ("min_8bit_size", 2.5, "SGD8bit: parameter group 1: min_8bit_size must be an int in [0, inf] (got 2.5)"),
])
def test_a_group_with_a_bad_8bit_option_is_refused(key, value, message):
    opt = kernels.SGD8bit([torch.nn.Parameter(torch.zeros(10))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], key: value})
    assert len(opt.param_groups) == 1


def test_changing_block_size_after_construction_is_refused():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = kernels.RMSprop8bit([p], min_8bit_size=0)
    opt.param_groups[0]["block_size"] = 128
    p.grad = torch.ones(10)
    with pytest.raises(ValueError, match="^" + re.escape(
            "RMSprop8bit: param_groups[0]['block_size'] was changed from 256 to 128 after construction; the "
            "state is laid out in blocks of the first, so build a new optimizer to change it") + "$"):
        opt.step()


# ---- bfloat16 state (kernels.Adam/AdamW(state_dtype=torch.bfloat16)) ------------------------------------------
def _hash16(index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented 32-bit hash, written out in plain int64 torch ops: its low and high 16 bits."""
    m = 0xFFFFFFFF
    x = (index + step * 0x9E3779B) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & m
    x ^= x >> 16
    return x & 0xFFFF, x >> 16


def _sr(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    raw = x.view(torch.int32).long() + bits  # add in int64, then keep the high half of the 32 bits
    kept = (raw & 0xFFFF0000).to(torch.int32)  # back to int32: the cast wraps as two's complement
    out = kept.view(torch.float32)
    return torch.where(x.isfinite(), out, x).to(torch.bfloat16)


class BF16Reference:
    """Adam(W) with float32 arithmetic and bfloat16 moments stored by stochastic rounding (one parameter per
    bucket here: positions are 0..n-1 within it)."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
                 maximize=False):
        self.params = [p.detach().clone() for p in params]
        self.kw = dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, decoupled=decoupled, maximize=maximize)
        self.state = [None] * len(params)

    def step(self, grads, offsets):
        for i, g in enumerate(grads):
            if g is None:
                continue
            p, kw = self.params[i], self.kw
            if self.state[i] is None:
                self.state[i] = dict(step=0, m=torch.zeros(p.numel(), dtype=torch.bfloat16),
                                     v=torch.zeros(p.numel(), dtype=torch.bfloat16))
            s = self.state[i]
            s["step"] += 1
            t = s["step"]
            b1, b2 = kw["betas"]
            P, G = p.reshape(-1).clone(), g.reshape(-1).float()
            if kw["maximize"]:
                G = -G
            if kw["wd"] and not kw["decoupled"]:
                G = G + _f32(kw["wd"]) * P
            elif kw["wd"]:
                P = P * _f32(1 - kw["lr"] * kw["wd"])
            m, v = s["m"].float(), s["v"].float()
            m = m + _f32(1 - b1) * (G - m)
            v = v * _f32(b2) + _f32(1 - b2) * (G * G)
            denom = _sqrt32(v) * _f32(1 / (1 - b2 ** t) ** 0.5) + _f32(kw["eps"])
            p.copy_((P - (_f32(kw["lr"] / (1 - b1 ** t)) * m) / denom).view(p.shape))
            low, high = _hash16(torch.arange(p.numel(), dtype=torch.int64) + offsets[i], t)
            s["m"], s["v"] = _sr(m, low), _sr(v, high)


@pytest.mark.parametrize("fused", [None, False])
@settings(max_examples=examples(20), deadline=None)
@given(specs=shapes, seed=st.integers(0, 2**16), lr=st.sampled_from([1e-3, 0.1]), wd=st.sampled_from([0.0, 0.1]),
       decoupled=st.booleans(), maximize=st.booleans(), steps=st.integers(1, 6))
def test_bf16_state_equals_the_reference(fused, specs, seed, lr, wd, decoupled, maximize, steps):
    """float32 parameters, bfloat16 moments: parameters and state bit for bit as the reference, compiled
    and eager, with gradients missing in some steps."""
    params = make_params(specs, torch.float32, seed)
    grads = make_grads(params, steps, seed, none_prob=0.2)
    opt = kernels.Adam(params, lr=lr, weight_decay=wd, decoupled_weight_decay=decoupled, maximize=maximize,
                       state_dtype=torch.bfloat16, fused=fused)
    ref = BF16Reference(params, lr=lr, weight_decay=wd, decoupled=decoupled, maximize=maximize)
    bucket = opt._buckets[0]
    offsets = [bucket.offsets[bucket.positions.index(i)] for i in range(len(params))]
    for row in grads:
        for p, g in zip(params, row):
            p.grad = g
        opt.step()
        ref.step(row, offsets)
    for i, p in enumerate(params):
        assert_bits(p.detach(), ref.params[i], f"param {i}")
        if ref.state[i] is not None:
            assert_bits(opt.state[p]["exp_avg"].reshape(-1), ref.state[i]["m"], f"exp_avg {i}")
            assert_bits(opt.state[p]["exp_avg_sq"].reshape(-1), ref.state[i]["v"], f"exp_avg_sq {i}")


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    from optadvisor.kernels.precision.bf16 import random_bits, stochastic_round

    x = torch.full((200_000,), 1.0 + 2 ** -10, dtype=torch.float32)  # a quarter of a bf16 ulp above 1
    out = stochastic_round(x, random_bits(torch.arange(200_000), torch.tensor(7))[1]).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(out.mean().item() - x[0].item()) < 2 ** -7 * 0.01  # mean within 1% of an ulp
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    back = stochastic_round(special, random_bits(torch.arange(5), torch.tensor(1))[0]).float()
    assert back[0].isnan() and back[1] == float("inf") and back[2] == -float("inf") and (back[3:] == 0).all()


def test_bf16_second_moment_decays_where_round_to_nearest_would_stall():
    """With zero gradients v <- 0.999 v: in bfloat16, rounding to nearest leaves v unchanged forever; the
    stored moments follow 0.999^t on average."""
    p = torch.nn.Parameter(torch.zeros(50_000))
    opt = kernels.Adam([p], state_dtype=torch.bfloat16)
    p.grad = torch.ones(50_000)
    opt.step()
    v0 = opt.state[p]["exp_avg_sq"].float().mean().item()
    p.grad = torch.zeros(50_000)
    for _ in range(300):
        opt.step()
    v = opt.state[p]["exp_avg_sq"].float().mean().item()
    assert v == pytest.approx(v0 * 0.999 ** 300, rel=0.02)
    assert torch.tensor(v0, dtype=torch.bfloat16) * 0.999 == torch.tensor(v0, dtype=torch.bfloat16)  # RNE stalls


def test_bf16_state_memory_and_checkpoints():
    model, opt = _trained(kernels.AdamW, state_dtype=torch.bfloat16)
    fp32 = _trained(kernels.AdamW)[1]
    assert _state_bytes(opt) / _state_bytes(fp32) == 0.5
    sd = opt.state_dict()
    twin = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))
    twin.load_state_dict(model.state_dict())
    opt2 = kernels.AdamW(twin.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])
    for a, b in zip(_continue(model, opt), _continue(twin, opt2)):
        assert torch.equal(a, b)
    torch.optim.AdamW(model.parameters(), lr=1e-2).load_state_dict(opt.state_dict())  # torch reads it


@pytest.mark.parametrize("kwargs, params, message", [
    (dict(state_dtype=torch.float16), [torch.zeros(3)], "state_dtype must be None .* or torch.bfloat16"),
    (dict(state_dtype=torch.bfloat16, amsgrad=True), [torch.zeros(3)], "amsgrad=True with state_dtype"),
    (dict(state_dtype=torch.bfloat16), [torch.zeros(3, dtype=torch.float64)],
     r"param_groups\[0\]\['params'\]\[0\] is torch.float64; state_dtype=torch.bfloat16 serves float32"),
])
def test_bf16_state_bad_arguments(kwargs, params, message):
    with pytest.raises(ValueError, match=message):
        kernels.Adam([torch.nn.Parameter(t) for t in params], **kwargs)


def test_gradients_in_the_buffer_and_mixed_checkpoint_state():
    """zero_grad(set_to_none=False) puts gradients in the (block-aligned) buffer: the same bits as gradients
    of their own. A checkpoint whose group mixes 8-bit and float state for quantized parameters loads each."""
    params = make_params([((1000,), False, False), ((37, 9), False, False)], torch.float32, 11)
    opt = kernels.Adam8bit(params, min_8bit_size=0, block_size=64)
    ref = Reference(params, block_size=64)
    for step, row in enumerate(make_grads(params, 4, 11, none_prob=0.0)):
        if step == 0:
            for p, g in zip(params, row):
                p.grad = g
        else:
            opt.zero_grad(set_to_none=False)
            for p, g in zip(params, row):
                p.grad.copy_(g)
        opt.step()
        ref.step(row)
    assert_matches(opt, params, ref)
    assert params[0].grad.data_ptr() == opt._buckets[0].flat_grad.data_ptr()
    sd = opt.state_dict()
    mixed = {"state": {0: dict(sd["state"][0]), 1: dict(sd["state"][1])}, "param_groups": sd["param_groups"]}
    for key in ("exp_avg", "exp_avg_sq"):  # parameter 1 as a float optimizer would have saved it
        mixed["state"][1][key] = dequantize(sd["state"][1][key], sd["state"][1][key + "_absmax"], 64)
        del mixed["state"][1][key + "_absmax"]
    opt2 = kernels.Adam8bit([torch.nn.Parameter(p.detach().clone()) for p in params], min_8bit_size=0,
                            block_size=64)
    opt2.load_state_dict(mixed)
    p0, p1 = opt2.param_groups[0]["params"]
    assert torch.equal(opt2.state[p0]["exp_avg"], opt.state[params[0]]["exp_avg"])
    back = dequantize(opt2.state[p1]["exp_avg"], opt2.state[p1]["exp_avg_absmax"], 64)
    want = dequantize(opt.state[params[1]]["exp_avg"], opt.state[params[1]]["exp_avg_absmax"], 64)
    torch.testing.assert_close(back, want, rtol=0.02, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9)), ("SGD", dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01)), ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True, maximize=True)),
    ("AdamW", dict(lr=0.01)), ("Adagrad", dict(lr=0.05, initial_accumulator_value=0.125, weight_decay=0.01)),  # (exact in bf16)
])
@pytest.mark.parametrize("fused", [None, False])
def test_bf16_state_is_torchs_step_then_stochastic_rounding(name, kwargs, fused):
    """Each step, from the same (bfloat16) state: the parameters equal torch.optim's for-loop step within
    float32 tolerance, and each new state is torch's float32 state stochastically rounded with the
    documented bits (equal, or one bfloat16 ulp away where the float32 values straddle a rounding point)."""
    from optadvisor.kernels.precision.bf16 import random_bits, stochastic_round

    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(3000))
    opt = getattr(kernels, name)([p], state_dtype=torch.bfloat16, fused=fused, **kwargs)
    keys = None
    for t in range(1, 6):
        g = torch.randn(3000)
        q = torch.nn.Parameter(p.detach().clone())
        ref = getattr(torch.optim, name)([q], foreach=False, **kwargs)
        if keys:
            ref.state[q] = {k: (v.float().clone() if k != "step" else v.clone()) for k, v in opt.state[p].items()}
        p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1.3e-6, atol=1e-5)
        keys = [k for k in ref.state[q] if k != "step"]
        halves = random_bits(torch.arange(3000), torch.tensor(t)) + random_bits(torch.arange(3000),
                                                                                 torch.tensor(t + (1 << 30)))
        for k, bits in zip(keys, halves):
            want = stochastic_round(ref.state[q][k], bits).float()
            got = opt.state[p][k].float()
            assert opt.state[p][k].dtype == torch.bfloat16
            ulp = want.abs().clamp_min(1e-30) * 2 ** -7
            assert ((got - want).abs() <= ulp).all(), k
            assert (got == want).float().mean() > 0.99, k


def test_codes_for_a_key_with_no_8bit_form_are_refused():
    """A float optimizer given 8-bit codes for a key it has no 8-bit form of (amsgrad's max_exp_avg_sq) says
    so; codes of a key that has one (Adagrad's sum, since Adagrad8bit) load dequantized."""
    p = torch.nn.Parameter(torch.zeros(300))
    adam = kernels.Adam([p], lr=0.1, amsgrad=True)
    p.grad = torch.ones(300)
    adam.step()
    sd = adam.state_dict()
    sd["state"][0]["max_exp_avg_sq"] = torch.zeros(300, dtype=torch.uint8)
    sd["state"][0]["max_exp_avg_sq_absmax"] = torch.zeros(2)
    sd["param_groups"][0]["block_size"] = 256
    with pytest.raises(ValueError, match=r"'max_exp_avg_sq' holds torch.uint8 codes, but this optimizer stores "
                                         r"'max_exp_avg_sq' only as floating point"):
        adam.load_state_dict(sd)
    adagrad = kernels.Adagrad([p], lr=0.1)
    sd = adagrad.state_dict()
    sd["state"][0]["sum"] = torch.full((300,), 255, dtype=torch.uint8)
    sd["state"][0]["sum_absmax"] = torch.tensor([0.5, 0.25])
    sd["param_groups"][0]["block_size"] = 256
    adagrad.load_state_dict(sd)
    assert torch.equal(adagrad.state[p]["sum"], torch.cat([torch.full((256,), 0.5), torch.full((44,), 0.25)]))


def test_block_size_one_round_trips():
    model, opt = _trained(kernels.Adam8bit, block_size=1, min_8bit_size=0)
    sd = opt.state_dict()
    opt2 = kernels.Adam8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    opt2.load_state_dict(sd)
    w = model[0].weight
    assert opt2.param_groups[0]["block_size"] == 1
    assert torch.equal(opt2.state[w]["exp_avg_absmax"], opt.state[w]["exp_avg_absmax"])


@pytest.mark.skipif(not NATIVE, reason="no C compiler: the torch-op path is the only one")
@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.1, momentum=0.9)), ("SGD", dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01,
                                                      maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)), ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True, maximize=True)),
    ("RMSprop", dict(lr=0.01, centered=True, weight_decay=0.1)), ("RMSprop", dict(lr=0.01, momentum=0.9, alpha=0.3)),
    ("Adam", dict(lr=0.01)), ("Adam", dict(lr=0.01, weight_decay=0.1, maximize=True, betas=(0.8, 0.9))),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, eps=1e-6)),
])
def test_bf16_state_c_kernels_give_the_torch_op_paths_bits(name, kwargs, monkeypatch):
    """Adam's, SGD's and RMSprop's bfloat16-state C kernels (the CPU default) compute the same bits as their float32
    fused update in torch ops with the documented stochastic rounding (OPTADVISOR_NATIVE=0), over gradients
    read in the buffer and where they lie, at an offset into the buffer (the random bits' positions). The torch
    ops run compiled with fused=True (see STRICT)."""
    runs = []
    for native in (True, False):
        monkeypatch.setenv(_native.ENV_VAR, "1" if native else "0")
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (301, 70_001)]
        opt = with_threshold(getattr(kernels, name), 1 << 16)(params, state_dtype=torch.bfloat16,
                                                              fused=None if native else STRICT, **kwargs)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert_bits(a.detach(), b.detach(), "param")
        for key, value in oa.state[a].items():
            assert_bits(value, ob.state[b][key], key)


_REFUSED_BY_ALL = {
    "capturable": "{}: capturable=True (CUDA-graph capture) is not supported by optadvisor's fused optimizers; "
                  "use torch.optim for graph capture",
    "differentiable": "{}: differentiable=True is not supported: the fused update runs under no_grad; use "
                      "torch.optim for differentiable optimization",
}
_REFUSED_BY_ONE = {
    "Adam8bit": ("amsgrad", "Adam8bit: amsgrad=True is not supported with 8-bit state (a third quantized "
                            "moment); use kernels.Adam(amsgrad=True)"),
    "AdamW8bit": ("amsgrad", "AdamW8bit: amsgrad=True is not supported with 8-bit state (a third quantized "
                             "moment); use kernels.Adam(amsgrad=True)"),
    "RMSprop8bit": ("centered", "RMSprop8bit: centered=True is not supported with 8-bit state (it divides by "
                                "sqrt(square_avg - grad_avg^2), a difference 8-bit codes cannot resolve); use "
                                "kernels.RMSprop(centered=True), or state_dtype=torch.bfloat16 there"),
}


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "SGD8bit", "RMSprop8bit"])
def test_8bit_optimizers_pass_every_option_on(name):
    """Each 8-bit optimizer hands torch's options to its base, which refuses what it cannot do, by the 8-bit
    optimizer's name, word for word; ``fused`` is handed on too."""
    cls = getattr(kernels, name)
    base = {"lr": 0.01, "momentum": 0.9} if name == "SGD8bit" else {}
    refusals = [(key, message.format(name)) for key, message in _REFUSED_BY_ALL.items()
                if not (key == "capturable" and name == "SGD8bit")]  # torch's SGD has no capturable
    if name in _REFUSED_BY_ONE:
        refusals.append(_REFUSED_BY_ONE[name])
    for key, message in refusals:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            cls([torch.nn.Parameter(torch.ones(3))], **base, **{key: True})
    for fused in (False, True):
        assert cls([torch.nn.Parameter(torch.ones(3))], fused=fused, **base)._fused is fused


def _hand_edited(edit):
    """An Adam8bit whose weight (8-bit) and bias (float) have state, ``opt.state`` then edited by hand and the
    parameter list replaced (so the next step rebuilds the buffers from ``opt.state``)."""
    model, opt = _trained(kernels.Adam8bit)
    edit(opt, model)
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return opt


@pytest.mark.parametrize("edit, message", [
    (lambda opt, m: opt.state[m[0].weight].pop("exp_avg_sq"),
     "state for parameter 0 of group 0 lacks 'exp_avg_sq', which Adam8bit needs"),
    (lambda opt, m: opt.state[m[0].weight].__setitem__("exp_avg", opt.state[m[0].weight]["exp_avg_sq"]),
     "state for parameter 0 of group 0: 'exp_avg' holds torch.uint8 codes; this optimizer stores 'exp_avg' as "
     "torch.int8"),
    (lambda opt, m: opt.state[m[0].weight].pop("exp_avg_absmax"),
     "state for parameter 0 of group 0: 'exp_avg' holds 8-bit codes but 'exp_avg_absmax' is missing"),
    (lambda opt, m: opt.state[m[0].bias].pop("exp_avg"),
     "state for parameter 1 of group 0 lacks 'exp_avg', which Adam8bit needs with these options"),
])
def test_hand_edited_8bit_state_is_refused_by_name_at_the_next_step(edit, message):
    opt = _hand_edited(edit)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        opt.step()


def test_hand_edited_float_state_is_taken_by_both_kinds_of_bucket():
    """Float state put into ``opt.state`` by hand: quantized for an 8-bit parameter, kept for a small one;
    8-bit codes put on a small parameter are dequantized with the group's block size."""
    model, opt = _trained(kernels.Adam8bit)
    w, b = model[0].weight, model[0].bias
    m = torch.randn(w.shape) * 1e-2
    codes, scale = quantize(torch.linspace(-1, 1, b.numel()), 256, torch.int8)

    def edit(opt, model):
        opt.state[w]["exp_avg"] = m.clone()
        del opt.state[w]["exp_avg_absmax"]
        opt.state[b]["exp_avg"], opt.state[b]["exp_avg_absmax"] = codes, scale
    edit(opt, model)
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])
    for p in model.parameters():
        p.grad = None
    opt.step()  # rebuilds (nothing to update): the state as the buffers now hold it
    expect_codes, expect_scale = quantize(m, 256, torch.int8)
    assert torch.equal(opt.state[w]["exp_avg"], expect_codes)
    assert torch.equal(opt.state[w]["exp_avg_absmax"], expect_scale)
    assert opt.state[b]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[b]
    assert torch.equal(opt.state[b]["exp_avg"], dequantize(codes, scale, 256))


class _Recording:
    """The C library, with its 8-bit step recorded: (kind, dtype code, elements, block) per call; and its
    bfloat16-state steps: (function, elements, position in the buffer, step count) per call."""

    _BF16 = {"adam_bf16state": 4, "sgd_bf16state": 3, "rmsprop_bf16state": 5}  # where the element count is

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def __getattr__(self, name):
        f = getattr(self.lib, name)
        if name not in self._BF16:
            return f
        at = self._BF16[name]

        def recorded(*args):
            self.calls.append((name, *args[at:at + 3]))
            return f(*args)
        return recorded

    def q8_step(self, kind, p, g, dtype, *rest):
        n, block = rest[4], rest[5]
        self.calls.append((kind, dtype, n, block))
        return self.lib.q8_step(kind, p, g, dtype, *rest)


@pytest.mark.skipif(not NATIVE, reason="no C compiler: the 8-bit step is the torch ops")
@pytest.mark.parametrize("name, kind", [("Adam8bit", 0), ("AdamW8bit", 0), ("SGD8bit", 1), ("RMSprop8bit", 2)])
def test_8bit_step_takes_the_c_kernel_where_it_applies(name, kind, monkeypatch):
    """On the CPU, float32 and bfloat16 parameters with 8-bit state are stepped by the C kernel, one call per
    8-bit bucket (the small parameters' float state is not its business); float16 parameters, fused=False and
    OPTADVISOR_NATIVE=0 take the torch ops."""
    recording = _Recording(_native.library())
    monkeypatch.setattr(_native, "available", lambda: recording)  # what a step asks
    kw = {"momentum": 0.9} if name in ("SGD8bit", "RMSprop8bit") else {}
    cls = getattr(kernels, name)

    def steps(dtype, **extra):
        recording.calls.clear()
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in [(70, 64), (5,), (40, 40)]]
        opt = cls(params, lr=1e-3, block_size=128, min_8bit_size=1024, **kw, **extra)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape).to(dtype)
            opt.step()
        return list(recording.calls)
    # one bucket: 70 * 64 = 35 blocks of 128, then 40 * 40 = 1600 padded to 13 blocks
    assert steps(torch.float32) == [(kind, 0, 35 * 128 + 13 * 128, 128)] * 2
    assert steps(torch.bfloat16) == [(kind, 1, 35 * 128 + 13 * 128, 128)] * 2
    assert steps(torch.float16) == []
    assert steps(torch.float32, fused=False) == []


@pytest.mark.skipif(not NATIVE, reason="no C compiler: the bfloat16-state step is the torch ops")
@pytest.mark.parametrize("name, function, kwargs", [
    ("Adam", "adam_bf16state", {}), ("AdamW", "adam_bf16state", {}),
    ("SGD", "sgd_bf16state", {"momentum": 0.9}), ("RMSprop", "rmsprop_bf16state", {"centered": True}),
])
def test_bf16_state_step_takes_the_c_kernel_where_it_applies(name, function, kwargs, monkeypatch):
    """On the CPU, bfloat16 state is stepped by the C kernel: one call per run, with the run's place in the
    buffer and the step count (the random bits' inputs), a gradient read where it lies included; fused=False
    and OPTADVISOR_NATIVE=0 take the torch ops (same bits: test_bf16_state_c_kernels_give_the_torch_op_paths_bits)."""
    recording = _Recording(_native.library())
    monkeypatch.setattr(_native, "available", lambda: recording)  # what a step asks

    def steps(**extra):
        recording.calls.clear()
        params = [torch.nn.Parameter(torch.randn(n)) for n in (301, 70_001)]
        opt = with_threshold(getattr(kernels, name), 1 << 16)(params, lr=1e-3, state_dtype=torch.bfloat16,
                                                              **kwargs, **extra)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
        start = (params[1].data_ptr() - params[0].data_ptr()) // 4  # where the large one lies in the buffer
        return list(recording.calls), start
    calls, start = steps()
    assert start >= 301
    assert calls == [(function, 301, 0, 1), (function, 70_001, start, 1),
                     (function, 301, 0, 2), (function, 70_001, start, 2)]
    assert steps(fused=False)[0] == []
    monkeypatch.setattr(_native, "available", lambda: None)
    assert steps()[0] == []

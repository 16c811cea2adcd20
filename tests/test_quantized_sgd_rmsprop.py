"""8-bit SGD (momentum buffer) and RMSprop (square average, momentum buffer), and what all 8-bit optimizers
share (NaN confinement, many instances in one process): updates against plain references
of the same algorithms (tests/q8reference.py) bit for bit on the C kernel and the torch-op path, float state
below ``min_8bit_size`` equal to kernels.SGD/RMSprop, checkpoints both ways with torch.optim, memory, and
bad input. The quantization itself (error bounds, NaN handling of the codes) is tested in test_quantized.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from q8reference import (
    Reference,
    RMSpropReference,
    SGDReference,
    assert_bits,
    assert_matches,
    shapes,
    step_both,
)
from strategies import OPTIMIZERS, examples, make_grads, make_params, with_threshold

from optadvisor import kernels
from optadvisor.kernels._runtime import native as _native
from optadvisor.kernels.precision.q8math import dequantize, quantize

PATHS = ["native", "torch-ops"] if _native.library() is not None else ["torch-ops"]
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=shapes, seed=st.integers(0, 2**16), block=st.sampled_from([1, 3, 8, 64, 256]),
       lr=st.sampled_from([1e-3, 1e-2, 0.1]), momentum=st.sampled_from([0.5, 0.9]),
       dampening=st.sampled_from([0.0, 0.1]), wd=st.sampled_from([0.0, 1e-2]), nesterov=st.booleans(),
       maximize=st.booleans(), direct=st.sampled_from([1, 1 << 16]), steps=st.integers(1, 8))
def test_sgd8bit_equals_the_reference(path, dtype, specs, seed, block, lr, momentum, dampening, wd, nesterov,
                                      maximize, direct, steps):
    """Random shapes (0-dim, empty, sizes no block divides, non-contiguous), hyperparameters, block sizes, some
    gradients missing (so parameters reach their first step at different times), gradients copied or read
    where they lie: parameters, codes and scales equal the reference bit for bit."""
    dampening = 0.0 if nesterov else dampening
    params = make_params(specs, dtype, seed)
    grads = make_grads(params, steps, seed, none_prob=0.2, scale=0.1)
    kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov, maximize=maximize)
    opt = with_threshold(kernels.SGD8bit, direct)(params, block_size=block, min_8bit_size=0,
                                                  fused=None if path == "native" else False, **kw)
    ref = SGDReference(params, block_size=block, **kw)
    step_both(opt, ref, params, grads)
    assert_matches(opt, params, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=shapes, seed=st.integers(0, 2**16), block=st.sampled_from([1, 3, 8, 64, 256]),
       lr=st.sampled_from([1e-3, 1e-2]), alpha=st.sampled_from([0.99, 0.9, 0.0]), eps=st.sampled_from([1e-8, 1e-3]),
       momentum=st.sampled_from([0.0, 0.9]), wd=st.sampled_from([0.0, 1e-2]), maximize=st.booleans(),
       direct=st.sampled_from([1, 1 << 16]), steps=st.integers(1, 8))
def test_rmsprop8bit_equals_the_reference(path, dtype, specs, seed, block, lr, alpha, eps, momentum, wd, maximize,
                                          direct, steps):
    params = make_params(specs, dtype, seed)
    grads = make_grads(params, steps, seed, none_prob=0.2, scale=0.1)
    kw = dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd, maximize=maximize)
    opt = with_threshold(kernels.RMSprop8bit, direct)(params, block_size=block, min_8bit_size=0,
                                                      fused=None if path == "native" else False, **kw)
    ref = RMSpropReference(params, block_size=block, **kw)
    step_both(opt, ref, params, grads)
    assert_matches(opt, params, ref)
    for p in params:  # the keys torch.optim.RMSprop has, in its order, each followed by its scales
        if opt.state.get(p):
            expect = ["step", "square_avg", "square_avg_absmax"]
            expect += ["momentum_buffer", "momentum_buffer_absmax"] if momentum else []
            assert list(opt.state[p]) == expect


CASES = [(kernels.SGD8bit, SGDReference, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
         (kernels.RMSprop8bit, RMSpropReference, dict(lr=1e-3, momentum=0.9, weight_decay=1e-2))]
IDS = ["SGD8bit", "RMSprop8bit"]


@pytest.mark.parametrize("cls, ref_cls, kw", CASES, ids=IDS)
def test_float16_parameters_follow_the_reference_closely(cls, ref_cls, kw):
    """float16 parameters take the torch-op path (compiled): within an fp16 ulp of the reference."""
    params = make_params([((300,), False, False), ((17, 5), False, False)], torch.float16, 3)
    opt = cls(params, min_8bit_size=0, block_size=64, **kw)
    ref = ref_cls(params, block_size=64, **kw)
    step_both(opt, ref, params, make_grads(params, 5, 3, none_prob=0.0, scale=0.1))
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-3, atol=2 ** -8)


@pytest.mark.parametrize("cls, ref_cls, kw", CASES, ids=IDS)
def test_the_torch_op_path_serves_when_no_kernel_can_be_built(cls, ref_cls, kw, monkeypatch):
    monkeypatch.setenv(_native.ENV_VAR, "0")
    assert _native.library() is None
    params = make_params([((3000,), False, False), ((70,), False, False)], torch.float32, 5)
    opt, ref = cls(params, min_8bit_size=0, **kw), ref_cls(params, **kw)
    step_both(opt, ref, params, make_grads(params, 3, 5, none_prob=0.0))
    assert_matches(opt, params, ref)


@pytest.mark.parametrize("cls, float_cls, kw", [
    (kernels.SGD8bit, kernels.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    (kernels.RMSprop8bit, kernels.RMSprop, dict(lr=1e-2, momentum=0.5, maximize=True)),
], ids=IDS)
def test_small_parameters_keep_float_state_and_match_the_float_optimizer(cls, float_cls, kw):
    """Below min_8bit_size: float state, stepped exactly as the float optimizer; above it: 8-bit codes."""
    torch.manual_seed(0)
    small, large = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(5000))
    twin = torch.nn.Parameter(small.detach().clone())
    opt, flt = cls([small, large], **kw), float_cls([twin], **kw)
    for _ in range(4):
        gs = torch.randn(100)
        small.grad, large.grad, twin.grad = gs, torch.randn(5000), gs.clone()
        opt.step()
        flt.step()
    assert torch.equal(small.detach(), twin.detach())
    for key, value in flt.state[twin].items():
        assert torch.equal(opt.state[small][key], value), key
        assert opt.state[large][key].dtype in (torch.int8, torch.uint8) or key == "step"
    assert not any(k.endswith("_absmax") for k in opt.state[small])


def test_sgd8bit_without_momentum_keeps_no_state_and_is_sgd():
    """momentum=0: nothing to quantize; no state (as torch.optim.SGD) and SGD's exact update, any dtype."""
    for dtype in (torch.float32, torch.float64):
        p = torch.nn.Parameter(torch.randn(5000, dtype=dtype))
        q = torch.nn.Parameter(p.detach().clone())
        opt, sgd = kernels.SGD8bit([p], lr=0.1, weight_decay=0.01), kernels.SGD([q], lr=0.1, weight_decay=0.01)
        for _ in range(3):
            g = torch.randn(5000, dtype=dtype)
            p.grad, q.grad = g, g.clone()
            opt.step()
            sgd.step()
        assert torch.equal(p.detach(), q.detach()) and not opt.state.get(p)


def test_many_8bit_optimizers_in_one_process_keep_their_own_state():
    """Adam8bit, SGD8bit and RMSprop8bit of different sizes, block sizes and options, built first and stepped
    interleaved: each equals its own reference (nothing cached per process leaks between them)."""
    configs = [(kernels.SGD8bit, SGDReference, dict(lr=0.1, momentum=0.9), 256),
               (kernels.RMSprop8bit, RMSpropReference, dict(lr=1e-3), 3),
               (kernels.Adam8bit, Reference, dict(lr=1e-2), 64),
               (kernels.SGD8bit, SGDReference, dict(lr=0.01, momentum=0.5, nesterov=True, maximize=True), 17),
               (kernels.RMSprop8bit, RMSpropReference, dict(lr=1e-2, momentum=0.9, weight_decay=0.1), 256),
               (kernels.SGD8bit, SGDReference, dict(lr=0.01, momentum=0.9, dampening=0.5), 3)]
    runs = []
    for k, (cls, ref_cls, kw, block) in enumerate(configs):
        params = make_params([((7 + 50 * k,), False, False), ((3, 11 * (k + 1)), True, False)], torch.float32, k)
        runs.append((params, cls(params, min_8bit_size=0, block_size=block, **kw),
                     ref_cls(params, block_size=block, **kw), make_grads(params, 4, k, none_prob=0.2)))
    for step in range(4):
        for params, opt, ref, grads in runs:
            step_both(opt, ref, params, [grads[step]])
    for params, opt, ref, _ in runs:
        if isinstance(ref, Reference):
            for i, p in enumerate(params):
                assert_bits(p.detach(), ref.params[i], f"param {i}")
        else:
            assert_matches(opt, params, ref)


@pytest.mark.parametrize("cls, ref_cls, kw", [*CASES, (kernels.Adam8bit, Reference, dict(lr=1e-3))],
                         ids=[*IDS, "Adam8bit"])
def test_a_nan_gradient_stays_in_its_element(cls, ref_cls, kw):
    """A NaN gradient element makes its parameter element NaN (as with torch's optimizers); its codes are 0
    and it is left out of the block's scale, so the rest of its block stays finite and equals the reference,
    and other blocks are bit-identical to a run without the NaN."""
    torch.manual_seed(1)
    base = torch.randn(1024)
    p, clean = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    opt, opt_clean = cls([p], min_8bit_size=0, **kw), cls([clean], min_8bit_size=0, **kw)
    ref = ref_cls([p], **kw)
    for step in range(3):
        g = torch.randn(1024)
        g_nan = g.clone()
        if step == 2:
            g_nan[300] = float("nan")
        p.grad, clean.grad = g_nan, g
        opt.step()
        opt_clean.step()
        ref.step([g_nan])
    assert_matches(opt, [p], ref)
    assert math.isnan(p[300].item())
    in_block = torch.arange(256, 512) != 300
    assert torch.isfinite(p.detach()[256:512][in_block]).all()
    outside = torch.ones(1024, dtype=torch.bool)
    outside[256:512] = False
    assert torch.equal(p.detach()[outside], clean.detach()[outside])
    for key, value in opt.state[p].items():
        if key.endswith("_absmax"):
            assert torch.isfinite(value).all(), key
        elif value.dtype in (torch.int8, torch.uint8):
            assert value[300] == 0, key


# ---- memory ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, float_cls, kw", [
    (kernels.SGD8bit, kernels.SGD, dict(lr=0.1, momentum=0.9)),
    (kernels.RMSprop8bit, kernels.RMSprop, dict(lr=1e-3, momentum=0.9)),
], ids=IDS)
def test_state_memory_is_about_a_quarter_of_fp32(cls, float_cls, kw):
    """ResNet-50's parameter shapes: 8-bit state (codes, scales, the float state of small parameters)
    <= 0.27x the fp32 optimizer's (not counting RMSprop's step counts)."""
    from benchmarks.cases import resnet50_shapes

    def state_bytes(opt_cls):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in resnet50_shapes()]
        opt = opt_cls(params, **kw)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")

    ratio = state_bytes(cls) / state_bytes(float_cls)
    assert ratio <= 0.27, ratio


# ---- checkpoints -----------------------------------------------------------------------------------------------
# the codec-made 8-bit optimizers (no update written for them) interchange checkpoints the same way
CKPT = [(kernels.SGD8bit, kernels.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9), ["momentum_buffer"]),
        (kernels.RMSprop8bit, kernels.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9),
         ["square_avg", "momentum_buffer"]),
        (kernels.Adagrad8bit, kernels.Adagrad, torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1),
         ["sum"]),
        (kernels.Lion8bit, kernels.Lion, OPTIMIZERS["Lion"][1], dict(lr=1e-3, weight_decay=0.1), ["exp_avg"]),
        (kernels.NAdam8bit, kernels.NAdam, torch.optim.NAdam, dict(lr=1e-3, weight_decay=0.1),
         ["exp_avg", "exp_avg_sq"]),
        (kernels.RAdam8bit, kernels.RAdam, torch.optim.RAdam, dict(lr=1e-3, decoupled_weight_decay=True,
                                                                   weight_decay=0.1), ["exp_avg", "exp_avg_sq"])]
CKPT_IDS = ["SGD8bit", "RMSprop8bit", "Adagrad8bit", "Lion8bit", "NAdam8bit", "RAdam8bit"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))


def _train(model, opt, steps=3, seed=0):
    torch.manual_seed(seed + 100)
    for _ in range(steps):
        model(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls, float_cls, torch_cls, kw, keys", CKPT, ids=CKPT_IDS)
def test_state_dict_round_trip_is_exact(cls, float_cls, torch_cls, kw, keys, tmp_path):
    model = _model()
    opt = cls(model.parameters(), block_size=64, **kw)
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = cls(twin.parameters(), **kw)  # block_size comes back from the checkpoint
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert opt2.param_groups[0]["block_size"] == 64
    w, w2 = model[0].weight, twin[0].weight
    assert [k for k in opt.state[w] if k not in ("step", *cls._host_state)] == [x for k in keys for x in (k, k + "_absmax")]
    for k, v in opt.state[w].items():
        assert torch.equal(v, opt2.state[w2][k]), k
    for a, b in zip(_train(model, opt, seed=5), _train(twin, opt2, seed=5)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls, float_cls, torch_cls, kw, keys", CKPT, ids=CKPT_IDS)
def test_torch_checkpoints_load_both_ways(cls, float_cls, torch_cls, kw, keys):
    """torch.optim's fp32 checkpoint is quantized on load (as a step would store it); ours loads into
    kernels' float optimizer dequantized, and into torch.optim through dequantize_state_dict."""
    model = _model()
    topt = torch_cls(model.parameters(), foreach=False, **kw)
    _train(model, topt)
    saved = topt.state_dict()
    opt = cls(model.parameters(), **kw)
    opt.load_state_dict(saved)
    w = model[0].weight
    for key in keys:
        code_dtype = cls._code_dtypes[key]
        codes, scale = quantize(saved["state"][0][key], 256, code_dtype)
        assert torch.equal(opt.state[w][key], codes) and torch.equal(opt.state[w][key + "_absmax"], scale), key
        assert opt.state[model[0].bias][key].dtype == torch.float32  # small: float state, as saved
    _train(model, opt, seed=1)
    sd = opt.state_dict()
    expect = {k: dequantize(opt.state[w][k], opt.state[w][k + "_absmax"], 256) for k in keys}
    flt = float_cls(model.parameters(), **kw)
    flt.load_state_dict(sd)
    back = torch_cls(model.parameters(), **kw)
    back.load_state_dict(kernels.dequantize_state_dict(sd))
    for key in keys:
        assert torch.equal(flt.state[w][key], expect[key]) and key + "_absmax" not in flt.state[w]
        assert torch.equal(back.state[w][key], expect[key])
    _train(model, back, seed=2)


@pytest.mark.parametrize("cls, float_cls, torch_cls, kw, keys", CKPT, ids=CKPT_IDS)
def test_a_checkpoint_missing_its_scales_is_refused(cls, float_cls, torch_cls, kw, keys):
    model = _model()
    opt = cls(model.parameters(), **kw)
    _train(model, opt)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    sd = opt.state_dict()
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    sd["state"][0].pop(keys[-1] + "_absmax")
    with pytest.raises(ValueError, match=rf"state of parameter 0 in group 0: '{keys[-1]}' holds 8-bit codes but "
                                         rf"'{keys[-1]}_absmax', the per-block scales needed to read them, is missing"):
        opt.load_state_dict(sd)
    for k, v in opt.state[model[0].weight].items():
        assert torch.equal(v, before[k]), k


# ---- bad arguments -------------------------------------------------------------------------------------------
def test_centered_rmsprop8bit_is_refused_everywhere():
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=r"RMSprop8bit: centered=True is not supported with 8-bit state \(it "
                                         r"divides by sqrt\(square_avg - grad_avg\^2\)"):
        kernels.RMSprop8bit([p], centered=True)
    opt = kernels.RMSprop8bit([p], min_8bit_size=0)
    with pytest.raises(ValueError, match=r"^RMSprop8bit: parameter group 1: centered=True is not supported with "
                                         r"8-bit state; use kernels\.RMSprop\(centered=True\)$"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))], "centered": True})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["centered"] = True  # by hand, after construction
    p.grad = torch.ones(10)
    with pytest.raises(ValueError, match=r"^RMSprop8bit: param_groups\[0\]\['centered'\] is True; centered=True "
                                         r"is not supported with 8-bit state; use kernels\.RMSprop\(centered=True\)$"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(10))


@pytest.mark.parametrize("cls, kwargs, message", [
    (kernels.SGD8bit, dict(momentum=0.9, block_size=0), r"SGD8bit: block_size must be an int in \[1, 4096\]"),
    (kernels.SGD8bit, dict(momentum=0.9, min_8bit_size=-1), r"min_8bit_size must be an int in \[0, inf\]"),
    (kernels.SGD8bit, dict(momentum=-0.1), r"Invalid momentum value: -0.1"),
    (kernels.SGD8bit, dict(nesterov=True), r"Nesterov momentum requires a momentum and zero dampening"),
    (kernels.RMSprop8bit, dict(block_size=4097), r"RMSprop8bit: block_size must be an int in \[1, 4096\]"),
    (kernels.RMSprop8bit, dict(alpha=-1.0), r"Invalid alpha value: -1.0"),
    (kernels.RMSprop8bit, dict(capturable=True), r"capturable=True"),
])
def test_bad_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(10))], **kwargs)


@pytest.mark.parametrize("cls, name", [(kernels.SGD8bit, "SGD"), (kernels.RMSprop8bit, "RMSprop")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_float64_and_complex_parameters_are_refused(cls, name, dtype):
    ok = torch.nn.Parameter(torch.zeros(10))
    bad = torch.nn.Parameter(torch.zeros(10, dtype=dtype))
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['params'\]\[1\] is {dtype}; 8-bit state serves "
                                         rf"float32, bfloat16 and float16 parameters \(use kernels.{name} for"):
        cls([ok, bad], momentum=0.9)

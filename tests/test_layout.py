"""kernels/_runtime/layout.py on its own: where each parameter lies in a bucket's flat buffers, what the buffers start
as, the update's scalars, the step counts' dtype. The optimizer tests run all of it end to end; these pin
each decision down where a wrong one would hide there (a parameter of exactly the threshold's size, memory
the code forgot to fill that happened to be zero, a scalar written with the wrong width)."""

import copy
import threading

import pytest
import torch
from strategies import assert_same

from optadvisor import kernels
from optadvisor.kernels._runtime import layout as _layout
from optadvisor.kernels._runtime.layout import Blockwise, Bucket, compute_dtype, scalar_dtype, scalars_tensor


def _dirty_heap(nbytes: int) -> None:
    """Free NaN-filled blocks of ``nbytes``, so that a buffer the code forgets to fill is likely to reuse
    them: without this, fresh memory is often zero and a missing fill of zero passes by luck."""
    junk = [torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8) for _ in range(8)]
    del junk


@pytest.fixture
def default_dtype():
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


# ---- step counts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("default, expected", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32)])
def test_step_counts_are_float32_unless_the_default_dtype_is_float64_as_torch_keeps_them(
        default_dtype, default, expected):
    default_dtype(default)
    assert scalar_dtype() == expected
    p, q = (torch.nn.Parameter(torch.ones(3, dtype=torch.float32)) for _ in range(2))
    ours, ref = kernels.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1, foreach=False)
    assert ours._buckets[0].steps.dtype == expected
    for x, opt in ((p, ours), (q, ref)):
        x.grad = torch.ones(3, dtype=torch.float32)
        opt.step()
    assert ours.state[p]["step"].dtype == ref.state[q]["step"].dtype == expected
    assert ours.state_dict()["state"][0]["step"].dtype == expected


def test_a_fresh_bucket_has_taken_no_step():
    bucket = Bucket(0, [torch.ones(2), torch.ones(3)], [0, 1])
    assert bucket.host_steps == [0, 0] and bucket.steps.tolist() == [0.0, 0.0]
    assert bucket.flat_grad is None and bucket.flat_state == {} and bucket.run_cache == {}


@pytest.mark.parametrize("stateless", [0, 1])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_a_partial_state_loaded_at_step_one_leaves_the_stateless_parameter_at_its_first_step(name, stateless):
    """torch saves state only for parameters that have stepped: after one step where one parameter had no
    gradient, the other is at step 1 and it at step 0. Loaded, the next step is the first one's second and
    its first (a bucket that took its stateless parameters for step 1 would bias-correct Adam's as a second
    step; one that stopped adopting at the first stateless parameter would start the next one afresh)."""
    torch.manual_seed(0)
    init = [torch.randn(5), torch.randn(4)]
    grads = [torch.randn(5), torch.randn(4)]
    kw = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    saved_from = [torch.nn.Parameter(x.clone()) for x in init]
    first = getattr(torch.optim, name)(saved_from, foreach=False, **kw)
    saved_from[1 - stateless].grad = grads[1 - stateless].clone()
    first.step()
    saved = first.state_dict()
    assert list(saved["state"]) == [1 - stateless]
    out = []
    for cls, extra in ((getattr(torch.optim, name), {"foreach": False}), (getattr(kernels, name), {})):
        params = [torch.nn.Parameter(p.detach().clone()) for p in saved_from]
        opt = cls(params, **extra, **kw)
        opt.load_state_dict(copy.deepcopy(saved))  # torch's loads the CPU tensors themselves, steps them
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out.append((opt, params))
    (ref, ref_params), (ours, our_params) = out
    assert sorted(ref.state_dict()["state"]) == [0, 1]
    assert_same(ref, ours, ref_params, our_params, torch.float32)  # the state in torch's order: the loaded first


# ---- the update's scalars --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64,
                                   torch.complex128])
def test_scalars_on_the_cpu_are_exact_in_the_compute_dtype(dtype):
    like = torch.zeros(2, dtype=dtype)
    cd = compute_dtype(dtype)
    for values in ((0.1, 1e-300, 3.5, -2.0, 1e30), (7.0, 0.3, 1e-8, 0.0, -1e-300)):
        t = scalars_tensor(values, like)
        assert t.dtype == cd and t.device.type == "cpu" and t.shape == (5,)
        assert torch.equal(t, torch.tensor(values, dtype=cd))


def test_the_cpu_scalars_reuse_one_tensor_per_thread_dtype_and_length():
    """Written in place through a ctypes view: ``torch.tensor(list)`` per step costs ~40 us once a step's
    streaming has evicted the caches. A CPU kernel reads them before it returns, so one tensor serves."""
    like = torch.zeros(1)
    first = scalars_tensor((1.0, 2.0), like)
    again = scalars_tensor((3.0, 4.0), like)
    assert again is first and again.tolist() == [3.0, 4.0]
    assert scalars_tensor((1.0, 2.0, 3.0), like) is not first
    assert scalars_tensor((1.0, 2.0), torch.zeros(1, dtype=torch.float64)) is not first
    other = []
    thread = threading.Thread(target=lambda: other.append(scalars_tensor((5.0, 6.0), like)))
    thread.start()
    thread.join()
    assert other[0] is not first and other[0].tolist() == [5.0, 6.0] and first.tolist() == [3.0, 4.0]


def test_scalars_for_another_device_go_through_its_pinned_ring(monkeypatch):
    made = []

    class Ring:  # stands in for _PinnedRing, which needs an accelerator
        def __init__(self, device, dtype, n):
            made.append((device, dtype, n))
            self.device, self.dtype = device, dtype

        def __call__(self, values):
            assert isinstance(values, tuple)
            return torch.tensor(values, dtype=self.dtype, device=self.device)

    monkeypatch.setattr(_layout, "_hp_slots", threading.local())
    monkeypatch.setattr(_layout, "_PinnedRing", Ring)
    like = torch.empty(3, dtype=torch.float64, device="meta")
    t = scalars_tensor([0.5, 0.25], like)
    assert (t.device.type, t.dtype, t.shape) == ("meta", torch.float64, (2,))
    scalars_tensor((1.0, 2.0), like)  # the same ring again
    scalars_tensor((1.0, 2.0, 3.0), torch.empty(1, dtype=torch.bfloat16, device="meta"))
    assert made == [(torch.device("meta"), torch.float64, 2), (torch.device("meta"), torch.float32, 3)]


def test_device_scalars_without_pinned_memory_copy_plainly(monkeypatch):
    def refuse(*args):
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(_layout, "_hp_slots", threading.local())
    monkeypatch.setattr(_layout, "_PinnedRing", refuse)
    t = _layout.device_scalars((0.1, 1e-300), torch.device("cpu"), torch.float64)
    assert t.dtype == torch.float64 and t.tolist() == [0.1, 1e-300]
    assert _layout.device_scalars((0.2, 3.0), torch.device("cpu"), torch.float64).tolist() == [0.2, 3.0]


# ---- buffers ---------------------------------------------------------------------------------------------

# (numels in the group's order, direct_min, align) -> (order in the buffers, offsets, total)
LAYOUTS = [
    ((3, 4, 5), 1 << 16, 1, (0, 1, 2), (0, 3, 7), 12),
    ((10, 2, 9, 1), 10, 1, (1, 2, 3, 0), (0, 2, 11, 12), 22),  # 10 elements: large, after the small ones
    ((9, 11), 10, 1, (0, 1), (0, 9), 20),
    ((3, 5, 0, 8), 1 << 16, 4, (0, 1, 2, 3), (0, 4, 12, 12), 20),  # each starts at a multiple of 4
    ((3, 1), 1 << 16, 2, (0, 1), (0, 4), 6),
    ((0, 0), 1 << 16, 1, (0, 1), (0, 0), 0),
]


@pytest.mark.parametrize("numels, direct_min, align, order, offsets, total", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucket_layout(numels, direct_min, align, order, offsets, total, dtype):
    params = [torch.nn.Parameter(torch.arange(1, n + 1, dtype=dtype) * (i + 1)) for i, n in enumerate(numels)]
    values = [p.detach().clone() for p in params]
    _dirty_heap(total * torch.empty((), dtype=dtype).element_size())
    bucket = Bucket(0, params, list(range(len(params))), direct_min, align)
    assert bucket.positions == list(order) and bucket.offsets == list(offsets) and bucket.total == total
    assert bucket.n_small == sum(n < direct_min for n in numels)
    assert [p is params[i] for p, i in zip(bucket.params, order)] == [True] * len(params)
    assert bucket.flat_param.numel() == total and bucket.flat_param.dtype == dtype
    size = bucket.flat_param.element_size()
    base = bucket.flat_param.data_ptr()
    assert bucket.param_memory == (base, base + total * size)
    for i, o in zip(order, offsets):
        assert torch.equal(params[i].detach(), values[i])  # the values moved with the parameter
        if numels[i]:
            assert params[i].data_ptr() == base + o * size
    gaps = torch.ones(total, dtype=torch.bool)
    for i, o in zip(order, offsets):
        gaps[o:o + numels[i]] = False
    assert torch.equal(bucket.flat_param[gaps], torch.zeros(int(gaps.sum()), dtype=dtype))  # a block's gap


def test_a_bucket_is_not_padded_unless_asked():
    bucket = Bucket(0, [torch.ones(3), torch.ones(1)], [0, 1])
    assert bucket.offsets == [0, 3] and bucket.total == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_state_buffers_start_at_their_initial_values(dtype):
    params = [torch.ones(3, dtype=dtype), torch.ones(6, dtype=dtype)]
    bucket = Bucket(0, params, [0, 1], align=3)
    init = {"zero": 0.0, "one": 1.0, "half": 0.5, "minus": -2.0, "codes": Blockwise(0.0, torch.uint8),
            "scales": Blockwise(1.0, torch.float32, 3)}
    _dirty_heap(9 * torch.empty((), dtype=dtype).element_size())
    bucket.ensure_state(init)
    for key in ("zero", "one", "half", "minus"):
        buf = bucket.flat_state[key]
        assert buf.dtype == dtype and buf.numel() == 9
        assert torch.equal(_layout.real(buf), torch.full((9 * (1 + dtype.is_complex),), init[key],
                                                         dtype=_layout.real(buf).dtype))  # complex(v, v)
    assert torch.equal(bucket.flat_state["codes"], torch.zeros(9, dtype=torch.uint8))
    assert torch.equal(bucket.flat_state["scales"], torch.ones(3))
    kept = bucket.flat_state["one"]
    bucket.ensure_state({"one": 5.0})  # made once: never refilled
    assert bucket.flat_state["one"] is kept and kept.real.max() == 1.0
    assert bucket.state_view("one", 1.0, 1).shape == (6,)
    assert bucket.state_view("scales", init["scales"], 1).shape == (2,)


@pytest.mark.parametrize("initial", [0.0, 1.0, 0.5])
def test_adagrad_state_made_at_construction_holds_the_initial_accumulator(initial):
    for numel in (7, 1000):
        _dirty_heap(numel * 4)
        p = torch.nn.Parameter(torch.ones(numel))
        opt = kernels.Adagrad([p], initial_accumulator_value=initial)
        assert torch.equal(opt.state[p]["sum"], torch.full((numel,), initial))


def test_a_runs_slices_are_made_once():
    """Every step asks for the same slices: they are cached, not rebuilt per step."""
    bucket = Bucket(0, [torch.ones(3), torch.ones(4)], [0, 1])
    init = {"exp_avg": 0.0}
    run = bucket.slices(init, 0, 2)
    assert bucket.slices(init, 0, 2) is run
    assert bucket.slices(init, 0, 1) is not run and bucket.slices(init, 0, 1, grad=False)["grad"] is None
    assert run["param"].numel() == run["grad"].numel() == run["exp_avg"].numel() == 7


def test_a_buckets_buffers_are_made_on_its_parameters_device():
    """Every buffer on the parameters' device (the meta device stands in for an accelerator here: the
    CPU is also the default, where a buffer made without a device would land unnoticed)."""
    params = [torch.nn.Parameter(torch.empty(n, device="meta")) for n in (3, 5)]
    bucket = Bucket(0, params, [0, 1], align=4)
    bucket.ensure_state({"exp_avg": 0.0, "sum": 1.0, "codes": Blockwise(0.0, torch.uint8)})
    bucket.ensure_grad_buffer()
    assert bucket.device.type == "meta" and all(p.device.type == "meta" for p in params)
    for buf in (bucket.flat_param, bucket.flat_grad, *bucket.flat_state.values()):
        assert buf.device.type == "meta"
    assert buf.numel() == 12

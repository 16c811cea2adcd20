"""state_dict interchange with torch.optim both ways, bad checkpoints, bad arguments, torch's optim_db."""

import copy
import inspect
import io
import pickle
import re

import pytest
import torch
from strategies import OPTIMIZER_CASES, OPTIMIZERS, assert_same, make_params, with_threshold

from optadvisor import kernels

NAMES = list(OPTIMIZERS)
CONFIGS = {name: case.full for name, case in OPTIMIZER_CASES.items()}
SPECS = [((4, 3), False, False), ((5,), True, False), ((), False, False), ((2, 2), False, True)]


def _train(opts_and_params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in opts_and_params[0][1]]
        for opt, params in opts_and_params:
            for p, g in zip(params, grads):
                p.grad = g.clone() if p.requires_grad else None
            opt.step()


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_interchange(name, direction, fused):
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = CONFIGS[name]
    # phase 1: train a source optimizer; phase 2: load its checkpoint into the other kind and continue
    src_p = make_params(SPECS, torch.float32, 0)
    src = torch_cls(src_p, foreach=False, **kw) if direction == "torch->ours" else ours_cls(src_p, fused=fused,
                                                                                             **kw)
    _train([(src, src_p)], 7, seed=1)
    ckpt = _roundtrip(src.state_dict())
    dst_p = make_params(SPECS, torch.float32, 0)
    with torch.no_grad():
        for p, q in zip(dst_p, src_p):
            p.copy_(q)
    dst = ours_cls(dst_p, fused=fused, **kw) if direction == "torch->ours" else torch_cls(dst_p, foreach=False,
                                                                                          **kw)
    dst.load_state_dict(ckpt)
    # reference: torch trained for the whole run
    ref_p = make_params(SPECS, torch.float32, 0)
    ref = torch_cls(ref_p, foreach=False, **kw)
    _train([(ref, ref_p)], 7, seed=1)
    _train([(ref, ref_p), (dst, dst_p)], 8, seed=2)
    exact = not fused
    assert_same(ref, dst, ref_p, dst_p, torch.float32, exact=exact)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_has_torchs_layout(name):
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = CONFIGS[name]
    a, b = make_params(SPECS, torch.float32, 0), make_params(SPECS, torch.float32, 0)
    ours, ref = ours_cls(a, fused=False, **kw), torch_cls(b, foreach=False, **kw)
    _train([(ours, a)], 2, 0)
    _train([(ref, b)], 2, 0)
    s_ours, s_ref = ours.state_dict(), ref.state_dict()

    def layout(sd):
        """Everything but the values, *in order*: tools diff checkpoints, and torch's order is its format."""
        return ([list(g) for g in sd["param_groups"]], list(sd["state"]),
                [[(key, type(v).__name__, getattr(v, "dtype", None), tuple(getattr(v, "shape", ())))
                  for key, v in entry.items()] for entry in sd["state"].values()])
    assert layout(s_ours) == layout(s_ref)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_listed_in_torchs_order_whatever_the_buckets(name):
    """torch lists state in the order parameters first stepped (groups, then parameters, in order). Ours keeps
    them in buckets (small ones first, one bucket per dtype): a Linear(300, 256)'s weight is read in place and
    its bias packed, float64 and float32 parameters interleave, one parameter first gets a gradient at the
    second step, and a second group is added later."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = dict(CONFIGS[name])

    def build(cls, extra):
        gen = torch.Generator().manual_seed(0)
        shapes = [((256, 300), torch.float32), ((256,), torch.float32), ((3,), torch.float64),
                  ((3, 256), torch.float32), ((2,), torch.float64), ((4,), torch.float32)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=d)) for s, d in shapes]
        opt = cls([{"params": params[:5]}], **extra, **kw)
        return opt, params
    (ours, a), (ref, b) = build(ours_cls, {}), build(torch_cls, {"foreach": False})
    for step in range(3):
        if step == 1:
            for opt, params in ((ours, a), (ref, b)):
                opt.add_param_group({"params": [params[5]]})
        gen = torch.Generator().manual_seed(step)
        for i in range(6):
            g = torch.randn(a[i].shape, generator=gen, dtype=a[i].dtype)
            # (torch's Adagrad makes state at construction, but for a group added later only at its first
            # step; ours at add_param_group, so a late gradient there is left out for Adagrad)
            late = i == 2 and step == 0 or i == 5 and step == 1 and name != "Adagrad"
            a[i].grad = None if late else g.clone()
            b[i].grad = None if late else g.clone()
        ours.step()
        ref.step()
        assert list(ours.state_dict()["state"]) == list(ref.state_dict()["state"]), step
    assert_same(ref, ours, b, a, torch.float32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("numels", [(20, 3), (20, 30, 3)])
def test_state_made_in_a_buckets_order_that_differs_everywhere_is_put_in_torchs(name, numels):
    """One bucket lists its small parameters first: with a large one before a small one, the state is made
    in an order that differs from torch's at every position (two entries swapped, three rotated)."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    out = []
    for cls, extra in ((with_threshold(ours_cls, 16), {}), (torch_cls, {"foreach": False})):
        params = [torch.nn.Parameter(torch.full((n,), 0.5)) for n in numels]
        opt = cls(params, **extra, **CONFIGS[name])
        for p in params:
            p.grad = torch.ones(p.shape)
        opt.step()
        assert [p for p in opt.state] == params
        out.append((opt, params))
    (ours, a), (ref, b) = out
    assert list(ours.state_dict()["state"]) == list(range(len(numels)))
    assert_same(ref, ours, b, a, torch.float32)  # order, keys and values: torch's


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW8bit", "SGD8bit", "RMSprop8bit"])
def test_8bit_state_is_listed_in_torchs_order(name):
    """An 8-bit optimizer keeps small parameters' state in float32 and large ones' in 8 bits, in two buckets:
    the state is still listed in the parameters' order."""
    cls = getattr(kernels, name)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8,), (64, 64), (3,), (32, 64)]]
    kw = {"momentum": 0.9} if name in ("SGD8bit", "RMSprop8bit") else {}
    opt = cls(params, lr=1e-3, min_8bit_size=1024, **kw)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert list(opt.state_dict()["state"]) == [0, 1, 2, 3]
    assert [p for p in opt.state] == params


@pytest.mark.parametrize("name", NAMES)
def test_bad_state_dict_is_refused_and_leaves_the_optimizer_unchanged(name):
    ours_cls, torch_cls = OPTIMIZERS[name]
    kw = CONFIGS[name]
    params = make_params(SPECS, torch.float32, 0)
    ours = ours_cls(params, fused=False, **kw)
    _train([(ours, params)], 3, 0)
    before = copy.deepcopy(ours.state_dict())
    values = [p.detach().clone() for p in params]

    good = copy.deepcopy(ours.state_dict())
    bad_shape = copy.deepcopy(good)
    key = next(k for k in bad_shape["state"][0] if k != "step" and k not in ours_cls._host_state)
    bad_shape["state"][0][key] = torch.zeros(7, 7)
    missing = copy.deepcopy(good)
    del missing["state"][1][key]
    fewer_groups = copy.deepcopy(good)
    fewer_groups["param_groups"] = []
    fewer_params = copy.deepcopy(good)
    fewer_params["param_groups"][0]["params"] = fewer_params["param_groups"][0]["params"][:-1]
    cases = [(bad_shape, "shape"), (fewer_groups, "parameter groups"), (fewer_params, "parameters"),
             ({"state": {}}, "param_groups")]
    if name not in ("SGD", "Lion"):  # their only state is one buffer: without it a param has no state yet
        cases.append((missing, "lacks"))
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ours.load_state_dict(bad)
        after = ours.state_dict()
        for pid, st in before["state"].items():
            for k, v in st.items():
                assert torch.equal(after["state"][pid][k], v)
        assert after["param_groups"] == before["param_groups"]
        for p, v in zip(params, values):
            assert torch.equal(p, v)


BAD_ARGS = [
    ("SGD", dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ("SGD", dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    ("SGD", dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    ("SGD", dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov momentum requires"),
    ("Adam", dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    ("Adam", dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    ("Adam", dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    ("Adam", dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
    ("Adam", dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),  # the bound: refused
    ("Adam", dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    ("Adam", dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    ("Adam", dict(betas=(0.9, torch.tensor(0.99))), ValueError, "betas must be either both floats or both"),
    ("AdamW", dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1: 1.5"),
    # torch's range check meets a many-element tensor beta first (its own "must be 1-element" check, which
    # ours mirrors, is unreachable): the same error
    ("Adam", dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.99))), RuntimeError, "more than one value"),
    ("AdamW", dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.9]))), RuntimeError, "more than one value"),
    ("RMSprop", dict(alpha=-0.1), ValueError, "Invalid alpha value: -0.1"),
    ("RMSprop", dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    ("RMSprop", dict(momentum=-1.0), ValueError, "Invalid momentum value: -1.0"),
    ("RMSprop", dict(weight_decay=-0.5), ValueError, "Invalid weight_decay value: -0.5"),
    ("RMSprop", dict(lr=-0.5), ValueError, "Invalid learning rate: -0.5"),
    ("AdamW", dict(weight_decay=-0.5), ValueError, "Invalid weight_decay value: -0.5"),
    ("AdamW", dict(eps=-0.5), ValueError, "Invalid epsilon value: -0.5"),
    ("Adagrad", dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    ("Adagrad", dict(lr_decay=-0.1), ValueError, "Invalid lr_decay value: -0.1"),
    ("Adagrad", dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    ("Adagrad", dict(initial_accumulator_value=-1.0), ValueError,
     "Invalid initial_accumulator_value value: -1.0"),
    ("Adagrad", dict(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
]


@pytest.mark.parametrize("name,kwargs,exc,message", BAD_ARGS)
def test_bad_hyperparameters_raise_like_torch(name, kwargs, exc, message):
    ours_cls, torch_cls = OPTIMIZERS[name]
    with pytest.raises(exc) as torch_err:
        torch_cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(exc) as our_err:
        ours_cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    assert message in str(our_err.value)
    assert str(our_err.value) == str(torch_err.value)


EDGE_ARGS = [("Adam", dict(lr=0.0, eps=0.0, betas=(0.0, 0.0), weight_decay=0.0)),
             ("AdamW", dict(betas=(torch.tensor(0.5), torch.tensor(0.25)), lr=torch.tensor(0.01))),
             ("SGD", dict(lr=0.0, momentum=0.0, weight_decay=0.0)),
             ("RMSprop", dict(lr=0.0, alpha=0.0, eps=0.0, momentum=0.0, weight_decay=0.0)),
             ("Adagrad", dict(lr=0.0, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=0.0))]


@pytest.mark.parametrize("name,kwargs", EDGE_ARGS, ids=[n for n, _ in EDGE_ARGS])
def test_edge_hyperparameters_torch_accepts_are_accepted(name, kwargs):
    """The bounds of torch's checks (0 is a valid lr, eps, beta, decay...; 1-element tensor betas): accepted,
    and stored as torch stores them."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    ref = torch_cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    ours = ours_cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    for key, value in ref.param_groups[0].items():
        if key != "params":
            assert type(ours.param_groups[0][key]) is type(value) and ours.param_groups[0][key] == value, key


@pytest.mark.parametrize("name", NAMES)
def test_bad_params_and_gradients(name):
    ours_cls = OPTIMIZERS[name][0]
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="iterable of Tensors"):
        ours_cls(p)
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        ours_cls([p, 3.0])
    with pytest.raises(ValueError, match="more than one parameter group"):
        ours_cls([{"params": [p]}, {"params": [p, q]}])
    with pytest.raises(ValueError, match="^" + re.escape(
            "some parameters appear more than once in the same parameter group; optadvisor's optimizers lay "
            "parameters out in one buffer and need each once") + "$"):
        ours_cls([p, p])
    if "differentiable" in inspect.signature(OPTIMIZERS[name][1]).parameters:  # (lion-pytorch has none)
        with pytest.raises(ValueError, match=f"^{name}: differentiable=True is not supported"):
            ours_cls([p], differentiable=True)
    for layout, sparse in (("sparse_coo", torch.eye(2).to_sparse()), ("sparse_csr", torch.eye(2).to_sparse_csr())):
        with pytest.raises(ValueError, match=rf"^{name} supports only dense \(strided\) parameters, got layout "
                                             rf"torch\.{layout}$"):
            ours_cls([p, sparse.requires_grad_()])
        opt = ours_cls([p])
        with pytest.raises(ValueError, match=f"got layout torch.{layout}"):
            opt.add_param_group({"params": [sparse]})
        assert len(opt.param_groups) == 1  # refused whole: no half-added group
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ours_cls(emb.parameters(), fused=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_options_are_refused_by_the_optimizers_name(name):
    ours_cls = OPTIMIZERS[name][0]
    p = torch.nn.Parameter(torch.ones(2))
    if "capturable" in inspect.signature(OPTIMIZERS[name][1]).parameters:  # torch's SGD, Lion: no capturable
        with pytest.raises(ValueError, match=f"^{name}: capturable=True \\(CUDA-graph capture\\) is not"):
            ours_cls([p], capturable=True)
    with pytest.raises(ValueError, match=f"^{name}: state_dtype must be None .* got torch.float16"):
        ours_cls([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match=f"^{name}: kahan_sum must be True or False \\(got 1\\)"):
        ours_cls([p], kahan_sum=1)


def _optim_db_inputs():
    from torch.testing._internal.common_optimizers import optim_db

    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name in OPTIMIZERS:
            for inp in info.optim_inputs_func(device="cpu"):
                cases.append(pytest.param(name, inp.kwargs, id=f"{name}-{inp.desc}"))
    return cases


@pytest.mark.parametrize("name,kwargs", _optim_db_inputs())
def test_torch_optim_db_inputs(name, kwargs):
    """torch's own optimizer test inputs (common_optimizers.optim_db), through the same comparison."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused", "capturable", "differentiable")}
    a, b = make_params(SPECS, torch.float32, 5), make_params(SPECS, torch.float32, 5)
    ref = torch_cls(a, foreach=False, **copy.deepcopy(kwargs))
    ours = ours_cls(b, fused=False, **copy.deepcopy(kwargs))
    _train([(ref, a), (ours, b)], 20, 3)
    assert_same(ref, ours, a, b, torch.float32, exact=True)


@pytest.mark.parametrize("fused", [False, True])
def test_adam_with_decoupled_weight_decay_is_torchs(fused):
    """Against torch's own Adam(decoupled_weight_decay=True), not against our AdamW (the same code)."""
    a, b = make_params(SPECS, torch.float32, 0), make_params(SPECS, torch.float32, 0)
    kw = dict(lr=0.05, eps=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    ref = torch.optim.Adam(a, foreach=False, **kw)
    ours = kernels.Adam(b, fused=fused, **kw)
    _train([(ref, a), (ours, b)], 20, 0)
    assert_same(ref, ours, a, b, torch.float32, exact=not fused)


def _embedding_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"embed": torch.nn.Embedding(5000, 256), "head": torch.nn.Linear(256, 2)})


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_saving_a_submodule_writes_only_that_submodule(name, tmp_path):
    """Every parameter lives in one flat buffer; torch.save once wrote that whole buffer for a 2 kB head
    (5.1 MB: the embedding included), and safetensors refused the model."""
    import io

    model = _embedding_model()
    opt = getattr(kernels, name)(model.parameters(), lr=0.1)
    for _ in range(2):
        model["head"](model["embed"](torch.randint(0, 5000, (8,)))).sum().backward()
        opt.step()
        opt.zero_grad()
    head_bytes = sum(p.numel() * p.element_size() for p in model["head"].parameters())
    buf = io.BytesIO()
    torch.save(model["head"].state_dict(), buf)
    assert buf.tell() < head_bytes + 4096, (buf.tell(), head_bytes)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for k, v in model["head"].state_dict().items():
        assert torch.equal(loaded[k], v)
    # the parameters still are the optimizer's buffer: loading values into them is what the next step reads
    with torch.no_grad():
        model["head"].weight.fill_(1.0)
    model["head"].weight.grad = torch.zeros_like(model["head"].weight)
    if name == "SGD":
        opt.step()
        assert torch.all(model["head"].weight == 1.0)
    # safetensors saves and loads the model (no shared storage that no tensor covers)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    assert path.stat().st_size < sum(p.numel() * p.element_size() for p in model.parameters()) + 4096
    fresh = _embedding_model()
    safetensors_torch.load_model(fresh, str(path))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_parameters_outlive_the_optimizer():
    import gc

    model = _embedding_model()
    opt = kernels.Adam(model.parameters(), lr=0.1)
    model["head"](model["embed"](torch.tensor([1, 2]))).sum().backward()
    opt.step()
    expected = [p.detach().clone() for p in model.parameters()]
    del opt
    gc.collect()
    junk = [torch.full((5000, 256), 7.0) for _ in range(4)]  # reuse of freed memory would show here
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p, e)
    del junk


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_adagrad_state_exists_from_construction(fused, dtype):
    """torch.optim.Adagrad creates ``step`` 0 and ``sum`` = initial_accumulator_value (complex: v + vi) in
    ``__init__``: the state_dict before any step is torch's, both ways, and a group added later (where torch
    itself would fail at the first step) gets the same initial state."""
    a = [torch.nn.Parameter(torch.randn(3, 2, dtype=dtype)), torch.nn.Parameter(torch.randn(4, dtype=dtype))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ref = torch.optim.Adagrad(a, foreach=False, initial_accumulator_value=0.3)
    ours = kernels.Adagrad(b, fused=fused, initial_accumulator_value=0.3)
    s_ref, s_ours = ref.state_dict()["state"], ours.state_dict()["state"]
    assert list(s_ours) == list(s_ref) == [0, 1]
    for pid in s_ref:
        assert list(s_ours[pid]) == list(s_ref[pid]) == ["step", "sum"]
        assert float(s_ours[pid]["step"]) == 0.0 and s_ours[pid]["step"].dtype == s_ref[pid]["step"].dtype
        torch.testing.assert_close(s_ours[pid]["sum"], s_ref[pid]["sum"], rtol=0, atol=0)
    # a checkpoint taken before any step loads into torch and back, then both train alike
    ref2 = torch.optim.Adagrad(a, foreach=False, initial_accumulator_value=0.3)
    ref2.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train([(ref2, a), (ours, b)], 5, 0)
    assert_same(ref2, ours, a, b, dtype, exact=not fused)
    extra = torch.nn.Parameter(torch.randn(5, dtype=dtype))
    ours.add_param_group({"params": [extra], "initial_accumulator_value": 2.0})
    st = ours.state[extra]
    assert float(st["step"]) == 0.0
    torch.testing.assert_close(torch.view_as_real(st["sum"]) if dtype.is_complex else st["sum"],
                               torch.full((5, 2) if dtype.is_complex else (5,), 2.0), rtol=0, atol=0)


def test_adagrad_share_memory_is_refused_clearly():
    opt = kernels.Adagrad([torch.nn.Parameter(torch.ones(3))])
    message = (r"^kernels\.Adagrad\.share_memory\(\): state in shared memory \(Hogwild training\) is not "
               r"supported; use torch\.optim\.Adagrad for that$")
    with pytest.raises(NotImplementedError, match=message):
        opt.share_memory()


@pytest.mark.parametrize("cls", [kernels.AdamW, kernels.AdamW8bit], ids=lambda c: c.__name__)
def test_adamw_checkpoint_without_decoupled_flag_stays_decoupled(cls):
    """A checkpoint from before torch had ``decoupled_weight_decay`` (or torch.optim.Adam's, which has it
    False): loaded into AdamW, the groups say True, as torch.optim.AdamW's ``__setstate__`` makes them, and
    the step decays decoupled (the same parameters as torch's AdamW after the same load)."""
    kw = dict(lr=0.1, weight_decay=0.5)
    a, b = make_params(SPECS, torch.float32, 0), make_params(SPECS, torch.float32, 0)
    ours, ref = cls(a, fused=False, **kw), torch.optim.AdamW(b, foreach=False, **kw)
    sd = copy.deepcopy(ref.state_dict())
    for group in sd["param_groups"]:
        group["decoupled_weight_decay"] = False
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    assert [g["decoupled_weight_decay"] for g in ours.param_groups] == [True] * len(ours.param_groups)
    assert [g["decoupled_weight_decay"] for g in ref.param_groups] == [True] * len(ref.param_groups)
    _train([(ours, a), (ref, b)], 3, 4)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)


# the group keys each torch optimizer's __setstate__ fills in for a checkpoint saved before it had them
LEGACY_KEYS = {"Adam": ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay",
                        "fused"],
               "SGD": ["nesterov", "maximize", "foreach", "differentiable", "fused"],
               "RMSprop": ["momentum", "centered", "foreach", "maximize", "differentiable", "capturable"],
               "Adagrad": ["foreach", "maximize", "differentiable", "fused"]}
LEGACY_KEYS["AdamW"] = LEGACY_KEYS["Adam"]
LEGACY_KEYS["Lion"] = []  # lion-pytorch has added no option to its groups
LEGACY_KEYS["NAdam"] = ["maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay"]
LEGACY_KEYS["ScheduleFreeAdamW"] = []  # schedulefree's __init__ sets every option it has
LEGACY_KEYS["RAdam"] = ["foreach", "maximize", "differentiable", "decoupled_weight_decay", "capturable"]
# built with options on, so that "the checkpoint predates the option: off" differs from "this optimizer's own"
BUILT_WITH = {"Adam": dict(maximize=True, amsgrad=True), "AdamW": dict(maximize=True, amsgrad=True),
              "SGD": dict(maximize=True, momentum=0.9, nesterov=True), "RMSprop": dict(maximize=True, momentum=0.5,
                                                                                     centered=True),
              "Adagrad": dict(maximize=True), "Lion": dict(weight_decay=0.1),
              "NAdam": dict(maximize=True, weight_decay=0.1, decoupled_weight_decay=True),
              "RAdam": dict(maximize=True, weight_decay=0.1, decoupled_weight_decay=True),
              "ScheduleFreeAdamW": dict(weight_decay=0.1, warmup_steps=3)}


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_from_before_an_option_existed_loads_as_torchs(name):
    """An old checkpoint: its groups lack the options torch added since, and its steps are Python numbers.
    Loaded, the groups get what torch's __setstate__ gives them (the option off), not the values this
    optimizer was built with, and training continues as torch's does."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    src_p = make_params(SPECS, torch.float32, 0)
    src = torch_cls(src_p, foreach=False, lr=0.05)
    _train([(src, src_p)], 2, 0)
    sd = copy.deepcopy(src.state_dict())
    for group in sd["param_groups"]:
        for key in LEGACY_KEYS[name]:
            del group[key]
    for entry in sd["state"].values():
        if "step" in entry:
            entry["step"] = float(entry["step"])
    a, b = make_params(SPECS, torch.float32, 0), make_params(SPECS, torch.float32, 0)
    ours = ours_cls(a, fused=False, lr=0.05, **BUILT_WITH[name])
    ref = torch_cls(b, foreach=False, lr=0.05, **BUILT_WITH[name])
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    group, ref_group = ({k: v for k, v in g.param_groups[0].items() if k not in ("params", "fused")}
                        for g in (ours, ref))
    assert group == ref_group
    assert ours.param_groups[0].get("fused") is None  # ours: the implementation choice stays out of the group
    _train([(ours, a), (ref, b)], 3, 5)
    assert_same(ref, ours, b, a, torch.float32, exact=True)


@pytest.mark.parametrize("name", NAMES)
def test_bad_state_dict_messages_say_what_and_where(name):
    """Each refusal of a checkpoint, word for word: which parameter of which group, which key, what it has."""
    ours_cls, _ = OPTIMIZERS[name]
    params = make_params(SPECS, torch.float32, 0)
    ours = ours_cls(params, fused=False, **CONFIGS[name])
    _train([(ours, params)], 2, 0)
    good = ours.state_dict()
    key = next(k for k in good["state"][0] if k != "step" and k not in ours_cls._host_state)
    step_in_state = "step" in good["state"][0]

    def edited(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd
    cases = [
        (edited(lambda sd: sd["state"][1].__setitem__(key, torch.zeros(7, 7))),
         f"state of parameter 1 in group 0: {key!r} has shape (7, 7), the parameter has (5,)"),
        # a parameter without state (never stepped) before the bad one: the check goes on past it
        (edited(lambda sd: (sd["state"].pop(0), sd["state"][1].__setitem__(key, torch.zeros(7, 7)))),
         f"state of parameter 1 in group 0: {key!r} has shape (7, 7), the parameter has (5,)"),
        (edited(lambda sd: sd["state"][0].__setitem__(key, [0.0] * 12)),
         f"state of parameter 0 in group 0 lacks tensor {key!r} needed by {name} with these options (got list)"),
        (edited(lambda sd: sd["state"][2].__setitem__("kahan_comp", torch.zeros(3))),
         "state of parameter 2 in group 0: 'kahan_comp' must be a floating-point tensor of the parameter's "
         "shape () (got torch.Size([3]))"),
        (edited(lambda sd: sd["state"][2].__setitem__("kahan_comp", 0.5)),
         "state of parameter 2 in group 0: 'kahan_comp' must be a floating-point tensor of the parameter's "
         "shape () (got float)"),
        (edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))),
         "loaded state dict has 2 parameter groups, this optimizer has 1"),
        (edited(lambda sd: sd["param_groups"][0]["params"].pop()),
         "loaded state dict's parameter group 0 has 3 parameters, this optimizer's has 4"),
        ({"param_groups": good["param_groups"]},
         "a state_dict needs the keys 'state' and 'param_groups' (as returned by optimizer.state_dict())"),
        ([good], "a state_dict needs the keys 'state' and 'param_groups' (as returned by optimizer.state_dict())"),
    ]
    if len(good["state"][0]) > 1:  # SGD's only state is its buffer: without it, a parameter has no state yet
        cases.append((edited(lambda sd: sd["state"][0].pop(key)),
                      f"state of parameter 0 in group 0 lacks tensor {key!r} needed by {name} with these options "
                      "(got NoneType)"))
    if step_in_state:
        cases += [(edited(lambda sd: sd["state"][0].pop("step")), "state of parameter 0 in group 0 lacks a scalar 'step'"),
                  (edited(lambda sd: sd["state"][1].__setitem__("step", torch.ones(2))),
                   "state of parameter 1 in group 0 lacks a scalar 'step'")]
    for host in ours_cls._host_state:  # a scalar kept beside step (NAdam's mu_product)
        cases += [(edited(lambda sd: sd["state"][0].pop(host)),
                   f"state of parameter 0 in group 0 lacks the scalar {host!r} needed by {name} (got NoneType)"),
                  (edited(lambda sd: sd["state"][1].__setitem__(host, torch.ones(2))),
                   f"state of parameter 1 in group 0: {host!r} has shape (2,); it is a scalar"),
                  (edited(lambda sd: sd["state"][1].__setitem__(host, torch.tensor(1))),
                   f"state of parameter 1 in group 0: {host!r} must be floating-point (got torch.int64)"),
                  (edited(lambda sd: sd["state"][1].__setitem__(host, True)),
                   f"state of parameter 1 in group 0 lacks the scalar {host!r} needed by {name} (got bool)")]
    for bad, message in cases:
        with pytest.raises(ValueError) as info:
            ours.load_state_dict(bad)
        assert str(info.value) == message
    ours.load_state_dict(good)  # and the good one still loads


def test_hand_edited_param_groups_are_checked_at_the_next_step():
    """What add_param_group refuses, edited into param_groups by hand, is refused by the next step, naming
    the entry."""
    def fresh():
        ps = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
        opt = kernels.Adam(ps, lr=0.1)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return opt, ps
    leaf = torch.randn(2, requires_grad=True)
    edits = [
        (lambda g, ps: g.__setitem__("params", tuple(ps)), TypeError,
         "param_groups[0]['params'] must be a list of tensors (got tuple)"),
        (lambda g, ps: g["params"].append([1.0]), TypeError,
         "param_groups[0]['params'][2]: optimizer can only optimize Tensors, but one of the params is list"),
        (lambda g, ps: g["params"].append(leaf * 2), ValueError,
         "param_groups[0]['params'][2]: can't optimize a non-leaf Tensor"),
        (lambda g, ps: g["params"].append(torch.zeros(2, 2).to_sparse().requires_grad_()), ValueError,
         "param_groups[0]['params'][2]: Adam supports only dense (strided) parameters, got layout torch.sparse_coo"),
        (lambda g, ps: g["params"].append(torch.eye(2).to_sparse_csr().requires_grad_()), ValueError,
         "param_groups[0]['params'][2]: Adam supports only dense (strided) parameters, got layout torch.sparse_csr"),
        (lambda g, ps: g["params"].append(ps[0]), ValueError,
         "param_groups[0]['params'][2]: this parameter is already in param group 0; each parameter may appear "
         "once across all groups"),
    ]
    for edit, exc, message in edits:
        opt, ps = fresh()
        edit(opt.param_groups[0], ps)
        with pytest.raises(exc) as info:
            opt.step()
        assert str(info.value) == message


def _copied(opt, how):
    if how == "deepcopy":
        return copy.deepcopy(opt)
    return pickle.loads(pickle.dumps(opt))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fused", [False, True, None])
def test_a_copied_or_pickled_optimizer_keeps_fused_and_steps_as_the_original(name, fused):
    """``copy.deepcopy`` and pickle (torch's ``__getstate__``/``__setstate__``) give an optimizer of its own
    parameters and state that keeps the user's ``fused`` (torch keeps its ``fused`` in the groups; ours is an
    attribute, which torch's ``__getstate__`` leaves out: a copy of a ``fused=False`` optimizer ran compiled)
    and then steps bit for bit as the original."""
    ours_cls, _ = OPTIMIZERS[name]
    params = make_params(SPECS, torch.float32, 0)
    opt = ours_cls(params, fused=fused, **CONFIGS[name])
    _train([(opt, params)], 3, seed=1)
    for how in ("deepcopy", "pickle"):
        twin = _copied(opt, how)
        assert (twin._fused, twin._fused_strict) == (opt._fused, fused is True), how
        twin_params = [p for g in twin.param_groups for p in g["params"]]
        assert not any(a is b for a, b in zip(twin_params, params))
        _train([(opt, params), (twin, twin_params)], 3, seed=2)
        assert_same(opt, twin, params, twin_params, torch.float32, exact=True)


@pytest.mark.parametrize("name", NAMES)
def test_a_pickle_without_fused_gets_the_default(name):
    """An optimizer pickled before ``fused`` was saved (torch's ``__getstate__`` alone) loads with the default,
    as a new optimizer would get it, and steps as the original within tolerance."""
    from optadvisor.kernels._runtime.compile import resolve_fused

    ours_cls, _ = OPTIMIZERS[name]
    params = make_params(SPECS, torch.float32, 0)
    opt = ours_cls(params, fused=False, **CONFIGS[name])
    _train([(opt, params)], 3, seed=1)
    twin = ours_cls.__new__(ours_cls)
    twin.__setstate__(copy.deepcopy(torch.optim.Optimizer.__getstate__(opt)))
    assert (twin._fused, twin._fused_strict) == (resolve_fused(None), False)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    _train([(opt, params), (twin, twin_params)], 3, seed=2)
    assert_same(opt, twin, params, twin_params, torch.float32)


# SGD's float state is its momentum buffer alone: without it the state is empty, a parameter that has not
# stepped yet, as torch reads it (and so is Lion's exp_avg)
_LACKING = [(n, torch.float32, {}) for n in NAMES if n not in ("SGD", "Lion")] + \
           [(n, torch.bfloat16, {"kahan_sum": True}) for n in NAMES]


@pytest.mark.parametrize("name, dtype, extra", _LACKING, ids=[f"{n}-{d}" for n, d, _ in _LACKING])
def test_hand_edited_state_lacking_a_tensor_is_refused_by_name_at_the_next_step(name, dtype, extra):
    """A state tensor deleted from ``opt.state`` by hand is found when the next step rebuilds the buffers, and
    named by its parameter's place in its group (2; it is second in its bucket, as the float64 parameter
    before both has a bucket of its own) and by the optimizer; a Kahan-compensated bucket checks the same way."""
    ours_cls, _ = OPTIMIZERS[name]
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    d, c = torch.nn.Parameter(torch.randn(2).to(dtype)), torch.nn.Parameter(torch.randn(5).to(dtype))
    opt = ours_cls([{"params": [a]}, {"params": [b, d, c]}], **CONFIGS[name], **extra)
    for p in (a, b, d, c):
        p.grad = torch.ones_like(p)
    opt.step()
    key = next(k for k in opt.state[c] if k != "step")
    del opt.state[c][key]
    opt.param_groups[1]["params"] = list(opt.param_groups[1]["params"])
    with pytest.raises(ValueError, match="^" + re.escape(
            f"state for parameter 2 of group 1 lacks {key!r}, which {name} needs with these options") + "$"):
        opt.step()

"""kernels.Muon against torch.optim.Muon (2-D parameters only: the generic tables draw any shape, so Muon has
its own), and the Muon + AdamW hybrid (kernels.muon_with_adamw)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import UNDER_MUTMUT, examples

from optadvisor import kernels
from optadvisor.kernels.optim.muon import adjusted_lr, newton_schulz

STRICT = None if UNDER_MUTMUT else True

shapes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4)
muon_kwargs = st.fixed_dictionaries(dict(
    lr=st.sampled_from([1e-3, 0.02, 0.1]), weight_decay=st.sampled_from([0.0, 0.1]),
    momentum=st.sampled_from([0.95, 0.5, 0.0]), nesterov=st.booleans(),
    ns_steps=st.sampled_from([5, 1, 0]), adjust_lr_fn=st.sampled_from([None, "original", "match_rms_adamw"])))


def _pair(dims, kw, fused, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(d, generator=gen) for d in dims]
    a = [torch.nn.Parameter(t.clone()) for t in base]
    b = [torch.nn.Parameter(t.clone()) for t in base]
    return a, b, kernels.Muon(a, fused=fused, **kw), torch.optim.Muon(b, **kw)


def _train(a, b, ours, ref, steps, seed, none_every=0):
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        for j, (p, q) in enumerate(zip(a, b)):
            if none_every and (t + j) % none_every == 0:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()


@pytest.mark.parametrize("fused", [False, STRICT])
@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=shapes, kw=muon_kwargs, steps=st.integers(1, 8), none_every=st.sampled_from([0, 3]),
       seed=st.integers(0, 2 ** 16))
def test_muon_matches_torch(fused, dims, kw, steps, none_every, seed):
    """Eager: bit for bit with torch's for-loop path (parameters and momentum). Compiled: the momentum within
    float32 tolerance, the parameters within one bfloat16 step of the orthogonalized update (the iteration
    runs in bfloat16: an ulp of difference in its input may round one element of its output otherwise)."""
    a, b, ours, ref = _pair(dims, kw, fused, seed)
    _train(a, b, ours, ref, steps, seed, none_every)
    for p, q in zip(a, b):
        if fused is False:
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        else:
            torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       rtol=1.3e-6, atol=1e-5)
            lr = adjusted_lr(kw["lr"], kw["adjust_lr_fn"], p.shape)
            torch.testing.assert_close(p, q, rtol=0, atol=max(1e-5, lr * 2 ** -7 * 1.5 * steps))


def test_checkpoints_interchange_with_torch():
    dims, kw = [(8, 5), (5, 8)], dict(lr=0.02)
    a, b, ours, ref = _pair(dims, kw, False)
    _train(a, b, ours, ref, 3, 0)
    assert list(ours.state_dict()["param_groups"][0]) == list(ref.state_dict()["param_groups"][0])
    assert [list(s) for s in ours.state_dict()["state"].values()] == [["momentum_buffer"]] * 2
    # ours -> torch and torch -> ours, then 3 more steps each: equal to the uninterrupted runs
    a2 = [torch.nn.Parameter(p.detach().clone()) for p in a]
    b2 = [torch.nn.Parameter(q.detach().clone()) for q in b]
    ref2, ours2 = torch.optim.Muon(a2, **kw), kernels.Muon(b2, fused=False, **kw)
    ref2.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours2.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train(a, a2, ours, ref2, 3, 7)
    _train(b2, b, ours2, ref, 3, 7)
    for x, y in [*zip(a, a2), *zip(b2, b)]:
        assert torch.equal(x, y)


def test_newton_schulz_orthogonalizes():
    """Five iterations bring the singular values of a random matrix into (0.5, 1.5) (not exactly 1: the
    quintic's coefficients trade that for speed, Jordan et al.), in both orientations."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(64, 16), (16, 64), (32, 32)]:
        g = torch.randn(shape, generator=gen)
        s = torch.linalg.svdvals(newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float())
        assert s.min() > 0.5 and s.max() < 1.5, s
        assert newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).shape == shape


def test_adjusted_lr_closed_forms():
    assert adjusted_lr(0.1, None, torch.Size([40, 10])) == 0.1 * 2.0
    assert adjusted_lr(0.1, "original", torch.Size([10, 40])) == 0.1
    assert adjusted_lr(0.1, "match_rms_adamw", torch.Size([10, 64])) == pytest.approx(0.1 * 0.2 * 8.0)


def test_refusals_are_torchs():
    for shape in [(3,), (2, 2, 2), ()]:
        message = f"Muon only supports 2D parameters whereas we found a parameter with size: {torch.Size(shape)}"
        for cls in (kernels.Muon, torch.optim.Muon):
            with pytest.raises(ValueError, match=re.escape(message)):
                cls([torch.nn.Parameter(torch.zeros(shape))])
    with pytest.raises(ValueError, match="Adjust learning rate function cubic is not supported"):
        kernels.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="cubic")
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1"):
        kernels.Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=-1)
    with pytest.raises(ValueError, match="Number of steps must be less than 100"):
        newton_schulz(torch.zeros(2, 2), (1.0, 0.0, 0.0), 100, 1e-7)
    with pytest.raises(ValueError, match="is complex"):
        kernels.Muon([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.h1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.conv = torch.nn.Conv1d(1, 2, 3)
        self.h2 = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 50)

    def forward(self, x):
        h = self.norm(torch.relu(self.h1(self.emb(x))))
        h = h + self.conv(h.unsqueeze(1)).sum(1).mean(-1, keepdim=True)
        return self.head(torch.relu(self.h2(h)))


def test_hybrid_split_and_overrides():
    torch.manual_seed(0)
    model = _Net()
    muon, adamw = kernels.split_for_muon(model)
    assert muon == ["h1.weight", "h2.weight"]
    assert adamw == ["emb.weight", "h1.bias", "norm.weight", "norm.bias", "conv.weight", "conv.bias", "h2.bias",
                     "head.weight", "head.bias"]
    muon, _ = kernels.split_for_muon(model, route=lambda name, p: name == "head.weight")
    assert muon == ["head.weight"]
    with pytest.raises(ValueError, match=r"route sends 'conv.weight' \(shape \(2, 1, 3\)\) to Muon"):
        kernels.split_for_muon(model, route=lambda name, p: name == "conv.weight")
    with pytest.raises(TypeError, match="must return a bool"):
        kernels.split_for_muon(model, route=lambda name, p: 1)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        kernels.muon_with_adamw([torch.zeros(2)])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        kernels.muon_with_adamw(frozen)


def test_hybrid_is_one_optimizer_for_schedulers_and_checkpoints():
    """Groups: Muon's then AdamW's decayed matrices then AdamW's undecayed vectors; a scheduler drives all;
    the same steps as the two optimizers built by hand; a checkpoint resumes exactly; a wrong one is refused
    and leaves it as it was."""
    torch.manual_seed(0)
    model, twin = _Net(), _Net()
    twin.load_state_dict(model.state_dict())
    opt = kernels.muon_with_adamw(model, lr=1e-3, weight_decay=0.1, fused=False)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3, 6]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    named = dict(twin.named_parameters())
    by_hand = [kernels.Muon([named["h1.weight"], named["h2.weight"]], lr=1e-3, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw", fused=False),
               kernels.AdamW([{"params": [named[n] for n in ("emb.weight", "conv.weight", "head.weight")]},
                              {"params": [named[n] for n in ("h1.bias", "norm.weight", "norm.bias", "conv.bias",
                                                             "h2.bias", "head.bias")], "weight_decay": 0.0}],
                             lr=1e-3, weight_decay=0.1, fused=False)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)) for o in by_hand]
    x = torch.randint(0, 50, (8,))
    for _ in range(4):
        for m, opts in ((model, [opt]), (twin, by_hand)):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), x).backward()
            for o in opts:
                o.step()
        for s in (sched, *scheds):
            s.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3 / 5] * 3
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    saved = copy.deepcopy(opt.state_dict())
    assert sorted(saved["state"]) == list(range(11))
    resumed_model = _Net()
    resumed_model.load_state_dict(model.state_dict())
    resumed = kernels.muon_with_adamw(resumed_model, fused=False)
    bad = copy.deepcopy(saved)
    bad["param_groups"] = bad["param_groups"][::-1]
    before = copy.deepcopy(resumed.state_dict())
    with pytest.raises(ValueError, match="parameter group 0 is AdamW's; this optimizer's is Muon's"):
        resumed.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["state"][10]["exp_avg"] = torch.zeros(7)  # AdamW's half is wrong: Muon's must not stay loaded
    with pytest.raises(ValueError, match="shape"):
        resumed.load_state_dict(bad)
    assert resumed.state_dict()["param_groups"] == before["param_groups"] and not resumed.muon.state
    resumed.load_state_dict(saved)
    for m, o in ((model, opt), (resumed_model, resumed)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), x).backward()
        o.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="add a parameter group to .muon or .adamw"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})


def test_the_factory_and_the_recipe_build_the_hybrid():
    """create_optimizer(model, "muon") is muon_with_adamw (kwargs to Muon; embeddings undecayed on request);
    a recommendation whose optimizer is Muon builds it through rec.build, every parameter in a group."""
    from optadvisor.advisor import advise
    from optadvisor.advisor._engine import Choice

    model = _Net()
    opt = kernels.create_optimizer(model, "muon", lr=2e-3, no_decay_embeddings=True, ns_steps=3)
    assert isinstance(opt, kernels.MuonWithAdamW) and opt.muon.param_groups[0]["ns_steps"] == 3
    no_decay = next(g for g in opt.adamw.param_groups if g["weight_decay"] == 0.0)
    assert any(p is model.emb.weight for p in no_decay["params"])
    with pytest.raises(ValueError, match="layer_decay and no_decay_bias_and_norm=False do not apply"):
        kernels.create_optimizer(model, "muon", layer_decay=0.5)
    rec = advise(task="classification", n_samples=1000)
    rec = rec.model_copy(update={"optimizer": Choice(name="Muon", params={"lr": 1e-3}, score=0.0)})
    recipe = rec.build(model, total_steps=10)
    assert isinstance(recipe.optimizer, kernels.MuonWithAdamW)
    assert sum(len(g["params"]) for g in recipe.optimizer.param_groups) == len(list(model.parameters()))
    x = torch.randint(0, 50, (4,))
    torch.nn.functional.cross_entropy(model(x), x).backward()
    recipe.optimizer.step()
    recipe.scheduler.step()

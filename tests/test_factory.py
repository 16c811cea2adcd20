"""The timm-style factory: every catalog optimizer and variant by name, the usual parameter groups, the same
numbers as building the optimizer by hand, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from optadvisor import create_optimizer, kernels, list_optimizers


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))  # directly on the model: layer 0

    def forward(self, x):
        return self.head(self.norm(self.embed(x))) * self.scale


def _train(opt, model, steps=5):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=next(model.parameters()).dtype)
        if hasattr(opt, "train"):  # schedule-free: steps in train mode (its users call train() too)
            opt.train()
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def test_the_names():
    names = list_optimizers()
    assert {"adam", "adamw", "sgd", "rmsprop", "adagrad", "adam8bit", "adamw8bit", "sgd8bit", "rmsprop8bit",
            "adamw_bf16state", "adamw_kahan", "momentum", "nesterov"} <= set(names)
    assert names == sorted(names)
    assert list_optimizers("adamw*") == ["adamw", "adamw8bit", "adamw_bf16state", "adamw_kahan"]
    assert list_optimizers("ADAMW8*") == ["adamw8bit"]
    assert list_optimizers("lion*") == ["lion", "lion8bit", "lion_bf16state", "lion_kahan"]
    assert list_optimizers("schedulefree*") == ["schedulefreeadamw", "schedulefreeadamw_kahan"]  # z: float only
    assert list_optimizers("muon*") == ["muon"]
    assert list_optimizers("shampoo*") == []
    with pytest.raises(TypeError, match="pattern must be a string"):
        list_optimizers(3)


@pytest.mark.parametrize("name", list_optimizers())
def test_every_name_builds_and_trains(name):
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16 if name.endswith("_kahan") else torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer(model, name, lr=1e-2)
    _train(opt, model, 3)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if name.endswith("_kahan"):
        assert all(g["kahan_sum"] for g in opt.param_groups) or getattr(opt, "defaults", {}).get("kahan_sum")
    if name == "nesterov":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_the_same_numbers_as_the_groups_built_by_hand():
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    ours = create_optimizer(a, "adamw", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay = [b.embed.weight, b.head.weight]
    no_decay = [b.embed.bias, b.norm.weight, b.norm.bias, b.head.bias, b.scale]
    hand = kernels.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=3e-3, weight_decay=0.1,
                         betas=(0.9, 0.95))
    _train(ours, a, 6)
    _train(hand, b, 6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert [g["weight_decay"] for g in ours.param_groups] == [0.0, 0.1]
    assert sum(len(g["params"]) for g in ours.param_groups) == len(list(a.parameters()))


def test_no_decay_switches_off_and_the_models_own_list():
    model = Net()
    flat = create_optimizer(model, "adamw", weight_decay=0.05, no_decay_bias_and_norm=False)
    assert [(g["weight_decay"], len(g["params"])) for g in flat.param_groups] == [(0.05, 7)]
    default = create_optimizer(model, "adamw")
    assert [g["weight_decay"] for g in default.param_groups] == [0.0, 0.01]  # AdamW's own default on matrices
    model.no_weight_decay = lambda: {"head.weight"}
    listed = create_optimizer(model, "adamw", weight_decay=0.05)
    no_decay = next(g for g in listed.param_groups if g["weight_decay"] == 0.0)
    assert any(p is model.head.weight for p in no_decay["params"])
    model.no_weight_decay = lambda: {"head.weight", "nope"}
    with pytest.raises(ValueError, match="names parameters the model does not have: nope"):
        create_optimizer(model, "adamw")


def test_layer_decay_scales_each_top_level_child():
    model = Net()
    opt = create_optimizer(model, "adam", lr=1.0, layer_decay=0.5, weight_decay=0.0)
    by_layer = {}
    for g in opt.param_groups:
        by_layer.setdefault(g["layer"], set()).add((g["lr"], g["lr_scale"]))
    # children: embed (1), norm (2), head (3); the model's own parameter: layer 0; four layers
    assert by_layer == {0: {(0.125, 0.125)}, 1: {(0.25, 0.25)}, 2: {(0.5, 0.5)}, 3: {(1.0, 1.0)}}
    # without lr, the optimizer's default is the base
    assert {g["lr"] for g in create_optimizer(model, "adam", layer_decay=0.5).param_groups if g["layer"] == 3} == {1e-3}


def test_frozen_parameters_are_left_out():
    model = Net()
    model.embed.requires_grad_(False)
    opt = create_optimizer(model, "sgd", lr=0.1)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.embed.weight) not in ids and id(model.head.weight) in ids
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="Net has no trainable parameters"):
        create_optimizer(model, "sgd", lr=0.1)


def test_bad_input():
    model = Net()
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'\. Did you mean 'adamw'.*Known: adafactor, adagrad, adagrad8bit, "
                                         r"adagrad_bf16state, adagrad_kahan, adam,"):
        create_optimizer(model, "adamww")
    with pytest.raises(ValueError, match="unknown optimizer 'shampoo'"):
        create_optimizer(model, "shampoo")
    with pytest.raises(ValueError, match="'adamw_kahan' sets kahan_sum itself; pass the base name 'adamw'"):
        create_optimizer(model, "adamw_kahan", kahan_sum=False)
    with pytest.raises(TypeError, match="AdamW takes no argument momentum"):
        create_optimizer(model, "adamw", momentum=0.9)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        create_optimizer(model, "adamw", layer_decay=1.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        create_optimizer([torch.nn.Parameter(torch.ones(2))], "adamw")
    model.no_weight_decay = lambda: "head.weight"
    with pytest.raises(TypeError, match=r"no_weight_decay\(\) must return names of parameters"):
        create_optimizer(model, "adamw")


def test_nested_children_boundaries_and_exact_messages():
    nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), torch.nn.Linear(3, 1))
    opt = create_optimizer(nested, "adam", lr=1.0, layer_decay=0.5, weight_decay=0.0)
    layers = {id(p): g["layer"] for g in opt.param_groups for p in g["params"]}
    assert layers[id(nested[0][0].weight)] == 1 and layers[id(nested[1].weight)] == 2
    # without lr the optimizer's default is scaled too, in every layer
    lrs = {g["layer"]: g["lr"] for g in create_optimizer(Net(), "adam", layer_decay=0.5).param_groups}
    assert lrs == {0: pytest.approx(1e-3 / 8), 1: pytest.approx(1e-3 / 4), 2: pytest.approx(1e-3 / 2), 3: 1e-3}
    assert {g["lr_scale"] for g in create_optimizer(Net(), "adam", layer_decay=1).param_groups} == {1.0}
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\] or None \(got 0\)"):
        create_optimizer(Net(), "adam", layer_decay=0)
    with pytest.raises(ValueError, match=r"^create_optimizer: unknown optimizer 'zzzzzz'\. Known: adafactor, adagrad, adagrad8bit, "
                                         r"adagrad_bf16state, adagrad_kahan, adam, "):
        create_optimizer(Net(), "zzzzzz")
    with pytest.raises(ValueError, match=r"Did you mean 'adamw', 'adam', 'radam'\? Known"):
        create_optimizer(Net(), "adamww")
    with pytest.raises(TypeError, match=r"AdamW takes no argument momentum, nesterov$"):
        create_optimizer(Net(), "adamw", momentum=0.9, nesterov=True)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module \(got list\)"):
        create_optimizer([], "adamw")
    with pytest.raises(TypeError, match=r"pattern must be a string \(got int\)"):
        list_optimizers(3)
    model = Net()
    model.no_weight_decay = lambda: {"nope", "zz"}
    with pytest.raises(ValueError, match=r"Net.no_weight_decay\(\) names parameters the model does not have: nope, zz"):
        create_optimizer(model, "adamw")
    # with the grouping off the model's list is not read
    assert len(create_optimizer(model, "adamw", no_decay_bias_and_norm=False).param_groups) == 1
    model.no_weight_decay = lambda: "head.weight"
    with pytest.raises(TypeError, match=r"Net\.no_weight_decay\(\) must return names of parameters"):
        create_optimizer(model, "adamw")

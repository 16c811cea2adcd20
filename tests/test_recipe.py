"""The training recipe: the schedule against its closed form, the weight-decay groups on real models, the
family rules, batch scaling, checkpoints, a plain training loop, and clear refusals."""

from __future__ import annotations

import io
import math

import pytest
import torch

from optadvisor import advise, kernels
from optadvisor.advisor import Choice, TaskProfile
from optadvisor.advisor._recipe import LRFactor, RecipeSpec
from optadvisor.advisor._rules import RuleError, load_rules


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.block = torch.nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's

    def forward(self, idx):
        return self.head(self.norm(self.block(self.embed(idx))))


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _closed_form(schedule, s, total, warmup, final=0.0, milestones=(0.5, 0.75), gamma=0.1):
    if s < warmup:
        return (s + 1) / warmup
    p = min(max((s - warmup) / (total - warmup), 0.0), 1.0)
    return {"constant": 1.0, "cosine": final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)),
            "linear": final + (1 - final) * (1 - p),
            "step": gamma ** sum(s >= m * total for m in milestones)}[schedule]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "step"])
@pytest.mark.parametrize("warmup_fraction", [0.0, 0.1])
def test_the_scheduler_follows_the_closed_form_step_by_step(schedule, warmup_fraction):
    spec = RecipeSpec(schedule=schedule, warmup_fraction=warmup_fraction, final_lr_fraction=0.1,
                      milestones=[0.3, 0.6], gamma=0.5)
    rec = advise(task="regression").model_copy(update={"recipe": spec})
    total = 50
    recipe = rec.build(torch.nn.Linear(3, 1), total_steps=total)
    base = rec.optimizer.params["lr"]
    assert recipe.warmup_steps == round(warmup_fraction * total) and recipe.total_steps == total
    seen = []
    for _ in range(total + 5):  # past the end the last factor holds
        seen.append(recipe.optimizer.param_groups[0]["lr"])
        recipe.optimizer.step()
        recipe.scheduler.step()
    want = [base * _closed_form(schedule, s, total, recipe.warmup_steps, 0.1, (0.3, 0.6), 0.5)
            for s in range(total + 5)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
    # chosen points, by hand
    f = LRFactor(spec, 100)
    if warmup_fraction:
        assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if schedule == "cosine" and not warmup_fraction:
        assert f(0) == 1.0 and f(50) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    if schedule == "step" and not warmup_fraction:
        assert (f(29), f(30), f(59), f(60)) == (1.0, 0.5, 0.5, 0.25)


def test_the_125m_language_model_gets_the_pretraining_recipe_and_its_groups():
    rec = advise(task="classification", model_kind="transformer", n_params=125_000_000, n_samples=10_000_000,
                 n_classes=50257, batch_size=512)
    assert rec.optimizer.name == "AdamW"
    assert rec.optimizer.params["betas"] == [0.9, 0.95] and rec.optimizer.params["weight_decay"] == 0.1
    assert rec.optimizer.params["lr"] == pytest.approx(6e-4)
    r = rec.recipe
    assert (r.schedule, r.warmup_fraction, r.final_lr_fraction, r.max_grad_norm) == ("cosine", 0.02, 0.1, 1.0)
    assert not r.decay_embeddings and not r.decay_bias_and_norm and r.batch_scaling == "sqrt"
    text = rec.explain()
    assert "recipe     cosine decay to 0.1x the learning rate; linear warmup over 0.02 of the steps; clip " \
           "gradient norm at 1; no weight decay on biases and norms or embeddings" in text
    model = TinyLM()
    recipe = rec.build(model, total_steps=1000)
    assert isinstance(recipe.optimizer, kernels.AdamW) and recipe.max_grad_norm == 1.0
    assert recipe.warmup_steps == 20 and isinstance(recipe.loss, kernels.CrossEntropyLoss)
    decayed = {n for n, p in model.named_parameters()
               if any(p is q for g in recipe.optimizer.param_groups if g["weight_decay"] == 0.1 for q in g["params"])}
    # matrices of the block decay; the tied embedding/head, biases and norms do not
    assert decayed == {"block.self_attn.in_proj_weight", "block.self_attn.out_proj.weight", "block.linear1.weight",
                       "block.linear2.weight"}
    n_grouped = sum(len(g["params"]) for g in recipe.optimizer.param_groups)
    assert n_grouped == len([p for p in model.parameters() if p.requires_grad])
    # sizes: the rate falls with width
    big = advise(task="classification", model_kind="transformer", n_params=1_300_000_000)
    assert big.optimizer.params["lr"] == pytest.approx(6e-4 * (1.3e9 / 125e6) ** -0.3)


def test_a_cnn_gets_sgd_nesterov_with_linear_batch_scaling():
    rec = advise(task="classification", model_kind="cnn", n_classes=10, batch_size=128)
    assert rec.optimizer.name == "SGD"
    p = rec.optimizer.params
    assert (p["lr"], p["momentum"], p["nesterov"], p["weight_decay"]) == (pytest.approx(0.05), 0.9, True, 5e-4)
    model = SmallCNN()
    recipe = rec.build(model, total_steps=100, batch_size=512)  # 4x the advised batch: 4x the rate
    assert recipe.scheduler.base_lrs == pytest.approx([0.2, 0.2])  # the peak; the warmup starts below it
    no_decay = {n for n, q in model.named_parameters()
                if any(q is x for g in recipe.optimizer.param_groups if g["weight_decay"] == 0 for x in g["params"])}
    assert no_decay == {"conv.bias", "bn.weight", "bn.bias", "fc.bias"}
    assert recipe.max_grad_norm is None and recipe.clip() is None
    # sqrt scaling for the Adam family; an explicit lr is not scaled
    lm = advise(task="classification", model_kind="transformer", n_params=125_000_000, batch_size=64)
    built = lm.build(TinyLM(), 100, batch_size=256)
    assert built.scheduler.base_lrs[0] == pytest.approx(6e-4 * 2)
    assert lm.build(TinyLM(), 100, batch_size=256, lr=1e-3).scheduler.base_lrs[0] == 1e-3


def test_fine_tuning_lowers_the_rate_and_warms_up():
    rec = advise(task="classification", model_kind="cnn", pretrained=True)
    assert rec.optimizer.name == "AdamW" and rec.optimizer.params["lr"] == 1e-4
    assert (rec.recipe.schedule, rec.recipe.warmup_fraction, rec.recipe.max_grad_norm) == ("linear", 0.06, 1.0)
    assert any("layer-wise learning-rate decay" in n.text for n in rec.notes)
    assert "recipe     linear decay to 0; linear warmup over 0.06 of the steps; clip gradient norm at 1; no weight " \
           "decay on biases and norms; sqrt learning-rate scaling with the batch size" in rec.explain()
    tf = advise(task="classification", model_kind="transformer", pretrained=True)
    assert tf.optimizer.params["lr"] == 5e-5 and tf.recipe.schedule == "linear"
    assert advise(task="regression", model_kind="rnn").recipe.max_grad_norm == 1.0
    # a tabular MLP keeps the default recipe: what the advice benchmark measured
    mlp = advise(task="regression", model_kind="mlp", n_samples=1000)
    assert mlp.recipe == RecipeSpec() and "recipe     constant; no clipping; no weight decay on biases and norms" \
        in mlp.explain()


def test_a_plain_loop_trains_and_the_checkpoint_resumes():
    torch.manual_seed(0)
    rec = advise(task="classification", model_kind="transformer", n_params=10_000)
    model = TinyLM()
    recipe = rec.build(model, total_steps=40)
    idx = torch.randint(0, 50, (8, 12))
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = recipe.loss(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        recipe.optimizer.zero_grad()
        loss.backward()
        norm = recipe.clip()
        assert norm is not None and torch.isfinite(norm)
        recipe.optimizer.step()
        recipe.scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    buf = io.BytesIO()
    torch.save({"opt": recipe.optimizer.state_dict(), "sched": recipe.scheduler.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    again = rec.build(model, total_steps=40)
    again.optimizer.load_state_dict(saved["opt"])
    again.scheduler.load_state_dict(saved["sched"])
    assert again.scheduler.last_epoch == 20
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in recipe.optimizer.param_groups]


def test_bad_input_is_refused_with_the_argument():
    rec = advise(task="regression").model_copy(update={"recipe": RecipeSpec(warmup_fraction=0.9)})
    for steps in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match=r"build: total_steps must be a positive int"):
            rec.build(torch.nn.Linear(2, 1), steps)
    with pytest.raises(ValueError, match=r"build: the warmup \(1 steps, warmup_fraction 0.9\) is not shorter than "
                                         r"the budget \(total_steps=1\)"):
        rec.build(torch.nn.Linear(2, 1), 1)
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        rec.build(torch.nn.Linear(2, 1).requires_grad_(False), 10)
    with pytest.raises(TypeError, match=r"build: model must be a torch.nn.Module \(got list\)"):
        rec.build([torch.zeros(2, requires_grad=True)], 10)
    with pytest.raises(ValueError, match=r"build: batch_size must be a positive int; got 0"):
        rec.build(torch.nn.Linear(2, 1), 10, batch_size=0)
    scaled = advise(task="regression").model_copy(update={"recipe": RecipeSpec(batch_scaling="linear")})
    with pytest.raises(ValueError, match=r"made without a batch size to scale from"):
        scaled.build(torch.nn.Linear(2, 1), 10, batch_size=32)
    # a schedule the optimizer cannot take: schedule-free AdamW's averaging is its schedule
    sf = advise(task="regression").model_copy(update={"optimizer": Choice(name="ScheduleFreeAdamW", params={}, score=0)})
    for recipe in (RecipeSpec(schedule="cosine"), RecipeSpec(warmup_fraction=0.1)):
        with pytest.raises(ValueError, match=r"^build: ScheduleFreeAdamW takes no learning-rate schedule \(its "
                                             r"averaging replaces one; warm up with its own warmup_steps argument\)"):
            sf.model_copy(update={"recipe": recipe}).build(torch.nn.Linear(2, 1), 10)
    assert sf.build(torch.nn.Linear(2, 1), 10).optimizer.__class__.__name__ == "ScheduleFreeAdamW"
    for bad in ({"warmup_fraction": 1.0}, {"milestones": [0.8, 0.2]}, {"milestones": [1.5]}, {"gamma": 0.0},
                {"max_grad_norm": 0.0}, {"schedule": "exponential"}, {"layer_decay": 1.5}):
        with pytest.raises(ValueError):
            RecipeSpec(**bad)


def _rule(tmp_path, recipe_yaml: str, when: str = "task == 'regression'"):
    path = tmp_path / "extra.yaml"
    path.write_text(f"""rules:
  - id: my-recipe
    description: d
    when: "{when}"
    then:
      params:
        recipe: {recipe_yaml}
    because: b
    source: s
    priority: 9
    examples:
      - facts: {{task: regression}}
        fires: true
""")
    return path


def test_the_rule_language_checks_recipe_values(tmp_path):
    rec = advise(task="regression", extra_rules=[_rule(tmp_path, "{schedule: linear, warmup_fraction: 0.1}")])
    assert (rec.recipe.schedule, rec.recipe.warmup_fraction) == ("linear", 0.1)
    with pytest.raises(RuleError, match=r"recipe.schedule: expected one of constant, cosine, linear, step, got "
                                         r"'exponential'"):
        load_rules(extra=[_rule(tmp_path, "{schedule: exponential}")])
    with pytest.raises(RuleError, match=r"recipe has no hyperparameter 'warmup'"):
        load_rules(extra=[_rule(tmp_path, "{warmup: 0.1}")])
    with pytest.raises(RuleError, match=r"recipe.schedule: expected one of"):
        load_rules(extra=[_rule(tmp_path, "{schedule: '=n_samples'}")])
    with pytest.raises(RuleError, match=r"recipe.max_grad_norm: expected a number"):
        load_rules(extra=[_rule(tmp_path, "{max_grad_norm: true}")])
    # a value valid as a number but not as a recipe: refused when the advice is made, naming the rule
    bad = _rule(tmp_path, "{warmup_fraction: '=n_samples / 100'}")
    with pytest.raises(RuleError, match=r"the recipe set by rule\(s\) my-recipe is invalid for these facts"):
        advise(task="regression", n_samples=500, extra_rules=[bad])
    assert advise(task="regression", n_samples=50, extra_rules=[bad]).recipe.warmup_fraction == 0.5


def test_pretrained_is_a_fact_with_a_default():
    assert TaskProfile(task="regression").pretrained is False
    assert "pretrained" not in TaskProfile(task="regression").known()
    assert TaskProfile(task="regression", pretrained=True).known()["pretrained"] is True

"""The recommendation inside Hugging Face's Trainer and PyTorch Lightning: each real library trains a tiny model
for 20 steps with our optimizer and scheduler, and ends with the weights of the same optimizer built by hand
(``create_optimizer``'s groups) and stepped in a plain loop."""

from __future__ import annotations

import pytest
import torch
from optadvisor.advisor import Choice

from optadvisor import advise, create_optimizer, kernels

STEPS = 20


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=gen)
    return x, x.sum(1) + 0.1 * torch.randn(32, generator=gen)


def _rec(**facts):
    return advise(task="regression", n_samples=32, n_features=6, **facts)


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.norm(self.body(x))).squeeze(-1)


def _by_hand(rec, **overrides):
    """The same optimizer built by hand and stepped STEPS times over the whole batch."""
    torch.manual_seed(0)
    model = Body()
    choice = rec.optimizer
    opt = create_optimizer(model, choice.name.lower(), **{**choice.params, **overrides})
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _same_groups(ours, by_hand):
    """The same groups and options (``initial_lr`` is the scheduler's record of the starting rate)."""
    assert len(ours.param_groups) == len(by_hand.param_groups)
    for a, b in zip(ours.param_groups, by_hand.param_groups):
        assert [p.shape for p in a["params"]] == [p.shape for p in b["params"]]
        a = dict(a)
        assert a.pop("initial_lr") == b["lr"]
        assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}


def test_groups_and_scheduler_without_any_trainer():
    rec = _rec()
    torch.manual_seed(0)
    model = Body()
    opt, sched = rec.for_hf_trainer(model, STEPS, weight_decay=0.1)
    assert type(opt).__name__ == rec.optimizer.name and type(opt).__module__.startswith("optadvisor.kernels")
    # decay on the two weight matrices only; biases and the norm's parameters in the no-decay group
    decay = {g["weight_decay"]: sorted(tuple(p.shape) for p in g["params"]) for g in opt.param_groups}
    assert decay == {0.1: [(1, 8), (8, 6)], 0.0: [(1,), (8,), (8,), (8,)]}
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler) and sched.optimizer is opt
    lr = rec.optimizer.params["lr"]
    for _ in range(3 * STEPS):  # constant: no schedule is advised yet, and stepping past the end changes nothing
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    state = sched.state_dict()
    torch.save(state, __import__("io").BytesIO())  # a checkpoint of the scheduler pickles
    out = rec.lightning_optimizers(Body(), STEPS)
    assert set(out) == {"optimizer", "lr_scheduler"}
    assert out["lr_scheduler"]["interval"] == "step" and out["lr_scheduler"]["frequency"] == 1
    assert out["lr_scheduler"]["scheduler"].optimizer is out["optimizer"]


def test_an_8bit_choice_and_overrides():
    rec = _rec()
    rec8 = rec.model_copy(update={"optimizer": Choice(name="AdamW8bit", params={"lr": 3e-4, "weight_decay": 0.05},
                                                      score=1.0)})
    opt, _ = rec8.for_hf_trainer(Body(), 5, lr=1e-3)
    assert isinstance(opt, kernels.AdamW8bit)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None, "20"])
def test_bad_step_counts_are_refused_with_the_argument(steps):
    rec = _rec()
    with pytest.raises(ValueError, match=r"for_hf_trainer: num_training_steps must be a positive int"):
        rec.for_hf_trainer(Body(), steps)
    with pytest.raises(ValueError, match=r"lightning_optimizers: total_steps must be a positive int"):
        rec.lightning_optimizers(Body(), steps)


def test_bad_models_are_refused():
    rec = _rec()
    with pytest.raises(TypeError, match=r"for_hf_trainer: model must be a torch.nn.Module \(got list\)"):
        rec.for_hf_trainer(list(Body().parameters()), STEPS)
    frozen = Body().requires_grad_(False)
    with pytest.raises(ValueError, match="Body has no trainable parameters"):
        rec.lightning_optimizers(frozen, STEPS)
    loss_rec = rec.model_copy(update={"optimizer": rec.loss})
    with pytest.raises(ValueError, match=r"lightning_optimizers: MSELoss is a loss, not an optimizer"):
        loss_rec.lightning_optimizers(Body(), STEPS)


def test_hf_trainer_trains_20_steps_like_the_optimizer_built_by_hand(tmp_path):
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install '.[test]')")
    transformers = pytest.importorskip("transformers", reason="pip install '.[test]' installs transformers")

    class HFModel(Body):
        def forward(self, x, labels=None):  # the Trainer's contract: a dict with the loss
            out = super().forward(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    rec = _rec()
    torch.manual_seed(0)
    model = HFModel()
    opt, sched = rec.for_hf_trainer(model, STEPS, weight_decay=0.01)
    x, y = _data()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=32, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        max_grad_norm=0.0)  # the Trainer's own clipping (1.0 by default) off: the advice has none
    trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, sched),
                                   train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(y))])
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt and trainer.lr_scheduler is sched
    reference = _by_hand(rec, weight_decay=0.01)
    _same_groups(opt, create_optimizer(reference, rec.optimizer.name.lower(),
                                       **{**rec.optimizer.params, "weight_decay": 0.01}))
    for a, b in zip(model.parameters(), reference.parameters()):
        # one batch of all 32 rows each step, in the Trainer's shuffled order: the sums differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), Body().parameters()))


def test_lightning_trains_20_steps_bit_for_bit_like_the_optimizer_built_by_hand():
    L = pytest.importorskip("lightning", reason="pip install '.[test]' installs lightning")
    rec = _rec()

    class LitModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Body()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return rec.lightning_optimizers(self.net, STEPS, weight_decay=0.01)

    torch.manual_seed(0)
    lit = LitModel()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, loader)
    assert trainer.global_step == STEPS
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert isinstance(trainer.optimizers[0], type(rec.build_optimizer(Body().parameters())))
    reference = _by_hand(rec, weight_decay=0.01)
    for a, b in zip(lit.net.parameters(), reference.parameters()):
        assert torch.equal(a, b)

"""Checkpoints written before the state-codec change load after it and training continues bit for bit.

``tests/data/checkpoints-26266b1.pt`` was written by main at 26266b1 (before kernels/precision existed): per
case, a small model and its optimizer's state_dict after 3 eager steps, and the model after 3 more (the same
models, seeds and data as below). Loaded with
``weights_only=True``: a checkpoint is data, never code."""

from __future__ import annotations

import os

import pytest
import torch

from optadvisor import kernels

DATA = os.path.join(os.path.dirname(__file__), "data", "checkpoints-26266b1.pt")
CASES = {
    "Adam": (kernels.Adam, dict(lr=1e-2, amsgrad=True)),
    "AdamW-bf16state": (kernels.AdamW, dict(lr=1e-2, state_dtype=torch.bfloat16)),
    "SGD-kahan": (kernels.SGD, dict(lr=1e-2, momentum=0.9, kahan_sum=True)),
    "RMSprop-bf16state": (kernels.RMSprop, dict(lr=1e-3, momentum=0.5, state_dtype=torch.bfloat16)),
    "Adagrad": (kernels.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),
    "AdamW8bit": (kernels.AdamW8bit, dict(lr=1e-2, block_size=64)),
    "SGD8bit": (kernels.SGD8bit, dict(lr=1e-2, momentum=0.9)),
    "RMSprop8bit": (kernels.RMSprop8bit, dict(lr=1e-3, momentum=0.9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_checkpoint_from_before_the_codecs_resumes_bit_for_bit(name):
    saved = torch.load(DATA, weights_only=True)[name]
    cls, kw = CASES[name]
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    if kw.get("kahan_sum"):
        model = model.to(torch.bfloat16)
    model.load_state_dict(saved["model"])
    opt = cls(model.parameters(), fused=False, **kw)
    opt.load_state_dict(saved["optimizer"])
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 80, generator=gen).to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()
    for key, want in saved["after"].items():
        assert torch.equal(model.state_dict()[key], want), key

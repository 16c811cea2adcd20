"""Argument checks shared by the optimizers, with torch.optim's exception types and messages."""

from __future__ import annotations

import torch


def check_lr(lr: float | torch.Tensor) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_selectors(name: str, *, differentiable: bool, capturable: bool = False) -> None:
    """torch's implementation selectors: ``foreach`` is ignored by the callers; these two change semantics
    we do not implement, so they are refused rather than silently ignored."""
    if capturable:
        raise ValueError(f"{name}: capturable=True (CUDA-graph capture) is not supported by optadvisor's "
                         "fused optimizers; use torch.optim for graph capture")
    if differentiable:
        raise ValueError(f"{name}: differentiable=True is not supported: the fused update runs under "
                         "no_grad; use torch.optim for differentiable optimization")

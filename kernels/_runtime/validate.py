"""Argument checks shared by the optimizers, with torch.optim's exception types and messages."""

from __future__ import annotations

from typing import Any

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


def check_adam_arguments(lr: float | torch.Tensor, eps: float, betas: tuple, weight_decay: float) -> None:
    """torch.optim's checks of Adam, AdamW, NAdam and RAdam, in torch's order and words."""
    check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def run_closure(closure: Any) -> Any:
    """``closure()`` with gradients enabled (a step runs under no_grad), or None without one: torch's start of
    every ``step(closure)``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()

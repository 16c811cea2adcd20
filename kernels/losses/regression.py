"""Regression losses: MSE and Huber — functions, their compiled cores and their ``nn.Module`` classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._catalog import register
from .base import (
    _check_reduction,
    _compiled,
    _compute_dtype,
    _entry,
    _grad_buffer,
    _inv,
    _kept,
    _legacy_reduction,
    _reduce,
    _run,
    _same_shape,
    _worth_compiling,
)


# The compiled core is the same math as the eager code above in one or two passes over memory (the eager
# one makes 4-7); sums accumulate in float64 so the result does not depend on how inductor splits the
# reduction. Signature convention (``_compile.run_fused``): ``fn(hp, *flags, *tensors)``.
# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def mse_fused(hp, need_grad: bool, reduce: bool, x, y, grad=None):
    # hp: [gradient scale (2/n or 2)]
    d = x.to(hp.dtype) - y.to(hp.dtype)
    if need_grad:
        grad.copy_(d * hp[0])
    sq = d * d
    return sq.to(torch.float64).sum() if reduce else sq
# pragma: no mutate end


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def huber_fused(hp, need_grad: bool, reduce: bool, x, y, grad=None):
    # hp: [delta, gradient scale (1/n or 1)]; loss = c (d - c/2) with c = clamp(d, -delta, delta) = gradient
    d = x.to(hp.dtype) - y.to(hp.dtype)
    c = torch.maximum(torch.minimum(d, hp[0]), -hp[0])
    if need_grad:
        grad.copy_(c * hp[1])
    per = c * (d - 0.5 * c)
    return per.to(torch.float64).sum() if reduce else per
# pragma: no mutate end


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Mean squared error, :math:`\ell = \operatorname{reduce}((x - y)^2)`; as :func:`torch.nn.functional.mse_loss`.

    Gradients flow to ``target`` too when it requires grad. Unlike torch (which warns), differing input
    and target shapes raise ValueError.

    Example::

        >>> loss = kernels.mse_loss(pred, y)
    """
    input, target = _entry("mse_loss", input, target)
    _check_reduction("mse_loss", reduction)
    _same_shape("mse_loss", input, target)

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        n = input.numel()
        done = _regression_compiled(mse_fused, [2.0 * _inv(n) if reduction == "mean" else 2.0], input, target,
                                    reduction, need_grad)
        if done is not None:
            return done
        d = input.to(cd) - target.to(cd)
        if reduction == "none":
            loss = (d * d).to(input.dtype)
        else:  # sum of squares without a d*d temporary, then d itself becomes the gradient: one buffer
            loss = _reduce(torch.linalg.vector_norm(d).square(), n, reduction).to(input.dtype)
        if not need_grad:
            return loss, None, None
        grad = d.mul_(2.0 * _inv(n) if reduction == "mean" else 2.0)
        return loss, _pair(grad, input, target), lambda go: go

    return _run("mse_loss", compute, input, target)


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0) -> Tensor:
    r"""Huber loss: :math:`\tfrac12 d^2` for :math:`|d|\le\delta`, else :math:`\delta(|d|-\tfrac12\delta)`,
    :math:`d = x - y`; as :func:`torch.nn.functional.huber_loss`.

    Computed as :math:`c\,(d - \tfrac12 c)` with :math:`c = \operatorname{clamp}(d, -\delta, \delta)`, which
    is also the gradient: one clamp gives both. ``delta`` must be > 0.

    Example::

        >>> loss = kernels.huber_loss(pred, y, delta=0.5)
    """
    input, target = _entry("huber_loss", input, target)
    _check_reduction("huber_loss", reduction)
    _same_shape("huber_loss", input, target)
    if not (isinstance(delta, (int, float)) and delta > 0):
        raise ValueError(f"huber_loss: 'delta' must be a number > 0 (got {delta!r})")
    delta = float(delta)

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        n = input.numel()
        done = _regression_compiled(huber_fused, [delta, _inv(n) if reduction == "mean" else 1.0], input, target,
                                    reduction, need_grad)
        if done is not None:
            return done
        d = input.to(cd) - target.to(cd)
        c = d.clamp(-delta, delta)
        n = d.numel()
        per_elem = d.sub_(c, alpha=0.5).mul_(c)  # c (d - c/2), in d's buffer
        loss = per_elem.to(input.dtype) if reduction == "none" else _reduce(per_elem.sum(), n, reduction).to(
            input.dtype)
        if not need_grad:
            return loss, None, None
        if reduction == "mean":
            c.mul_(_inv(n))
        return loss, _pair(c, input, target), lambda go: go

    return _run("huber_loss", compute, input, target)


def _regression_compiled(fn: Callable, scalars: list[float], input: Tensor, target: Tensor, reduction: str,
                         need_grad: bool):
    """MSE/Huber through their compiled core: ``compute``'s result, or None to compute eagerly."""
    if not _worth_compiling(input):
        return None
    cd = _compute_dtype(input.dtype)
    grad = _grad_buffer(need_grad, input, cd)
    ok, out = _compiled(fn, (need_grad, reduction != "none"), (input.detach(), target.detach(), grad), scalars, cd)
    if not ok:
        return None
    loss = (out if reduction == "none" else _reduce(out, input.numel(), reduction)).to(input.dtype)
    return loss, (_pair(grad, input, target) if need_grad else None), lambda go: go


def _pair(grad: Tensor, input: Tensor, target: Tensor) -> list[Tensor | None]:
    """d/dinput = grad, d/dtarget = -grad (each only where asked), in each one's dtype."""
    g_target = None
    if target.requires_grad:
        g_target = grad.neg().to(_kept(target.dtype))
    g_input = grad.to(_kept(input.dtype)) if input.requires_grad else None
    return [g_input, g_target]



@register("loss", torch="torch.nn.MSELoss", functional=mse_loss, tasks=("regression",))
class MSELoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.MSELoss`: ``MSELoss(reduction='mean')(input, target)``.

    Example::

        >>> loss = kernels.MSELoss()(pred, y); loss.backward()
    """

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _legacy_reduction("MSELoss", size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction)


@register("loss", torch="torch.nn.HuberLoss", functional=huber_loss, tasks=("regression",))
class HuberLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.HuberLoss`: ``HuberLoss(reduction='mean', delta=1.0)``.

    Example::

        >>> loss = kernels.HuberLoss(delta=0.5)(pred, y); loss.backward()
    """

    def __init__(self, reduction: str = "mean", delta: float = 1.0) -> None:
        super().__init__()
        _check_reduction("HuberLoss", reduction)
        if not delta > 0:
            raise ValueError(f"HuberLoss: 'delta' must be > 0 (got {delta!r})")
        self.reduction, self.delta = reduction, delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta)

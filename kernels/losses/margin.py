"""Margin losses: the binary hinge and the multi-class hinge (torch's multi-margin) — functions, the compiled
core and the ``nn.Module`` classes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._catalog import register
from .base import (
    _check_float,
    _check_reduction,
    _check_targets,
    _check_weight,
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
def hinge_fused(hp, grad_input: bool, grad_target: bool, reduce: bool, x, y, gx=None, gy=None):
    # hp: [margin, gradient scale (-1/n or -1)]
    xf, yf = x.to(hp.dtype), y.to(hp.dtype)
    z = hp[0] - yf * xf
    active = z > 0
    if grad_input:
        gx.copy_(torch.where(active, yf * hp[1], 0.0))
    if grad_target:
        gy.copy_(torch.where(active, xf * hp[1], 0.0))
    per = torch.clamp(z, min=0)
    return per.to(torch.float64).sum() if reduce else per
# pragma: no mutate end


def _check_margin(name: str, margin) -> None:
    """A number or a 0-dim tensor, as torch's multi_margin_loss takes (it refuses strings, None, 1-d tensors)."""
    if not (isinstance(margin, (int, float)) or (isinstance(margin, Tensor) and margin.dim() == 0)):
        raise TypeError(f"{name}: 'margin' must be a number (got {type(margin).__name__})")


def hinge_loss(input: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    r"""Binary SVM hinge, :math:`\max(0, m - y x)` with :math:`y \in \{-1, +1\}`. torch has no such loss.

    Where :math:`m - y x` is exactly 0 the gradient is 0 (only a positive violation counts), as in torch's
    multi-margin loss.

    Example::

        >>> loss = kernels.hinge_loss(scores, labels_pm1)
    """
    input, target = _entry("hinge_loss", input, target)
    _check_reduction("hinge_loss", reduction)
    _same_shape("hinge_loss", input, target)
    _check_margin("hinge_loss", margin)
    bad = (target != 1) & (target != -1)
    if bool(bad.any()):
        raise ValueError(f"hinge_loss: targets must be -1 or +1; found {target[bad].flatten()[0].item()!r}")
    margin = float(margin)

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        n = input.numel()
        if _worth_compiling(input):
            want_x, want_t = need_grad and input.requires_grad, need_grad and target.requires_grad
            gx, gy = _grad_buffer(want_x, input, cd), _grad_buffer(want_t, target, cd)
            ok, out = _compiled(hinge_fused, (want_x, want_t, reduction != "none"),
                                (input.detach(), target.detach(), gx, gy),
                                [margin, -_inv(n) if reduction == "mean" else -1.0], cd)
            if ok:
                loss = (out if reduction == "none" else _reduce(out, n, reduction)).to(input.dtype)
                grads = [None if gx is None else gx.to(_kept(input.dtype)),
                         None if gy is None else gy.to(_kept(target.dtype))]
                return loss, (grads if need_grad else None), lambda go: go
        x, y = input.to(cd), target.to(cd)
        z = torch.addcmul(torch.full_like(x, margin), y, x, value=-1.0)  # m - y x
        n = z.numel()
        active = z > 0
        z.clamp_(min=0)
        loss = z.to(input.dtype) if reduction == "none" else _reduce(z.sum(), n, reduction).to(input.dtype)
        if not need_grad:
            return loss, None, None
        scale = -_inv(n) if reduction == "mean" else -1.0
        mask = active.to(cd).mul_(scale)
        g_in = (y * mask).to(_kept(input.dtype)) if input.requires_grad else None
        g_t = (x * mask).to(_kept(target.dtype)) if target.requires_grad else None
        return loss, [g_in, g_t], lambda go: go

    return _run("hinge_loss", compute, input, target)


def multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0,
                      weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    r"""Multi-class hinge (p=1) or squared hinge (p=2), as :class:`torch.nn.MultiMarginLoss`:

    .. math:: \ell_i = \frac{1}{C}\sum_{j \ne y_i} w_{y_i} \max(0, m - x_{i,y_i} + x_{i,j})^p

    Example::

        >>> loss = kernels.multi_margin_loss(logits, classes, p=2)
    """
    input, weight = _entry("multi_margin_loss", input, weight)
    _check_reduction("multi_margin_loss", reduction)
    _check_float("multi_margin_loss", "input", input)
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"multi_margin_loss: 'p' must be 1 or 2 (got {p!r})")
    if input.dim() not in (1, 2) or (input.dim() == 2 and input.shape[1] == 0):
        raise ValueError(f"multi_margin_loss: input must be (C,) or (N, C) with C > 0 "
                         f"(got shape {tuple(input.shape)})")
    unbatched = input.dim() == 1
    x2 = input.unsqueeze(0) if unbatched else input
    n_rows, n_classes = x2.shape
    t = _check_targets("multi_margin_loss", target, (n_rows,) if not unbatched else (), n_classes, None)
    t2 = t.reshape(n_rows)
    w = _check_weight("multi_margin_loss", weight, n_classes)
    _check_margin("multi_margin_loss", margin)
    margin = float(margin)

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        x = x2.to(cd)
        tu = t2.unsqueeze(1)
        z = x - x.gather(1, tu)
        z.add_(margin)
        z.scatter_(1, tu, 0.0)
        # as torch: only z > 0 counts, so a NaN margin contributes nothing (+inf stays). In place, without a
        # mask: z is the only buffer of the input's size, and becomes the gradient (peak extra memory was
        # 1.49x torch's at (8192, 1000) with the two boolean masks; now z alone, as torch's gradient)
        z.clamp_(min=0).nan_to_num_(nan=0.0, posinf=math.inf)
        per_row = z.sum(1) if p == 1 else torch.linalg.vecdot(z, z, dim=1)
        row_w = (w.to(cd)[t2] if w is not None else torch.ones(n_rows, dtype=cd, device=x.device)) / n_classes
        per_row = per_row * row_w
        if reduction == "none":
            loss = per_row.reshape(target.shape).to(input.dtype)
        else:
            loss = _reduce(per_row.sum(), n_rows, reduction).to(input.dtype)
        if not need_grad:
            return loss, None, None
        grad = z.sign_() if p == 1 else z.mul_(2.0)
        scale = row_w / n_rows if reduction == "mean" else row_w
        grad.mul_(scale.unsqueeze(1))
        grad.scatter_(1, tu, -grad.sum(1, keepdim=True))
        grad = grad.reshape(input.shape).to(_kept(input.dtype))
        return loss, [grad, None], (lambda go: go if unbatched else go.reshape(n_rows, 1))

    return _run("multi_margin_loss", compute, input, target)



@register("loss", torch="torch.nn.MultiMarginLoss", functional=multi_margin_loss, tasks=("classification",))
class MultiMarginLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.MultiMarginLoss`: ``MultiMarginLoss(p=1, margin=1.0, weight=None)``.

    Example::

        >>> loss = kernels.MultiMarginLoss(p=2)(logits, classes); loss.backward()
    """

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Tensor | None = None, size_average=None,
                 reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"MultiMarginLoss: 'p' must be 1 or 2 (got {p!r})")
        self.p, self.margin = p, margin
        self.register_buffer("weight", weight)
        self.reduction = _legacy_reduction("MultiMarginLoss", size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return multi_margin_loss(input, target, p=self.p, margin=self.margin, weight=self.weight,
                                 reduction=self.reduction)


@register("loss", torch=None, functional=hinge_loss, tasks=("classification",),
          trial_note="HingeLoss: it needs one score per example and +-1 targets; trial it by hand")
class HingeLoss(torch.nn.Module):
    """Binary SVM hinge ``max(0, margin - y x)``, targets in {-1, +1}: ``HingeLoss(margin=1.0, reduction)``.

    Example::

        >>> loss = kernels.HingeLoss()(scores, labels_pm1); loss.backward()
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction("HingeLoss", reduction)
        self.margin, self.reduction = margin, reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return hinge_loss(input, target, margin=self.margin, reduction=self.reduction)

"""Cross-entropy: the function, its compiled core (shared with ``_linear_cross_entropy``) and the
``nn.Module`` class."""

from __future__ import annotations

import torch
from torch import Tensor

from .._catalog import register
from .base import (
    _check_float,
    _check_reduction,
    _check_smoothing,
    _check_targets,
    _check_weight,
    _compiled,
    _compute_dtype,
    _entry,
    _grad_buffer,
    _kept,
    _legacy_reduction,
    _run,
    _worth_compiling,
)


# The compiled core is the same math as the eager code above in one or two passes over memory (the eager
# one makes 4-7); sums accumulate in float64 so the result does not depend on how inductor splits the
# reduction. Signature convention (``_compile.run_fused``): ``fn(hp, *flags, *tensors)``.
# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def cross_entropy_rows_fused(hp, weighted: bool, smoothing: bool, need_grad: bool, x, t, w=None, grad=None):
    """(N, C) logits, class-index targets. Returns the per-row loss; writes the gradient (already scaled).

    hp: [ignore_index, label smoothing e, 1/denominator for the gradient]. Per row:
    loss = (1-e) w_t (lse - x_t) + (e/C) sum_c w_c (lse - x_c), 0 where ignored;
    grad = softmax * ((1-e) w_t + (e/C) W) - (1-e) w_t onehot - (e/C) w, times 1/denominator.
    """
    cd = hp.dtype
    xf = x.to(cd)
    n_classes = xf.shape[1]
    valid = t != hp[0].to(torch.int64)
    tt = torch.where(valid, t, 0)
    validf = valid.to(cd)
    m = xf.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    # exp(x - m) is written twice on purpose: shared, inductor would materialize it as an (N, C) buffer
    # between the row reduction and the gradient; recomputed, both stay in registers (no extra memory)
    s = torch.exp(xf - m).sum(1, keepdim=True)
    lse = (m + torch.log(s)).squeeze(1)
    x_t = xf.gather(1, tt.unsqueeze(1)).squeeze(1)
    if weighted:
        wf = w.to(cd)
        w_t = wf[tt] * validf
        w_sum = wf.sum()
    else:
        w_t = validf
        w_sum = torch.full((), n_classes, dtype=cd)
    eps = hp[1]
    loss = (1.0 - eps) * w_t * (lse - x_t)
    if smoothing:
        sum_wx = (xf * wf.unsqueeze(0)).sum(1) if weighted else xf.sum(1)
        loss = loss + (eps / n_classes) * (lse * w_sum - sum_wx) * validf
    if need_grad:
        inv = hp[2]
        a = ((1.0 - eps) * w_t + (eps / n_classes) * w_sum * validf) * inv
        g = torch.exp(xf - m) * (a.unsqueeze(1) / s)
        onehot = torch.arange(n_classes, device=xf.device).unsqueeze(0) == tt.unsqueeze(1)
        g = g - torch.where(onehot, ((1.0 - eps) * w_t * inv).unsqueeze(1), 0.0)
        if smoothing:
            wrow = wf.unsqueeze(0) if weighted else 1.0
            g = g - (eps / n_classes) * inv * validf.unsqueeze(1) * wrow
        grad.copy_(g)
    return loss
# pragma: no mutate end


def _ce_index_core(x: Tensor, t: Tensor, cdim: int, weight: Tensor | None, ignore_index: int,
                   smoothing: float, need_grad: bool, mean: bool = False):
    """Cross-entropy with class-index targets along ``cdim`` of float logits ``x`` (compute dtype).

    Returns (per-sample loss, per-sample weight w_t (0 where ignored), gradient or None); with ``mean`` the
    gradient is already divided by sum(w_t) (folded into the per-row factors: no extra pass over the logits).
    Per sample: (1-e) w_t (lse - x_t) + (e/C) sum_c w_c (lse - x_c); its gradient is
    p_c ((1-e) w_t + (e/C) W) - (1-e) w_t [c = t] - (e/C) w_c, with W = sum_c w_c.
    """
    n_classes = x.shape[cdim]
    valid = t != ignore_index
    if n_classes == 0:  # only ignored targets fit no class: torch's zeros (and a mean of 0/0)
        zeros = torch.zeros(t.shape, dtype=x.dtype, device=x.device)
        return zeros, zeros, (torch.zeros_like(x) if need_grad else None)
    t_safe = torch.where(valid, t, 0).unsqueeze(cdim)
    validf = valid.to(x.dtype)
    w_t = weight[t_safe.squeeze(cdim)] * validf if weight is not None else validf
    shape_b = [1] * x.dim()
    shape_b[cdim] = n_classes
    w_b = weight.view(shape_b) if weight is not None else None

    m = x.amax(cdim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row gives nan, not a crash
    e = torch.sub(x, m)
    x_t = x.gather(cdim, t_safe)
    e.exp_()
    s = e.sum(cdim, keepdim=True)
    lse = (m + s.log()).squeeze(cdim)
    loss = (lse - x_t.squeeze(cdim)) * w_t * (1.0 - smoothing)
    w_sum = weight.sum() if weight is not None else torch.tensor(float(n_classes), dtype=x.dtype, device=x.device)
    if smoothing > 0:
        sum_wx = torch.linalg.vecdot(x, w_b.expand_as(x), dim=cdim) if w_b is not None else x.sum(cdim)
        loss = loss + (lse * w_sum - sum_wx) * validf * (smoothing / n_classes)
    if not need_grad:
        return loss, w_t, None
    # all ignored: torch's gradient is zero, not 0/0
    inv = 1.0 / torch.where(w_t.sum() == 0, 1, w_t.sum()) if mean else 1.0
    a = ((1.0 - smoothing) * w_t + (smoothing / n_classes) * w_sum * validf) * inv
    e.mul_(a.unsqueeze(cdim) / s)  # softmax and its row factor in one pass
    if smoothing > 0:
        wb = w_b if w_b is not None else torch.ones(shape_b, dtype=x.dtype, device=x.device)
        e.addcmul_((validf * inv).unsqueeze(cdim), wb, value=-smoothing / n_classes)
    e.scatter_add_(cdim, t_safe, (-(1.0 - smoothing) * w_t * inv).unsqueeze(cdim))
    return loss, w_t, e


def _ce_prob_core(x: Tensor, y: Tensor, cdim: int, weight: Tensor | None, smoothing: float, need_grad: bool):
    """Cross-entropy with class-probability targets: per sample sum_c w_c y_c (lse - x_c)."""
    n_classes = x.shape[cdim]
    if n_classes == 0:  # a sum over no class: torch's zeros (and a mean of 0/0)
        return x.sum(cdim), (torch.zeros_like(x) if need_grad else None)
    if smoothing > 0:
        y = y * (1.0 - smoothing) + smoothing / n_classes
    if weight is not None:
        shape_b = [1] * x.dim()
        shape_b[cdim] = n_classes
        y = y * weight.view(shape_b)
    m = x.amax(cdim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.sub(x, m)
    e.exp_()
    s = e.sum(cdim, keepdim=True)
    lse = (m + s.log()).squeeze(cdim)
    swy = y.sum(cdim)
    loss = lse * swy - torch.linalg.vecdot(y, x, dim=cdim)
    if not need_grad:
        return loss, None
    e.div_(s).mul_(swy.unsqueeze(cdim)).sub_(y)
    return loss, e


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    r"""Cross-entropy of logits, as :func:`torch.nn.functional.cross_entropy` (same arguments and semantics).

    ``input``: (C), (N, C) or (N, C, d1, ..., dK) logits; ``target``: class indices (shape without C) or
    class probabilities (the input's shape). Computed in float32 for float16/bfloat16 inputs and stable for
    extreme logits. The gradient is computed in the forward pass (one pass over the logits).

    .. math:: \ell_i = (1-\varepsilon)\,w_{y_i}\,(\operatorname{lse}(x_i) - x_{i,y_i})
              + \frac{\varepsilon}{C}\sum_c w_c\,(\operatorname{lse}(x_i) - x_{i,c})

    ``mean`` divides by :math:`\sum_i w_{y_i}` over non-ignored samples (NaN when all are ignored, as in
    torch); with probability targets it divides by the number of samples.

    Example::

        >>> loss = kernels.cross_entropy(logits, classes, label_smoothing=0.1)
    """
    name = "cross_entropy"
    input, target, weight = _entry(name, input, target, weight)
    _check_reduction(name, reduction)
    _check_float(name, "input", input)
    smoothing = _check_smoothing(name, label_smoothing, allow_bool=True)
    if input.dim() == 0:
        raise ValueError(f"{name}: input must have a class dimension (got a 0-dim tensor)")
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    w = _check_weight(name, weight, n_classes)
    probs = isinstance(target, Tensor) and target.is_floating_point()
    if probs:
        if target.requires_grad:
            raise NotImplementedError(f"{name}: gradients with respect to probability targets are not "
                                      "supported; pass target.detach()")
        if target.shape != input.shape:
            raise ValueError(f"{name}: probability targets must have the input's shape {tuple(input.shape)} "
                             f"(got {tuple(target.shape)})")
        t = target
    else:
        sample_shape = tuple(s for i, s in enumerate(input.shape) if i != cdim)
        t = _check_targets(name, target, sample_shape, n_classes, ignore_index)
    n_samples = input.numel() // max(n_classes, 1) if n_classes else 0

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        wc = w.to(cd) if w is not None else None
        if probs:
            loss, grad = _ce_prob_core(input.detach().to(cd), t.detach().to(cd), cdim, wc, smoothing, need_grad)
            denom = n_samples
        else:
            fused = False
            if input.dim() == 2 and _worth_compiling(input):
                valid = t != ignore_index
                denom = (wc[torch.where(valid, t, 0)] * valid).sum() if wc is not None else valid.sum().to(cd)
                inv = 1.0 / float(denom) if reduction == "mean" and float(denom) != 0 else 1.0
                grad = _grad_buffer(need_grad, input, cd)
                fused, loss = _compiled(cross_entropy_rows_fused, (wc is not None, smoothing > 0, need_grad),
                                        (input.detach(), t, wc, grad), [float(ignore_index), smoothing, inv], cd)
            if not fused:
                loss, w_t, grad = _ce_index_core(input.detach().to(cd), t, cdim, wc, ignore_index, smoothing,
                                                 need_grad, mean=reduction == "mean")
                denom = w_t.sum()
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        out = out.to(input.dtype)
        if not need_grad:
            return out, None, None
        if reduction == "mean" and probs:
            grad.div_(max(denom, 1))
        grad = grad.to(_kept(input.dtype))
        return out, [grad, None, None], lambda go: go.unsqueeze(cdim)

    return _run(name, compute, input, target if probs else None, None)


@register("loss", torch="torch.nn.CrossEntropyLoss", functional=cross_entropy, tasks=("classification",))
class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` (weight, ignore_index, reduction, label_smoothing).

    Example::

        >>> loss = kernels.CrossEntropyLoss(label_smoothing=0.1)(logits, classes); loss.backward()
    """

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction("CrossEntropyLoss", size_average, reduce, reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)

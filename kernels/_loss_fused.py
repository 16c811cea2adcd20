"""Compiled one-pass loss cores: each reads its inputs once, writes the gradient and returns the loss.

The eager implementations in ``_losses.py`` are the reference (and serve small inputs, where a compile is
not worth its first-call cost, and machines where compiling is impossible). These are the same math as
single inductor kernels: the eager versions make 4-7 passes over memory, these one or two. Sums accumulate
in float64, so the result does not depend on how the kernel splits the reduction.

Signature convention (see ``_compile.run_fused``): ``fn(hp, *flags, *tensors)`` with every scalar in ``hp``.
"""

from __future__ import annotations

import torch


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

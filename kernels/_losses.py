"""One-pass losses: each forward computes the loss *and* its input gradient; backward only scales.

Every loss here is the same :class:`_OnePass` autograd Function around a pure ``compute`` closure that
returns the loss and the (unscaled) gradients. Saving only the gradient lets autograd hand that buffer to
``x.grad`` without a copy: peak extra memory is one input-sized buffer instead of torch's two or three.
The buffer is given away by the first backward, so a second backward through the same graph
(``retain_graph=True``) raises a clear error, and so does every double backward (``create_graph=True``):
the forward keeps no input to differentiate the gradient again. So do ``torch.func`` transforms.

Precision: float16/bfloat16 inputs are computed in float32. A float16 input's gradient is kept in float32
until backward has applied the upstream gradient (a GradScaler's scale) and only then rounded: rounded first,
small gradients would flush to zero before the scale could save them. Under ``torch.autocast`` the losses
run in float32 and return float32, as torch's autocast runs its losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._compile import compile_enabled_by_env, run_fused, transforms_active
from ._loss_fused import cross_entropy_rows_fused, hinge_fused, huber_fused, mse_fused

_REDUCTIONS = ("mean", "sum", "none")


class _OnePass(torch.autograd.Function):
    """forward(ctx, compute, *inputs): compute() -> (loss, grads, expand).

    ``grads`` holds one gradient (or None) per input, for a unit upstream gradient; ``expand(g)`` shapes a
    ``reduction='none'`` upstream gradient to broadcast over a gradient; ``recompute(go)`` (optional,
    instead of grads) produces the gradients from the upstream gradient when they could not be stored.
    """

    @staticmethod
    def forward(ctx, compute, name, *inputs):
        loss, grads, expand = compute()
        ctx.name = name
        ctx.grads = grads
        ctx.expand = expand
        ctx.dtypes = tuple(t.dtype if isinstance(t, Tensor) else None for t in inputs)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # autograd runs backward in grad mode exactly when create_graph=True
            raise RuntimeError(
                f"kernels.{ctx.name}: double backward (create_graph=True: gradient penalties, MAML, "
                "Hessian-vector products) is not supported: the loss computes its gradient in the forward "
                "pass and keeps no input to differentiate it again, so the result would silently lack the "
                f"loss's curvature. Use torch.nn.functional's loss where second derivatives are needed.")
        out = _OnePass._scaled(ctx, grad_output)
        return (None, None, *[g if g is None or g.dtype == d else g.to(d) for g, d in zip(out, ctx.dtypes)])

    @staticmethod
    def _scaled(ctx, grad_output):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(f"kernels.{ctx.name}: backward ran twice through the same graph "
                               "(retain_graph=True). The one-pass loss hands its gradient buffer to the first "
                               "backward; compute the loss again for a second backward.")
        ctx.grads = None
        if callable(grads):  # gradients recomputed from the upstream gradient (linear_cross_entropy)
            return grads(grad_output)
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            elif grad_output.dim() == 0:
                if grad_output.item() != 1.0:
                    g.mul_(grad_output.to(g.dtype))
                out.append(g)
            else:
                out.append(g.mul_(ctx.expand(grad_output).to(g.dtype)))
        return out


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS} (got {reduction!r})")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kept(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient is kept in until backward: float16's range is too small to hold an unscaled loss
    gradient (GradScaler scales it in backward), so float32; bfloat16 has float32's range and stays."""
    return torch.float32 if dtype == torch.float16 else dtype


_LOW = (torch.float16, torch.bfloat16)


def _entry(name: str, *tensors):
    """Checks every loss makes first; returns the tensors as the loss computes them: under torch.autocast,
    float16/bfloat16 floating tensors become float32, as autocast does for torch's losses (its fp32 list)."""
    if transforms_active():
        raise NotImplementedError(
            f"kernels.{name} does not support torch.func transforms (grad, vmap, jacrev, jvp, ...): it is a "
            "torch.autograd.Function whose forward computes the gradient, with no vmap or jvp rule. Use "
            "torch.nn.functional's loss inside torch.func, and kernels' outside it.")
    return tuple(t.float() if isinstance(t, Tensor) and t.dtype in _LOW and torch.is_autocast_enabled(t.device.type)
                 else t for t in tensors)


def _check_float(name: str, arg: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: '{arg}' must be a Tensor (got {type(t).__name__})")
    if not t.is_floating_point():
        raise TypeError(f"{name}: '{arg}' must be a floating-point tensor (got {t.dtype})")


def _same_shape(name: str, input: Tensor, target: Tensor) -> None:
    _check_float(name, "input", input)
    _check_float(name, "target", target)
    if input.shape != target.shape:
        raise ValueError(f"{name}: input shape {tuple(input.shape)} and target shape {tuple(target.shape)} "
                         "differ; broadcasting them is almost always a bug, so it is refused")


def _reduce(per_elem_sum: Tensor, n: int, reduction: str) -> Tensor:
    return per_elem_sum / n if reduction == "mean" else per_elem_sum


# Inputs smaller than this run eagerly: a first-call compile (seconds) is not worth it for them.
_COMPILE_MIN_NUMEL = 1 << 16


def _worth_compiling(t: Tensor) -> bool:
    return t.numel() >= _COMPILE_MIN_NUMEL and compile_enabled_by_env()


def _compiled(fn: Callable, flags: tuple, tensors: tuple, scalars: list[float], dtype: torch.dtype):
    """Run a compiled loss core (``_loss_fused``): (True, result), or (False, None) when compiling is
    impossible here and the caller computes eagerly. Callers first check :func:`_worth_compiling`."""
    hp = torch.tensor(scalars, dtype=dtype, device=tensors[0].device)
    return run_fused(fn, flags, tensors, hp, strict=False)


def _grad_buffer(need: bool, like: Tensor, dtype: torch.dtype) -> Tensor | None:
    return torch.empty(like.shape, dtype=dtype, device=like.device) if need else None


def _inv(n: int) -> float:
    # 1/n for a mean's gradient; an empty input has an empty gradient, so any finite value serves
    return 1.0 / n if n else 0.0


def _run(name: str, compute: Callable, *inputs: Tensor) -> Tensor:
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _OnePass.apply(compute, name, *inputs)
    with torch.no_grad():
        return compute(need_grad=False)[0]


# ---------------------------------------------------------------------------------------------------------
# regression: MSE and Huber
# ---------------------------------------------------------------------------------------------------------
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Mean squared error, :math:`\ell = \operatorname{reduce}((x - y)^2)`; as :func:`torch.nn.functional.mse_loss`.

    Gradients flow to ``target`` too when it requires grad. Unlike torch (which warns), differing input
    and target shapes raise ValueError.

    Example::

        >>> loss = kernels.mse_loss(pred, y)
    """
    input, target = _entry("mse_loss", input, target)
    _check_reduction(reduction)
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
    _check_reduction(reduction)
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


# ---------------------------------------------------------------------------------------------------------
# margins: binary hinge and multi-class hinge
# ---------------------------------------------------------------------------------------------------------
def hinge_loss(input: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    r"""Binary SVM hinge, :math:`\max(0, m - y x)` with :math:`y \in \{-1, +1\}`. torch has no such loss.

    Example::

        >>> loss = kernels.hinge_loss(scores, labels_pm1)
    """
    input, target = _entry("hinge_loss", input, target)
    _check_reduction(reduction)
    _same_shape("hinge_loss", input, target)
    if not isinstance(margin, (int, float)):
        raise TypeError(f"hinge_loss: 'margin' must be a number (got {type(margin).__name__})")
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
    _check_reduction(reduction)
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
    margin = float(margin)

    def compute(need_grad=True):
        cd = _compute_dtype(input.dtype)
        x = x2.to(cd)
        tu = t2.unsqueeze(1)
        z = x - x.gather(1, tu)
        z.add_(margin)
        z.scatter_(1, tu, 0.0)
        z.masked_fill_(~(z > 0), 0.0)  # as torch: only z > 0 counts, so a NaN margin contributes nothing
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


# ---------------------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------------------
def _check_targets(name: str, target: Tensor, shape: tuple, n_classes: int, ignore_index: int | None) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: 'target' must be a Tensor (got {type(target).__name__})")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name}: class-index targets must be an integer tensor (got {target.dtype})")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"{name}: expected target of shape {tuple(shape)} (got {tuple(target.shape)})")
    t = target.long()
    valid = t if ignore_index is None else t[t != ignore_index]
    if valid.numel():
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name}: target {bad} is out of bounds for {n_classes} classes")
    return t


def _check_weight(name: str, weight: Tensor | None, n_classes: int) -> Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name}: 'weight' must be a floating-point Tensor (got {type(weight).__name__})")
    if weight.dim() != 1 or weight.numel() != n_classes:
        raise ValueError(f"{name}: 'weight' must have one entry per class, {n_classes} "
                         f"(got shape {tuple(weight.shape)})")
    return weight.detach()


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
    _check_reduction(reduction)
    _check_float(name, "input", input)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: 'label_smoothing' must be in [0, 1] (got {label_smoothing!r})")
    if input.dim() == 0:
        raise ValueError(f"{name}: input must have a class dimension (got a 0-dim tensor)")
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    w = _check_weight(name, weight, n_classes)
    smoothing = float(label_smoothing)
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


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_size: int | None = None) -> Tensor:
    r"""``cross_entropy(hidden @ weight.T + bias, target)`` without ever materializing the (N, V) logits.

    Rows are processed in chunks of ``chunk_size`` (default: about 8M logits per chunk); each chunk's
    logits give its loss and, in the same pass, the gradients for ``hidden``, ``weight`` and ``bias``.
    ``hidden``: (N, D) or (..., D); ``weight``: (V, D); ``target``: class indices of shape hidden.shape[:-1].

    Example::

        >>> loss = kernels.linear_cross_entropy(h, lm_head.weight, tokens, chunk_size=1024)
    """
    name = "linear_cross_entropy"
    _entry(name)  # autocast: the matmul runs as autocast has it; the loss is returned in float32
    _check_reduction(reduction)
    _check_float(name, "hidden", hidden)
    _check_float(name, "weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden (..., D) and weight (V, D) with the same D "
                         f"(got {tuple(hidden.shape)} and {tuple(weight.shape)})")
    if bias is not None:
        _check_float(name, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},) (got {tuple(bias.shape)})")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: 'label_smoothing' must be in [0, 1] (got {label_smoothing!r})")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name}: 'chunk_size' must be a positive int (got {chunk_size!r})")
    n_vocab, dim = weight.shape
    h2 = hidden.reshape(-1, dim)
    t = _check_targets(name, target, tuple(hidden.shape[:-1]), n_vocab, ignore_index).reshape(-1)
    rows = h2.shape[0]
    chunk = chunk_size or max(1, (1 << 23) // max(n_vocab, 1))
    smoothing = float(label_smoothing)

    def passes(row_scale: Tensor | None, need_grad: bool):
        """One sweep over row chunks. row_scale: per-row multiplier of the gradient (None = 1)."""
        cd = _compute_dtype(hidden.dtype)
        h, wt = h2.detach(), weight.detach()
        b = bias.detach() if bias is not None else None
        losses, wts = [], []
        gh = torch.empty_like(h) if need_grad and hidden.requires_grad else None
        gw = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_grad and weight.requires_grad \
            else None
        gb = torch.zeros(n_vocab, dtype=cd, device=weight.device) if need_grad and bias is not None and \
            bias.requires_grad else None
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            logits = h[lo:hi] @ wt.T if b is None else torch.addmm(b, h[lo:hi], wt.T)
            loss, w_t, g = _ce_index_core(logits.to(cd), t[lo:hi], 1, None, ignore_index, smoothing, need_grad)
            losses.append(loss)
            wts.append(w_t)
            if not need_grad:
                continue
            if row_scale is not None:
                g.mul_(row_scale[lo:hi].unsqueeze(1))
            gl = g.to(hidden.dtype)
            if gh is not None:
                torch.mm(gl, wt, out=gh[lo:hi])
            if gw is not None:
                gw.addmm_(g.T, h[lo:hi].to(cd))
            if gb is not None:
                gb.add_(g.sum(0))
        cat = torch.cat(losses) if losses else torch.zeros(0, dtype=cd, device=h.device)
        wsum = torch.cat(wts).sum() if wts else torch.zeros((), dtype=cd, device=h.device)
        grads = [None if gh is None else gh.reshape(hidden.shape), None if gw is None else gw.to(weight.dtype),
                 None, None if gb is None else gb.to(bias.dtype)]
        return cat, wsum, grads

    # under autocast the loss is float32, as torch's cross_entropy returns it there
    out_dtype = torch.float32 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype

    def compute(need_grad=True):
        cd = _compute_dtype(hidden.dtype)
        # the mean's denominator (non-ignored rows) is known before any logits are computed
        denom = float((t != ignore_index).sum()) if reduction == "mean" else 1.0
        inv = 1.0 / denom if denom else 0.0
        # float16: the gradients are computed in backward, scaled by the upstream gradient (a GradScaler's
        # scale) before they are rounded to float16, where unscaled they would flush to zero
        lazy = reduction == "none" or hidden.dtype == torch.float16
        if lazy or not need_grad:
            loss, wsum, _ = passes(None, False)
            out = loss.reshape(target.shape) if reduction == "none" else loss.sum() / wsum if reduction == "mean" \
                else loss.sum()
            out = out.to(out_dtype)
            if not need_grad:
                return out, None, None

            def recompute(go):
                scale = go.reshape(-1).to(cd) if reduction == "none" else (go.to(cd) * inv).expand(rows)
                return passes(scale, True)[2]
            return out, recompute, None
        scale = None if inv == 1.0 else torch.full((rows,), inv, dtype=cd, device=h2.device)
        loss, wsum, grads = passes(scale, need_grad)
        out = (loss.sum() / wsum if reduction == "mean" else loss.sum()).to(out_dtype)
        return out, grads, None

    return _run(name, compute, hidden, weight, target, bias)


# ---------------------------------------------------------------------------------------------------------
# nn.Module wrappers: torch.nn's constructor arguments
# ---------------------------------------------------------------------------------------------------------
class MSELoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.MSELoss`: ``MSELoss(reduction='mean')(input, target)``."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction)


class HuberLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.HuberLoss`: ``HuberLoss(reduction='mean', delta=1.0)``."""

    def __init__(self, reduction: str = "mean", delta: float = 1.0) -> None:
        super().__init__()
        _check_reduction(reduction)
        if not delta > 0:
            raise ValueError(f"HuberLoss: 'delta' must be > 0 (got {delta!r})")
        self.reduction, self.delta = reduction, delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` (weight, ignore_index, reduction, label_smoothing)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)


class MultiMarginLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.MultiMarginLoss`: ``MultiMarginLoss(p=1, margin=1.0, weight=None)``."""

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Tensor | None = None, size_average=None,
                 reduce=None, reduction: str = "mean") -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"MultiMarginLoss: 'p' must be 1 or 2 (got {p!r})")
        self.p, self.margin = p, margin
        self.register_buffer("weight", weight)
        self.reduction = _legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return multi_margin_loss(input, target, p=self.p, margin=self.margin, weight=self.weight,
                                 reduction=self.reduction)


class HingeLoss(torch.nn.Module):
    """Binary SVM hinge ``max(0, margin - y x)``, targets in {-1, +1}: ``HingeLoss(margin=1.0, reduction)``."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.margin, self.reduction = margin, reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return hinge_loss(input, target, margin=self.margin, reduction=self.reduction)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Holds :func:`linear_cross_entropy`'s options; called as ``loss_fn(hidden, weight, target, bias=None)``."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    chunk_size=self.chunk_size)


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    # torch.nn's deprecated size_average/reduce arguments, mapped as torch maps them
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
    _check_reduction(reduction)
    return reduction

"""What every one-pass loss shares (the families are ``_regression``, ``_margin``, ``_cross_entropy``).

One-pass losses: each forward computes the loss *and* its input gradient; backward only scales.

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

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._runtime.compile import compile_enabled_by_env, run_fused, transforms_active, user_stacklevel
from .._runtime.layout import device_scalars

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
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # autograd runs backward in grad mode exactly when create_graph=True
            raise RuntimeError(
                f"kernels.{ctx.name}: double backward (create_graph=True: gradient penalties, MAML, "
                "Hessian-vector products) is not supported: the loss computes its gradient in the forward "
                "pass and keeps no input to differentiate it again, so the result would silently lack the "
                f"loss's curvature. Use torch.nn.functional's loss where second derivatives are needed.")
        # a gradient kept in float32 (a float16 input's) is rounded to its input's dtype by autograd itself (its
        # engine casts every gradient to its input's dtype), after the upstream scale above
        return (None, None, *_OnePass._scaled(ctx, grad_output))

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
                    g.mul_(grad_output)  # the loss's dtype: g's, or float16 where g is kept in float32
                out.append(g)
            else:
                out.append(g.mul_(ctx.expand(grad_output)))
        return out


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: 'reduction' must be one of {_REDUCTIONS} (got {reduction!r})")


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


def _check_smoothing(name: str, label_smoothing, allow_bool: bool) -> float:
    """``label_smoothing`` as a float in [0, 1], or a ValueError naming ``name``. torch's ``cross_entropy``
    takes a bool (True is 1.0), so ours must too (``allow_bool``); options of our own refuse it."""
    if (isinstance(label_smoothing, bool) and not allow_bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: 'label_smoothing' must be in [0, 1] (got {label_smoothing!r})")
    return float(label_smoothing)


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
    """Run a compiled loss core (a family module's ``*_fused``): (True, result), or (False, None) when compiling is
    impossible here and the caller computes eagerly. Callers first check :func:`_worth_compiling`."""
    device = tensors[0].device
    hp = torch.tensor(scalars, dtype=dtype) if device.type == "cpu" else device_scalars(scalars, device, dtype)
    return run_fused(fn, flags, tensors, hp, strict=False, min_numel=0)  # _worth_compiling decided the size


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
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{name}: 'weight' must be a floating-point Tensor (got {got})")
    if weight.dim() != 1 or weight.numel() != n_classes:
        raise ValueError(f"{name}: 'weight' must have one entry per class, {n_classes} "
                         f"(got shape {tuple(weight.shape)})")
    return weight.detach()


def _legacy_reduction(name: str, size_average, reduce, reduction: str) -> str:
    # torch.nn's deprecated size_average/reduce arguments, mapped as torch maps them
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
        # torch's words, pointing at the line that built the module
        warnings.warn(f"size_average and reduce args will be deprecated, please use reduction='{reduction}' "
                      "instead.", UserWarning, stacklevel=user_stacklevel())
    _check_reduction(name, reduction)
    return reduction

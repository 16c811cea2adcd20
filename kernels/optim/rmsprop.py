"""RMSprop (plain, centered, with momentum): torch.optim.RMSprop's signature, validation and state."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, as_real, fused_prologue
from .._runtime.validate import check_lr, check_selectors
from ..precision.accelerators import register_accelerator
from ..precision.bf16 import BF16State, precision_options, rmsprop_bf16_native
from ..precision.codecs import bf16_state, kahan


class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float


def _rmsprop_eager(s: RMSpropScalars, maximize: bool, decay: bool, use_momentum: bool, centered: bool, p, g,
                   square_avg, *rest):
    # torch.optim.RMSprop's for-loop path, op for op. rest: momentum_buffer (if momentum), grad_avg (if centered)
    buf = rest[0] if use_momentum else None
    grad_avg = rest[-1] if centered else None
    if maximize:
        g = -g
    if decay:
        g = g.add(p, alpha=s.weight_decay)
    if p.is_complex():
        p, g, square_avg = as_real(p, g, square_avg)
        buf = None if buf is None else as_real(buf)[0]
        grad_avg = None if grad_avg is None else as_real(grad_avg)[0]
    square_avg.mul_(s.alpha).addcmul_(g, g, value=s.one_minus_alpha)
    if centered:
        grad_avg.lerp_(g, s.one_minus_alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(s.eps)
    if use_momentum:
        buf.mul_(s.momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-s.lr)
    else:
        p.addcdiv_(g, avg, value=-s.lr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _rmsprop_fused(hp, maximize: bool, decay: bool, use_momentum: bool, centered: bool, p, g, square_avg,
                   *rest):
    # r(): round where torch's op-by-op path rounds
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = RMSpropScalars(*hp.unbind())
    if decay:
        gf = r(gf + s.weight_decay * pf)
    sq = r(r(square_avg.to(hp.dtype) * s.alpha) + s.one_minus_alpha * gf * gf)
    square_avg.copy_(sq)
    if centered:
        grad_avg = rest[-1]
        ga = r(torch.lerp(grad_avg.to(hp.dtype), gf, s.one_minus_alpha))
        grad_avg.copy_(ga)
        avg = r(r(r(sq - ga * ga).sqrt()) + s.eps)
    else:
        avg = r(r(sq.sqrt()) + s.eps)
    if use_momentum:
        buf = rest[0]
        b = r(r(buf.to(hp.dtype) * s.momentum) + gf / avg)
        buf.copy_(b)
        p.copy_(pf - s.lr * b)
    else:
        p.copy_(pf - s.lr * gf / avg)


# pragma: no mutate end


@register("optimizer", torch="torch.optim.RMSprop",
          configs={"RMSprop": (dict(lr=1e-3), 20), "RMSprop-momentum": (dict(lr=1e-3, momentum=0.9), 28),
                   "RMSprop-centered-momentum": (dict(lr=1e-3, centered=True, momentum=0.9), 36)})
class RMSprop(BF16State, FusedOptimizer):
    r"""RMSprop (Hinton, 2012; centered: Graves, 2013); a drop-in for :class:`torch.optim.RMSprop`.

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \text{ (centered)},\quad
        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \\
        b_t = \mu b_{t-1} + g_t / d_t,\quad \theta_t = \theta_{t-1} - \gamma b_t
        \quad(\text{without momentum: } \theta_t = \theta_{t-1} - \gamma g_t / d_t)

    Args: as torch.optim.RMSprop — ``params``, ``lr=1e-2``, ``alpha=0.99``, ``eps=1e-8``,
    ``weight_decay=0``, ``momentum=0``, ``centered=False``, ``maximize=False``. torch has no fused RMSprop;
    ``fused`` here selects our compiled update (see :class:`kernels.Adam`). ``foreach`` is accepted and
    ignored; ``capturable=True`` and ``differentiable=True`` are refused. ``state_dtype=torch.bfloat16``
    (ours) keeps a float32 parameter's averages in bfloat16 with stochastic rounding; ``kahan_sum=True``
    (ours) compensates the rounding of bfloat16/float16 parameters (see :class:`kernels.Adam` for both).

    Example::

        >>> opt = kernels.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True)

    References: G. Hinton, "Neural Networks for Machine Learning", lecture 6e (2012); A. Graves, "Generating
    Sequences With Recurrent Neural Networks", arXiv:1308.0850 (2013) (centered).
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, fused: bool | None = None,
                 state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None, kahan_sum: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        check_selectors(type(self).__name__, capturable=capturable, differentiable=differentiable)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=False, foreach=foreach, maximize=maximize,
                        differentiable=False)
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum))
        super().__init__(params, defaults, fused)

    Scalars = RMSpropScalars
    _legacy_group_defaults = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
                                  capturable=False)
    # an 8-bit optimizer's checkpoint (kernels.RMSprop8bit) loads here dequantized
    _code_dtypes = {"square_avg": torch.uint8, "momentum_buffer": torch.int8}
    _eager_update = staticmethod(_rmsprop_eager)
    _fused_update = staticmethod(_rmsprop_fused)
    _bf16_update = staticmethod(bf16_state(_rmsprop_fused))
    _kahan_update = staticmethod(kahan(_rmsprop_fused))

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        init = {"square_avg": 0.0}
        if group["momentum"] > 0:
            init["momentum_buffer"] = 0.0
        if group["centered"]:
            init["grad_avg"] = 0.0
        return init

    def _flags(self, group: dict[str, Any]) -> tuple:
        return (bool(group["maximize"]), float(group["weight_decay"]) != 0, float(group["momentum"]) > 0,
                bool(group["centered"]))

    def _scalars(self, group: dict[str, Any], step: int) -> RMSpropScalars:
        alpha = float(group["alpha"])
        return RMSpropScalars(float(group["lr"]), alpha, 1 - alpha, float(group["eps"]),
                              float(group["weight_decay"]), float(group["momentum"]))


register_accelerator(_rmsprop_fused, "bf16", rmsprop_bf16_native)

"""RMSprop (plain, centered, with momentum): torch.optim.RMSprop's signature, validation and state."""

from __future__ import annotations

from typing import Any

import torch

from ._optimizer import FusedOptimizer, as_real, fused_prologue
from ._validate import check_lr, check_selectors


def _rmsprop_eager(p, g, square_avg, *rest, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    # torch.optim.RMSprop's for-loop path, op for op. rest: momentum_buffer (if momentum), grad_avg (if centered)
    buf = rest[0] if momentum > 0 else None
    grad_avg = rest[-1] if centered else None
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if p.is_complex():
        p, g, square_avg = as_real(p, g, square_avg)
        buf = None if buf is None else as_real(buf)[0]
        grad_avg = None if grad_avg is None else as_real(grad_avg)[0]
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if centered:
        grad_avg.lerp_(g, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if momentum > 0:
        buf.mul_(momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, avg, value=-lr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _rmsprop_fused(hp, maximize: bool, decay: bool, use_momentum: bool, centered: bool, p, g, square_avg,
                   *rest):
    # hp: lr, alpha, 1-alpha, eps, weight_decay, momentum. r(): round where torch's op-by-op path rounds.
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    if decay:
        gf = r(gf + hp[4] * pf)
    sq = r(r(square_avg.to(hp.dtype) * hp[1]) + hp[2] * gf * gf)
    square_avg.copy_(sq)
    if centered:
        grad_avg = rest[-1]
        ga = r(torch.lerp(grad_avg.to(hp.dtype), gf, hp[2]))
        grad_avg.copy_(ga)
        avg = r(r(r(sq - ga * ga).sqrt()) + hp[3])
    else:
        avg = r(r(sq.sqrt()) + hp[3])
    if use_momentum:
        buf = rest[0]
        b = r(r(buf.to(hp.dtype) * hp[5]) + gf / avg)
        buf.copy_(b)
        p.copy_(pf - hp[0] * b)
    else:
        p.copy_(pf - hp[0] * gf / avg)
# pragma: no mutate end


class RMSprop(FusedOptimizer):
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
    ignored; ``capturable=True`` and ``differentiable=True`` are refused.

    Example::

        >>> opt = kernels.RMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True)
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, fused: bool | None = None) -> None:
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
        super().__init__(params, defaults, fused)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _update(self, group: dict[str, Any], run: dict[str, torch.Tensor], step: int) -> None:
        lr, alpha, eps = float(group["lr"]), float(group["alpha"]), float(group["eps"])
        wd, momentum = float(group["weight_decay"]), float(group["momentum"])
        centered, maximize = bool(group["centered"]), bool(group["maximize"])
        self._apply(_rmsprop_eager, _rmsprop_fused, run, [lr, alpha, 1 - alpha, eps, wd, momentum],
                    (maximize, wd != 0, momentum > 0, centered),
                    dict(lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum, centered=centered,
                         maximize=maximize))

"""SGD with momentum / Nesterov: torch.optim.SGD's signature, validation and state; our fused update."""

from __future__ import annotations

from typing import Any

import torch

from ._optimizer import FusedOptimizer, fused_prologue
from ._validate import check_lr, check_selectors


def _sgd_eager(p, g, buf=None, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    # torch.optim.SGD's for-loop path, op for op
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        if first:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _sgd_fused(hp, maximize: bool, decay: bool, use_momentum: bool, nesterov: bool, p, g, buf=None):
    # hp: lr, weight_decay, momentum (0 on a buffer's first step, which then equals the gradient),
    #     1-dampening (1 on the first step), momentum (for Nesterov). r(): round where torch rounds.
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    if decay:
        gf = r(gf + hp[1] * pf)
    if use_momentum:
        b = r(r(buf.to(hp.dtype) * hp[2]) + gf * hp[3])
        buf.copy_(b)
        gf = r(gf + hp[4] * b) if nesterov else b
    p.copy_(pf - hp[0] * gf)
# pragma: no mutate end


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with optional (Nesterov) momentum; a drop-in for :class:`torch.optim.SGD`.

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        b_t = \mu b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args: as torch.optim.SGD — ``params``, ``lr=1e-3``, ``momentum=0``, ``dampening=0``,
    ``weight_decay=0``, ``nesterov=False``, keyword-only ``maximize=False``. ``fused``: see
    :class:`kernels.Adam`. ``foreach`` is accepted and ignored; ``differentiable=True`` is refused.

    Example::

        >>> opt = kernels.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    _step_in_state = False

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_selectors(type(self).__name__, differentiable=differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=None)
        super().__init__(params, defaults, fused)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, group: dict[str, Any], run: dict[str, torch.Tensor], step: int) -> None:
        lr, momentum = float(group["lr"]), float(group["momentum"])
        dampening, wd = float(group["dampening"]), float(group["weight_decay"])
        nesterov, maximize = bool(group["nesterov"]), bool(group["maximize"])
        first = step == 1
        self._apply(_sgd_eager, _sgd_fused, run,
                    [lr, wd, 0.0 if first else momentum, 1.0 if first else 1 - dampening, momentum],
                    (maximize, wd != 0, momentum != 0, nesterov),
                    dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                         maximize=maximize, first=first))

"""SGD with momentum / Nesterov: torch.optim.SGD's signature, validation and state; our fused update."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, fused_prologue
from .._runtime.validate import check_lr, check_selectors
from ..precision.accelerators import register_accelerator
from ..precision.bf16 import BF16State, precision_options, sgd_bf16_native
from ..precision.codecs import bf16_state, kahan


class SGDScalars(NamedTuple):
    lr: float
    weight_decay: float
    momentum_now: float     # momentum, 0 on a buffer's first step (the buffer then equals the gradient)
    keep: float             # 1 - dampening, 1 on the first step
    momentum: float         # for Nesterov
    first: float            # 1.0 on a buffer's first step


def _sgd_eager(s: SGDScalars, maximize: bool, decay: bool, use_momentum: bool, nesterov: bool, p, g, buf=None):
    # torch.optim.SGD's for-loop path, op for op
    if maximize:
        g = -g
    if decay:
        g = g.add(p, alpha=s.weight_decay)
    if use_momentum:
        if s.first:
            buf.copy_(g)
        else:
            buf.mul_(s.momentum).add_(g, alpha=s.keep)
        g = g.add(buf, alpha=s.momentum) if nesterov else buf
    p.add_(g, alpha=-s.lr)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _sgd_fused(hp, maximize: bool, decay: bool, use_momentum: bool, nesterov: bool, p, g, buf=None):
    # r(): round where torch rounds
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = SGDScalars(*hp.unbind())
    if decay:
        gf = r(gf + s.weight_decay * pf)
    if use_momentum:
        b = r(r(buf.to(hp.dtype) * s.momentum_now) + gf * s.keep)
        buf.copy_(b)
        gf = r(gf + s.momentum * b) if nesterov else b
    p.copy_(pf - s.lr * gf)


# pragma: no mutate end


@register("optimizer", torch="torch.optim.SGD",
          configs={"SGD-momentum": (dict(lr=0.01, momentum=0.9), 20),
                   "SGD-nesterov": (dict(lr=0.01, momentum=0.9, nesterov=True), 20)})
class SGD(BF16State, FusedOptimizer):
    r"""Stochastic gradient descent with optional (Nesterov) momentum; a drop-in for :class:`torch.optim.SGD`.

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1},\quad
        b_t = \mu b_{t-1} + (1-\tau) g_t \;(b_1 = g_1),\quad
        \theta_t = \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Args: as torch.optim.SGD — ``params``, ``lr=1e-3``, ``momentum=0``, ``dampening=0``,
    ``weight_decay=0``, ``nesterov=False``, keyword-only ``maximize=False``. ``fused``: see
    :class:`kernels.Adam`. ``foreach`` is accepted and ignored; ``differentiable=True`` is refused.
    ``state_dtype=torch.bfloat16`` (ours) keeps a float32 parameter's momentum buffer in bfloat16, stored
    with stochastic rounding; ``kahan_sum=True`` (ours) compensates the rounding of bfloat16/float16
    parameters (see :class:`kernels.Adam` for both).

    Example::

        >>> opt = kernels.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    References: B. T. Polyak, "Some methods of speeding up the convergence of iteration methods", 1964
    (momentum); I. Sutskever, J. Martens, G. Dahl, G. Hinton, "On the importance of initialization and
    momentum in deep learning", ICML 2013 (Nesterov momentum as torch implements it).
    """

    _step_in_state = False
    # an 8-bit optimizer's checkpoint (kernels.SGD8bit) loads here dequantized
    _code_dtypes = {"momentum_buffer": torch.int8}

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
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
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum))
        super().__init__(params, defaults, fused)

    Scalars = SGDScalars
    _legacy_group_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None)
    _bf16_update = staticmethod(bf16_state(_sgd_fused))
    _kahan_update = staticmethod(kahan(_sgd_fused))
    _eager_update = staticmethod(_sgd_eager)
    _fused_update = staticmethod(_sgd_fused)

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"momentum_buffer": 0.0} if group["momentum"] != 0 else {}

    def _flags(self, group: dict[str, Any]) -> tuple:
        return (bool(group["maximize"]), float(group["weight_decay"]) != 0, float(group["momentum"]) != 0,
                bool(group["nesterov"]))

    def _scalars(self, group: dict[str, Any], step: int) -> SGDScalars:
        momentum, first = float(group["momentum"]), step == 1
        return SGDScalars(float(group["lr"]), float(group["weight_decay"]), 0.0 if first else momentum,
                          1.0 if first else 1 - float(group["dampening"]), momentum, float(first))


register_accelerator(_sgd_fused, "bf16", sgd_bf16_native)

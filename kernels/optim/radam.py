"""RAdam (Liu et al. 2020): torch.optim's signature, defaults, validation and state layout; our fused update,
and the state variants of the precision codecs declared once here (what it shares with NAdam: ``nadam.py``)."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import as_real, fused_prologue
from ..precision.bf16 import eight_bit_form
from ..precision.blockwise import Blockwise8bit
from ..precision.codecs import bf16_state, blockwise_8bit, kahan
from .adam import apply_weight_decay, fused_moments
from .nadam import _DOC_8BIT, AdamFamily


class RAdamScalars(NamedTuple):
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    decay_factor: float
    bias_correction1: float  # 1 - beta1^t
    lr: float
    bc2_sqrt: float          # sqrt(1 - beta2^t)
    eps: float
    rect: float              # the variance rectification term (used where rectified = 1)
    rectified: float         # 1.0 where rho_t > 5 (the adaptive step), 0.0 before (plain momentum SGD)



def _radam_eager(s: RAdamScalars, maximize: bool, wd_mode: int, p, g, m, v):
    # torch.optim.RAdam's for-loop path, op for op (bit for bit with it)
    if maximize:
        g = -g
    if p.is_complex():  # torch views complex tensors as real before anything else
        p, g, m, v = as_real(p, g, m, v)
    g = apply_weight_decay(s, wd_mode, p, g)
    m.lerp_(g, s.one_minus_beta1)
    v.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    corrected = m / s.bias_correction1
    if s.rectified:
        adaptive = v.sqrt().add_(s.eps).reciprocal() * s.bc2_sqrt  # torch's `float / tensor`
        p.add_(corrected * s.lr * adaptive * s.rect, alpha=-1.0)
    else:
        p.add_(corrected * s.lr, alpha=-1.0)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _radam_fused(hp, maximize: bool, wd_mode: int, p, g, m, v):
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = RAdamScalars(*hp.unbind())
    pf, gf, mf, vf = fused_moments(hp, s, wd_mode, r, pf, gf, m, v)
    plain = r(r(mf / s.bias_correction1) * s.lr)
    adaptive = r(r(1.0 / r(r(vf.sqrt()) + s.eps)) * s.bc2_sqrt)
    step = torch.where(s.rectified > 0.5, r(r(plain * adaptive) * s.rect), plain)
    p.copy_(pf - step)
    m.copy_(mf)
    v.copy_(vf)
# pragma: no mutate end


@register("optimizer", torch="torch.optim.RAdam", default_candidate=False,
          configs={"RAdam": (dict(lr=1e-3), 28)})
class RAdam(AdamFamily):
    r"""RAdam, Adam with its variance rectified (Liu et al. 2020): a drop-in for :class:`torch.optim.RAdam` with a
    fused update. No warmup is needed: while the second moment's estimate is too young (ρ_t ≤ 5) the step is
    momentum SGD, then Adam's scaled by the rectification term.

    .. math::
        \rho_\infty = \tfrac{2}{1-\beta_2} - 1,\quad \rho_t = \rho_\infty - \tfrac{2t\beta_2^t}{1-\beta_2^t},\quad
        \hat m_t = \tfrac{m_t}{1-\beta_1^t} \\
        \theta_t = \theta_{t-1} - \gamma \hat m_t \cdot
        \begin{cases} r_t \sqrt{1-\beta_2^t}/(\sqrt{v_t}+\epsilon) & \rho_t > 5 \\ 1 & \text{else}\end{cases},
        \quad r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    Args: as torch.optim.RAdam — ``params``, ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``weight_decay=0``, ``decoupled_weight_decay=False``, keyword-only ``foreach`` (ignored), ``maximize``;
    ``capturable``/``differentiable`` refused. Ours: ``fused``, ``state``, ``state_dtype``, ``kahan_sum`` as
    :class:`kernels.Adam` (``state="8bit"``: :class:`RAdam8bit`).

    Example::

        >>> opt = kernels.RAdam(model.parameters(), lr=1e-3)

    References: L. Liu, H. Jiang, P. He, W. Chen, X. Liu, J. Gao, J. Han, "On the Variance of the Adaptive
    Learning Rate and Beyond", ICLR 2020.
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 state: Literal["param", "bf16", "8bit"] = "param", state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        self._setup(params, lr, betas, eps, weight_decay, {}, decoupled_weight_decay, foreach, maximize,
                    capturable, differentiable, fused, state, state_dtype, kahan_sum)

    Scalars = RAdamScalars
    _group_order = ("lr", "betas", "eps", "weight_decay", "maximize", "foreach", "capturable",
                    "decoupled_weight_decay", "differentiable")
    _eager_update = staticmethod(_radam_eager)
    _fused_update = staticmethod(_radam_fused)
    _bf16_update = staticmethod(bf16_state(_radam_fused))
    _kahan_update = staticmethod(kahan(_radam_fused))

    def _scalars(self, group: dict[str, Any], step: int) -> RAdamScalars:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        bc2 = 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
        rectified = rho_t > 5.0
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) \
            if rectified else 1.0
        return RAdamScalars(1 - beta1, beta2, 1 - beta2, wd, 1 - lr * wd, 1 - beta1 ** step, lr, bc2 ** 0.5,
                            float(group["eps"]), rect, float(rectified))


@register("optimizer", torch="torch.optim.RAdam", default_candidate=False,
          configs={"RAdam8bit": (dict(lr=1e-3), 14)})
class RAdam8bit(Blockwise8bit, RAdam):
    __doc__ = _DOC_8BIT.format("RAdam")
    _q8_update = staticmethod(blockwise_8bit(_radam_fused))

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, block_size: int = 256,
                 min_8bit_size: int = 4096, state: Literal["8bit"] = "8bit") -> None:
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused)


eight_bit_form(RAdam, RAdam8bit)

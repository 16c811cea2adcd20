"""NAdam (Dozat 2016): torch.optim's signature, defaults, validation and state layout (``mu_product``
included); our fused update, and the state variants of the precision codecs (bfloat16 state, Kahan-compensated
low-precision weights, block-wise 8-bit state) declared once here. What NAdam shares with RAdam (``radam.py``):
the argument checks, the moments, the weight decay."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, as_real, fused_prologue
from .._runtime.validate import check_adam_arguments, check_selectors
from ..precision.bf16 import BF16State, eight_bit_form, precision_options
from ..precision.blockwise import Blockwise8bit
from ..precision.codecs import bf16_state, blockwise_8bit, kahan
from .adam import _WD_DECOUPLED, _WD_L2, _WD_NONE, apply_weight_decay, fused_moments


class NAdamScalars(NamedTuple):
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    decay_factor: float     # 1 - lr * weight_decay (decoupled)
    bias_correction2: float  # 1 - beta2^t
    eps: float
    grad_coef: float        # -lr (1 - mu_t) / (1 - prod mu_1..t)
    avg_coef: float         # -lr mu_{t+1} / (1 - prod mu_1..t+1)


def _nadam_eager(s: NAdamScalars, maximize: bool, wd_mode: int, p, g, m, v):
    # torch.optim.NAdam's for-loop path, op for op (bit for bit with it)
    if maximize:
        g = -g
    if p.is_complex():  # torch views complex tensors as real before anything else
        p, g, m, v = as_real(p, g, m, v)
    g = apply_weight_decay(s, wd_mode, p, g)
    m.lerp_(g, s.one_minus_beta1)
    v.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    denom = v.div(s.bias_correction2).sqrt()
    denom.add_(s.eps)
    p.addcdiv_(g, denom, value=s.grad_coef)
    p.addcdiv_(m, denom, value=s.avg_coef)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def _nadam_fused(hp, maximize: bool, wd_mode: int, p, g, m, v):
    # one pass; r(): round where torch's op-by-op path rounds (a no-op in float32)
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = NAdamScalars(*hp.unbind())
    pf, gf, mf, vf = fused_moments(hp, s, wd_mode, r, pf, gf, m, v)
    denom = r(r(r(vf / s.bias_correction2).sqrt()) + s.eps)
    pf = r(pf + s.grad_coef * gf / denom)
    p.copy_(pf + s.avg_coef * mf / denom)
    m.copy_(mf)
    v.copy_(vf)


# pragma: no mutate end


class AdamFamily(BF16State, FusedOptimizer):
    """What NAdam and RAdam share with each other: torch's argument checks, group options and flags."""

    _legacy_group_defaults = dict(maximize=False, foreach=None, capturable=False, differentiable=False,
                                  decoupled_weight_decay=False)
    _code_dtypes = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}  # an 8-bit checkpoint loads dequantized

    def _setup(self, params: Any, lr: Any, betas: Any, eps: Any, weight_decay: Any, more: dict[str, Any],
               decoupled_weight_decay: bool, foreach: Any, maximize: bool, capturable: bool,
               differentiable: bool, fused: bool | None, state: Any, state_dtype: Any, kahan_sum: Any) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        for key, value in more.items():
            if not 0.0 <= value:
                raise ValueError(f"Invalid {key} value: {value}")
        check_selectors(type(self).__name__, capturable=capturable, differentiable=differentiable)
        options = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay, **more,
                       decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
                       capturable=False, differentiable=False)
        defaults = {key: options[key] for key in self._group_order}  # torch's order: checkpoints diff equal
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum))
        super().__init__(params, defaults, fused)

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def _flags(self, group: dict[str, Any]) -> tuple:
        wd = float(group["weight_decay"])
        decoupled = bool(group.get("decoupled_weight_decay", False))
        return bool(group["maximize"]), _WD_NONE if wd == 0 else (_WD_DECOUPLED if decoupled else _WD_L2)


@register("optimizer", torch="torch.optim.NAdam", default_candidate=False,
          configs={"NAdam": (dict(lr=2e-3), 28)})
class NAdam(AdamFamily):
    r"""NAdam, Adam with Nesterov momentum (Dozat 2016): a drop-in for :class:`torch.optim.NAdam` with a fused
    update. AlgoPerf's baseline training algorithm is NAdamW (``decoupled_weight_decay=True``).

    .. math::
        \mu_t = \beta_1\bigl(1 - \tfrac12 0.96^{t\psi}\bigr),\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t = \theta_{t-1} - \gamma\,\frac{(1-\mu_t)\,g_t / (1-\prod_{i\le t}\mu_i)
                   + \mu_{t+1} m_t / (1-\prod_{i\le t+1}\mu_i)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    Args: as torch.optim.NAdam — ``params``, ``lr=2e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``weight_decay=0``, ``momentum_decay=4e-3`` (ψ), ``decoupled_weight_decay=False``, keyword-only
    ``foreach`` (ignored), ``maximize=False``; ``capturable=True`` and ``differentiable=True`` are refused.
    Ours, keyword-only: ``fused``, ``state`` (``"param"``/``"bf16"``/``"8bit"``: :class:`NAdam8bit`),
    ``state_dtype`` and ``kahan_sum``, as :class:`kernels.Adam`.

    State per parameter, torch's: ``step``, ``mu_product`` (a float32 scalar), ``exp_avg``, ``exp_avg_sq``;
    checkpoints load both ways.

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.NAdam(model.parameters(), lr=2e-3, weight_decay=0.01, decoupled_weight_decay=True)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: T. Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop; G. Dahl et al.,
    "Benchmarking Neural Network Training Algorithms" (AlgoPerf), 2023.
    """

    _host_state = {"mu_product": 1.0}
    _group_order = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize",
                    "foreach", "capturable", "differentiable")

    def __init__(self, params: Any, lr: float | torch.Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 state: Literal["param", "bf16", "8bit"] = "param", state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        self._setup(params, lr, betas, eps, weight_decay, {"momentum_decay": momentum_decay},
                    decoupled_weight_decay, foreach, maximize, capturable, differentiable, fused, state,
                    state_dtype, kahan_sum)

    Scalars = NAdamScalars
    _eager_update = staticmethod(_nadam_eager)
    _fused_update = staticmethod(_nadam_fused)
    _bf16_update = staticmethod(bf16_state(_nadam_fused))
    _kahan_update = staticmethod(kahan(_nadam_fused))

    @staticmethod
    def _mu(group: dict[str, Any], step: int) -> float:
        return float(group["betas"][0]) * (1.0 - 0.5 * (0.96 ** (step * float(group["momentum_decay"]))))

    def _advance_host_state(self, group: dict[str, Any], step: int, values: dict[str, torch.Tensor]) -> None:
        values["mu_product"].mul_(self._mu(group, step))  # a float32 tensor times a float: torch's rounding

    def _scalars(self, group: dict[str, Any], step: int, host: dict[str, float]) -> NAdamScalars:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        mu, mu_next = self._mu(group, step), self._mu(group, step + 1)
        mu_product = host["mu_product"]
        return NAdamScalars(1 - beta1, beta2, 1 - beta2, wd, 1 - lr * wd, 1 - beta2 ** step, float(group["eps"]),
                            -lr * (1.0 - mu) / (1.0 - mu_product), (-lr * mu_next) / (1.0 - mu_product * mu_next))


_DOC_8BIT = r""":class:`{0}` with ``exp_avg``/``exp_avg_sq`` stored as block-wise 8-bit codes with a float32
    scale per block (:class:`kernels.Adam8bit`'s maps, round to nearest): 2 bytes of state per parameter plus 8
    per block instead of 8. No update is written for it: the 8-bit codec (``kernels.precision.codecs.
    blockwise_8bit``) wraps :class:`{0}`'s. Args: as :class:`{0}`, plus keyword-only ``block_size=256`` and
    ``min_8bit_size=4096`` (see :class:`kernels.Adam8bit`). Parameters must be float32, bfloat16 or float16.

    .. math::
        \hat m_t = \operatorname{{sign}}(k)(k/127)^2 a_m,\quad \hat v_t = ((d+1)/256)^2 a_v
        \quad (\text{{the update of }} {0} \text{{ on the decoded moments, re-encoded per block}})

    Example::

        >>> opt = kernels.{0}8bit(model.parameters(), lr=1e-3)

    References: as :class:`{0}`; T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer, "8-bit Optimizers via
    Block-wise Quantization", ICLR 2022.
    """


@register("optimizer", torch="torch.optim.NAdam", default_candidate=False,
          configs={"NAdam8bit": (dict(lr=2e-3), 14)})
class NAdam8bit(Blockwise8bit, NAdam):
    __doc__ = _DOC_8BIT.format("NAdam")
    _q8_update = staticmethod(blockwise_8bit(_nadam_fused))

    def __init__(self, params: Any, lr: float | torch.Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 block_size: int = 256, min_8bit_size: int = 4096, state: Literal["8bit"] = "8bit") -> None:
        self._q8_setup(block_size, min_8bit_size, state)
        super().__init__(params, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused)


eight_bit_form(NAdam, NAdam8bit)

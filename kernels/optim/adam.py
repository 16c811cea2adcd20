"""Adam and AdamW: torch.optim's signature, defaults, validation and state layout; our fused update."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from .._catalog import register
from .._runtime.optimizer import FusedOptimizer, as_real, fused_prologue
from .._runtime.validate import check_adam_arguments, check_selectors
from ..precision.bf16 import BF16State, precision_options
from ..precision.codecs import kahan

_WD_NONE, _WD_L2, _WD_DECOUPLED = 0, 1, 2


class AdamScalars(NamedTuple):
    step_size: float        # lr / (1 - beta1^t)
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    weight_decay: float
    decay_factor: float     # 1 - lr * weight_decay (decoupled)
    bc2_sqrt: float         # sqrt(1 - beta2^t)
    eps: float


def apply_weight_decay(s: Any, wd_mode: int, p, g):
    """torch's weight decay of the Adam family, op for op: decoupled (``p *= decay_factor``) or L2 (a new
    gradient ``g + weight_decay * p``); the gradient to use is returned."""
    if wd_mode == _WD_DECOUPLED:
        p.mul_(s.decay_factor)
    elif wd_mode == _WD_L2:
        g = g.add(p, alpha=s.weight_decay)
    return g


def _adam_eager(s: AdamScalars, amsgrad: bool, maximize: bool, wd_mode: int, p, g, m, v, vmax=None):
    # torch.optim.Adam's for-loop path, op for op, so eager results are bit-identical to it
    if maximize:
        g = -g
    g = apply_weight_decay(s, wd_mode, p, g)
    if p.is_complex():
        p, g, m, v = as_real(p, g, m, v)
        vmax = as_real(vmax)[0] if amsgrad else None
    m.lerp_(g, s.one_minus_beta1)
    v.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    if amsgrad:
        torch.maximum(vmax, v, out=vmax)
        denom = (vmax.sqrt() / s.bc2_sqrt).add_(s.eps)
    else:
        denom = (v.sqrt() / s.bc2_sqrt).add_(s.eps)
    p.addcdiv_(m, denom, value=-s.step_size)


# pragma: no mutate start (compiled by torch.compile, which cannot trace mutmut's trampolines)
def fused_moments(hp, s: Any, wd_mode: int, r, pf, gf, m, v):
    """The Adam family's weight decay and moments in the compute dtype (``r`` rounds where torch rounds):
    ``(p, g, m, v)`` after decay, the new first and second moments not yet stored."""
    if wd_mode == _WD_L2:
        gf = r(gf + s.weight_decay * pf)
    elif wd_mode == _WD_DECOUPLED:
        pf = r(pf * s.decay_factor)
    mf = r(torch.lerp(m.to(hp.dtype), gf, s.one_minus_beta1))
    vf = r(r(v.to(hp.dtype) * s.beta2) + s.one_minus_beta2 * gf * gf)
    return pf, gf, mf, vf


def _adam_fused(hp, amsgrad: bool, maximize: bool, wd_mode: int, p, g, m, v, vmax=None):
    # One pass: every buffer read once and written once. Low precision computes in float32 but rounds
    # where torch's op-by-op path rounds (r), so bf16/fp16 results track torch's instead of drifting away.
    r, pf, gf = fused_prologue(hp, p, g, maximize)
    s = AdamScalars(*hp.unbind())
    pf, gf, mf, vf = fused_moments(hp, s, wd_mode, r, pf, gf, m, v)
    if amsgrad:
        vf_max = torch.maximum(vmax.to(hp.dtype), vf)
        vmax.copy_(vf_max)
        denom = r(r(r(vf_max.sqrt()) / s.bc2_sqrt) + s.eps)
    else:
        denom = r(r(r(vf.sqrt()) / s.bc2_sqrt) + s.eps)
    p.copy_(pf - s.step_size * mf / denom)
    m.copy_(mf)
    v.copy_(vf)


# pragma: no mutate end


@register("optimizer", torch="torch.optim.Adam",
          configs={"Adam": (dict(lr=1e-3), 28), "Adam-amsgrad": (dict(lr=1e-3, amsgrad=True), 36)})
class Adam(BF16State, FusedOptimizer):
    r"""Adam (Kingma & Ba, 2015), a drop-in for :class:`torch.optim.Adam` with a fused update.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \,(+\lambda\theta_{t-1}\text{ unless decoupled}),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1}(1-\gamma\lambda)_{\text{decoupled}}
                   - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon},
        \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ with amsgrad, else } v_t

    Args: as torch.optim.Adam — ``params``, ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``weight_decay=0``, ``amsgrad=False``, keyword-only ``maximize=False``, ``decoupled_weight_decay=False``.
    ``fused`` (None | bool) selects *our* compiled update: None = compiled unless ``OPTADVISOR_COMPILE=0``,
    False = eager (bit-identical to torch's for-loop path), True = compiled or raise. ``foreach`` is
    accepted and ignored; ``capturable=True`` and ``differentiable=True`` are refused.

    ``state`` (keyword-only, ours) picks the precision of the optimizer state: ``"param"`` (the default: the
    parameters' dtype, as torch), ``"bf16"`` (``exp_avg``/``exp_avg_sq`` of float32 parameters in bfloat16 —
    half the state memory — computed in float32 and stored with stochastic rounding, ``kernels.precision.bf16``:
    unbiased, reproducible; the same as ``state_dtype=torch.bfloat16``) or ``"8bit"`` (the constructor then
    returns :class:`Adam8bit` built from the same arguments, ``block_size``/``min_8bit_size`` included).

    ``kahan_sum=True`` (keyword-only, ours) keeps a compensation buffer ``kahan_comp`` beside each bfloat16
    or float16 parameter: the update runs in float32 on ``param + kahan_comp``, the parameter stores its
    rounding and the buffer what rounding lost, so updates smaller than half a bfloat16 ulp accumulate
    instead of vanishing (pure-bfloat16 training). It costs 2 bytes per parameter; float32 parameters are
    unaffected.

    Example::

        >>> import torch

        >>> from optadvisor import kernels
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = kernels.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()

    References: D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015; S. J. Reddi,
    S. Kale, S. Kumar, "On the Convergence of Adam and Beyond", ICLR 2018 (amsgrad).
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 amsgrad: bool = False, *, foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None,
                 kahan_sum: bool = False) -> None:
        check_adam_arguments(lr, eps, betas, weight_decay)
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        # (torch's "Tensor betas[i] must be 1-element" check is unreachable: the range checks above already
        # fail on a tensor of more or fewer elements, as torch's do; tested)
        check_selectors(type(self).__name__, capturable=capturable, differentiable=differentiable)
        betas = tuple(float(b) for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=decoupled_weight_decay)
        defaults.update(precision_options(type(self).__name__, state, state_dtype, kahan_sum, amsgrad))
        super().__init__(params, defaults, fused)

    Scalars = AdamScalars
    _legacy_group_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                  differentiable=False, decoupled_weight_decay=False, fused=None)
    # an 8-bit optimizer's checkpoint (kernels.Adam8bit) loads here dequantized
    _code_dtypes = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
    _eager_update = staticmethod(_adam_eager)
    _fused_update = staticmethod(_adam_fused)
    _kahan_update = staticmethod(kahan(_adam_fused))

    def _state_init(self, group: dict[str, Any]) -> dict[str, float]:
        if group.get("amsgrad", False):
            return {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    def _flags(self, group: dict[str, Any]) -> tuple:
        wd = float(group["weight_decay"])
        decoupled = bool(group.get("decoupled_weight_decay", False))
        wd_mode = _WD_NONE if wd == 0 else (_WD_DECOUPLED if decoupled else _WD_L2)
        return bool(group["amsgrad"]), bool(group["maximize"]), wd_mode

    def _scalars(self, group: dict[str, Any], step: int) -> AdamScalars:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        return AdamScalars(lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2, wd, 1 - lr * wd,
                           (1 - beta2 ** step) ** 0.5, float(group["eps"]))


@register("optimizer", torch="torch.optim.AdamW", configs={"AdamW": (dict(lr=1e-3), 28)})
class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): :class:`Adam` with decoupled weight decay, default 1e-2.

    .. math::
        \theta_t = \theta_{t-1}(1-\gamma\lambda)
                   - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \quad (m_t, \hat v_t \text{ as in } :class:`Adam`, \text{ with } g_t = \pm\nabla f(\theta_{t-1}))

    A drop-in for :class:`torch.optim.AdamW`; see :class:`Adam` for the arguments and ``fused``.

    Example::

        >>> opt = kernels.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    References: I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 state: Literal["param", "bf16", "8bit"] = "param",
                 state_dtype: torch.dtype | None = None, kahan_sum: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, state=state, state_dtype=state_dtype,
                         kahan_sum=kahan_sum)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
